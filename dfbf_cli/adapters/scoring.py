"""How a classifier is scored, with labels or against a teacher: shared by every family that classifies
(torchvision and CIFAR models, YOLO's classify task), on any callable from images to class scores."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dfbf_cli.contract import EvalData, ImageFolder, LabelledImages, Metric
from dfbf_cli.errors import DfbfError

TOP1 = Metric("top1", percent=True)


Scorer = Callable[[torch.Tensor], torch.Tensor]


def check_classes(data: LabelledImages, num_outputs: int) -> None:
    """Labels the model can predict (class folders only when they are exactly its classes)."""
    if data.num_classes > num_outputs:
        raise DfbfError(f"{data.source} has {data.num_classes} classes but the model predicts {num_outputs}.")
    if data.class_names and data.num_classes != num_outputs:
        raise DfbfError(
            f"{data.source} has {data.num_classes} class folders but the model predicts {num_outputs} classes; "
            "folder order cannot be matched to the model's classes."
        )


@torch.inference_mode()
def classification_accuracy(scores: Scorer, data: LabelledImages, *, imgsz: int, batch: int, num_outputs: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``scores`` (images in [0, 1] -> class scores)."""
    check_classes(data, num_outputs)
    top1 = top5 = 0
    k = min(5, num_outputs)
    for images, labels in data.batches(imgsz, batch):
        best = scores(images).topk(k, dim=1).indices.cpu()
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=1).sum().item()
    return {"top1": 100.0 * top1 / len(data), "top5": 100.0 * top5 / len(data)}


def require_labelled(data: EvalData, name: str) -> LabelledImages:
    """Classifiers are scored on an .npz or a class-per-folder tree; anything else is a user mistake."""
    if not isinstance(data, LabelledImages):
        raise DfbfError(f"{name} is a classifier: score it on an .npz or a class-per-folder tree, not on {type(data).__name__} data.")
    return data


ROBUSTNESS_EPSILONS = (0.01, 0.05)  # FGSM step in [0, 1] pixel units
NOISE_SIGMA = 0.05  # Gaussian noise standard deviation in [0, 1] pixel units


def classification_robustness(
    scores: Scorer, data: LabelledImages, *, imgsz: int, batch: int, epsilons: tuple[float, ...] = ROBUSTNESS_EPSILONS,
    sigma: float = NOISE_SIGMA, seed: int = 0,
) -> dict[str, float]:
    """Top-1 (percent) under FGSM on the cross-entropy (one step of size ε per pixel) and under noise."""
    generator = torch.Generator().manual_seed(seed)
    correct = {f"top1_fgsm_{eps:g}": 0 for eps in epsilons} | {f"top1_noise_{sigma:g}": 0}
    for images, labels in data.batches(imgsz, batch):
        images.requires_grad_(True)
        logits = scores(images)
        (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels.to(logits.device)), images)
        with torch.no_grad():
            for eps in epsilons:
                attacked = (images + eps * gradient.sign()).clamp(0, 1)
                correct[f"top1_fgsm_{eps:g}"] += (scores(attacked).argmax(1).cpu() == labels).sum().item()
            noisy = (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)
            correct[f"top1_noise_{sigma:g}"] += (scores(noisy).argmax(1).cpu() == labels).sum().item()
    return {name: 100.0 * count / len(data) for name, count in correct.items()}


@torch.inference_mode()
def top1_agreement(student: Scorer, teacher: Scorer, images: ImageFolder, *, imgsz: int, batch: int) -> dict[str, float]:
    """Percentage of images on which student and teacher pick the same class, and the mean KL divergence of
    the student's class distribution from the teacher's (finer than top-1 on a few images)."""
    same = divergence = 0.0
    for x in images.batches(imgsz, batch):
        ours, theirs = student(x).float().log_softmax(1), teacher(x).float().log_softmax(1)
        same += (ours.argmax(1) == theirs.argmax(1)).sum().item()
        divergence += F.kl_div(ours, theirs, log_target=True, reduction="sum").item()
    return {"agreement_top1": 100.0 * same / len(images), "agreement_kl": divergence / len(images)}

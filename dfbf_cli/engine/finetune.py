"""DFBF's intermediate supervision: teach the pruned backbone to reproduce the original's features.

On synthetic images, teacher and student backbones run side by side; the loss is a weighted sum,
over the feature taps (block outputs that pruning kept at their original shape, the backbone's
final outputs included), of the distance between student and teacher feature maps, deeper taps
weighted more. Only the student's backbone trains; the original head is put back unchanged at the
end. Each epoch ends with an atomic checkpoint, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dfbf_cli.adapters.base import ModelAdapter
from dfbf_cli.engine.evaluate import check_same_kind
from dfbf_cli.engine.files import atomic_path
from dfbf_cli.engine.runtime import PRECISIONS, autocast
from dfbf_cli.errors import DfbfError

DISTANCES = {"l1": F.l1_loss, "mse": F.mse_loss, "smoothl1": F.smooth_l1_loss}
TAP_WEIGHTS = {
    "uniform": lambda n: [1.0] * n,
    "linear": lambda n: [float(i + 1) for i in range(n)],  # rising with depth, as the reference does
    "last": lambda n: [0.0] * (n - 1) + [1.0],
}


def tap_weights(scheme: str, n: int) -> list[float]:
    """The ``n`` taps' weights under ``scheme``, summing to 1 (the loss scale does not depend on the number of taps)."""
    weights = torch.tensor(TAP_WEIGHTS[scheme](n))
    return (weights / weights.sum()).tolist()


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 20
    batch: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"  # measured better than the reference's SGD here (docs/finetune.md)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0  # 5e-4 (the reference's) cost points with Adam: docs/finetune.md
    schedule: str = "cosine"  # or "step" (×0.1 at 50% and 75% of the epochs)
    loss: str = "l1"
    tap_weights: str = "linear"
    bn: str = "train"  # student BatchNorm: "train" (batch statistics, running stats updated) or "frozen"
    augment: bool = True  # random flips and shifts of the fixed synthetic set
    cutmix: bool = True  # paste a patch of another image into each: +1.3 top-1 on CIFAR (docs/finetune.md)
    precision: str = "auto"  # bf16 autocast where native (runtime.resolve_precision), else fp32

    def validate(self) -> None:
        for field_name, value, allowed in (("loss", self.loss, DISTANCES), ("tap-weights", self.tap_weights, TAP_WEIGHTS),
                                           ("optimizer", self.optimizer, {"sgd", "adam"}), ("schedule", self.schedule, {"cosine", "step"}),
                                           ("bn", self.bn, {"train", "frozen"}), ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise DfbfError(f"Unknown --{field_name} '{value}'; choose one of {', '.join(allowed)}.")
        if self.epochs < 1 or self.batch < 2 or not self.lr > 0 or not self.weight_decay >= 0:
            raise DfbfError("--epochs must be ≥ 1, --batch ≥ 2, --lr > 0 and --weight-decay ≥ 0.")


class FeatureTaps(contextlib.AbstractContextManager):
    """Records the outputs of named submodules during a forward pass, in tap order."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.names = names
        self.handles = [model.get_submodule(n).register_forward_hook(self._recorder(n)) for n in names]

    def _recorder(self, name: str):
        def record(_module, _inputs, output) -> None:
            self.outputs[name] = output

        return record

    def take(self) -> list[torch.Tensor]:
        taken = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return taken

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts (reflection-padded) up to 1/8 of the image size."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    return padded[:, :, dy : dy + h, dx : dx + w]


def cutmix(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paste the same random box (of a uniformly drawn share of the area) from a shuffled partner into
    every image: new inputs for the teacher to describe, from the same fixed synthetic set."""
    n, _, h, w = images.shape
    partner = torch.randperm(n, generator=generator).to(images.device)
    share = float(torch.rand(1, generator=generator)) ** 0.5
    bh, bw = int(h * share), int(w * share)
    y, x = (int(torch.randint(0, size - box + 1, (1,), generator=generator)) for size, box in ((h, bh), (w, bw)))
    mixed = images.clone()
    mixed[:, :, y : y + bh, x : x + bw] = images[partner, :, y : y + bh, x : x + bw]
    return mixed


def _optimizer(params: list[nn.Parameter], settings: FinetuneSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def _lr_at(settings: FinetuneSettings, epoch: int) -> float:
    if settings.schedule == "step":
        return settings.lr * (0.1 ** sum(epoch >= settings.epochs * f for f in (0.5, 0.75)))
    return 0.5 * settings.lr * (1 + math.cos(math.pi * epoch / settings.epochs))


def check_compatible(student: ModelAdapter, teacher: ModelAdapter, imgsz: int) -> None:
    """The teacher must be the student's unpruned original: same kind, same taps of the same shapes."""
    check_same_kind(student, teacher)
    s_split, t_split = student.split(), teacher.split()
    if s_split.feature_taps != t_split.feature_taps:
        raise DfbfError(f"Teacher {teacher.name} does not have the student's feature taps: it is not the model that was pruned.")
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.no_grad(), FeatureTaps(student.model, s_split.feature_taps) as s_taps, FeatureTaps(teacher.model, t_split.feature_taps) as t_taps:
        s_split.backbone.eval()(x), t_split.backbone.eval()(x)
        shapes = [(a.shape, b.shape) for a, b in zip(s_taps.take(), t_taps.take())]
    for name, (s_shape, t_shape) in zip(s_split.feature_taps, shapes):
        if s_shape != t_shape:
            raise DfbfError(
                f"Teacher {teacher.name} does not match the student at {name} ({tuple(t_shape)} vs {tuple(s_shape)}): "
                "give the unpruned model that the student was pruned from."
            )


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    tap_losses: list[float]
    images_per_second: float


StepCallback = Callable[[int, int, int, float, list[float], float], None]  # epoch, step, steps, loss, tap losses, img/s


def finetune(
    student: ModelAdapter, teacher: ModelAdapter, images: torch.Tensor, *, settings: FinetuneSettings, device: torch.device,
    seed: int, state_path: Path, resume: bool = False, on_step: StepCallback | None = None,
) -> list[EpochRecord]:
    """Train ``student``'s backbone in place to mimic ``teacher``'s features on ``images`` (uint8 N×3×H×W)."""
    settings.validate()
    imgsz = images.shape[-1]
    check_compatible(student, teacher, imgsz)
    s_split, t_split = student.split(), teacher.split()
    taps = s_split.feature_taps
    weights = tap_weights(settings.tap_weights, len(taps))
    distance = DISTANCES[settings.loss]
    mixed_precision = autocast(settings.precision, device)

    student.model.to(device).requires_grad_(False)
    teacher.model.to(device).eval().requires_grad_(False)
    params = list(s_split.backbone.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = _optimizer(params, settings)
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochRecord] = []
    start_epoch = 0
    if state_path.exists():
        if not resume:
            raise DfbfError(f"{state_path} holds an interrupted fine-tuning run: pass --resume to continue it, or delete it.")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["settings"] != asdict(settings):
            raise DfbfError(f"{state_path} was made with other fine-tuning settings; resume with the same ones or delete it.")
        student.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, start_epoch = [EpochRecord(**r) for r in state["history"]], state["epoch"]

    n, batch = len(images), min(settings.batch, len(images))
    steps = n // batch  # drop the ragged last batch: BatchNorm statistics need full batches
    with FeatureTaps(student.model, taps) as s_taps, FeatureTaps(teacher.model, taps) as t_taps:
        for epoch in range(start_epoch, settings.epochs):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(settings, epoch)
            s_split.backbone.train(settings.bn == "train")
            order = torch.randperm(n, generator=generator)
            started, total, tap_totals = time.perf_counter(), 0.0, torch.zeros(len(taps))
            for step in range(steps):
                x = images[order[step * batch : (step + 1) * batch]].float().div(255)
                if settings.augment:
                    x = augment(x, generator)
                if settings.cutmix:
                    x = cutmix(x, generator)
                x = student.input_spec.normalize(x.to(device))
                with mixed_precision:
                    with torch.no_grad():
                        t_split.backbone(x)
                        targets = t_taps.take()
                    s_split.backbone(x)
                    losses = torch.stack([distance(s.float(), t.float()) for s, t in zip(s_taps.take(), targets)])
                loss = sum(w * l for w, l in zip(weights, losses))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                tap_totals += losses.detach().cpu()
                if on_step:
                    on_step(epoch, step + 1, steps, total / (step + 1), (tap_totals / (step + 1)).tolist(),
                            (step + 1) * batch / (time.perf_counter() - started))
            history.append(EpochRecord(epoch + 1, total / steps, (tap_totals / steps).tolist(), steps * batch / (time.perf_counter() - started)))
            with atomic_path(state_path) as tmp:
                torch.save({"model": student.model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                            "epoch": epoch + 1, "settings": asdict(settings), "history": [asdict(r) for r in history]}, tmp)
    student.model.eval().requires_grad_(False)
    reattach_head(student, teacher)
    return history


def reattach_head(student: ModelAdapter, teacher: ModelAdapter) -> None:
    """Copy the original head's weights (and buffers) into the student: the head is the teacher's, bit for bit."""
    teacher_modules = dict(teacher.model.named_modules())
    for name in student.split().head_modules:
        student.model.get_submodule(name).load_state_dict(teacher_modules[name].state_dict())

"""Data-free synthetic images: optimise noise until the backbone's BatchNorm statistics match.

DeepInversion (Yin et al. 2020) as used by DFBF: at every BatchNorm layer of the *backbone*, the
batch's per-channel mean and variance of the layer's input are pulled towards the layer's running
statistics (the first layer weighted higher), with total-variation and L2 image priors, random
jitter and flips each step, Adam with a cosine schedule per phase. An optional first phase works
at half resolution (a large speed-up). Only the backbone is needed, so this serves every task; a
classifier may add cross-entropy towards balanced target labels (recorded in the dataset).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dfbf_cli.contract import IMAGENET, BackboneSplit, InputSpec, ModelAdapter
from dfbf_cli.engine.distributed import barrier, current, job_exclusive, main_first
from dfbf_cli.engine.progress import ProgressCallback, ProgressEvent, ignore
from dfbf_cli.engine.runtime import autocast
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import Precision, SynthesisSettings

REFERENCE_IMGSZ = 224  # jitter is given in pixels at this size and scaled with the image size
# The images are optimised in one pixel scale whatever the model's own input normalisation, so the
# step size, initial noise and priors mean the same for every model: ImageNet's statistics, which
# DeepInversion's settings were tuned for. (A YOLO model takes raw [0, 1] pixels; optimising in its
# input space made every step four times larger and the noise start saturated.)
PIXEL_SCALE = IMAGENET


class BatchNormStatsLoss(contextlib.AbstractContextManager):
    """Hooks every BatchNorm2d in a module; after a forward pass, :meth:`value` is the weighted sum over
    layers of ||batch mean − running mean||₂ + ||batch var − running var||₂ of the layer's input."""

    def __init__(self, module: nn.Module, first_multiplier: float):
        self.layers = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("the backbone has no BatchNorm2d layer to match statistics against")
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.terms: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, layer: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output) -> None:
        x = inputs[0].float()
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(layer.running_mean - mean) + torch.linalg.vector_norm(layer.running_var - var))

    def value(self) -> torch.Tensor:
        total = sum(w * t for w, t in zip(self.weights, self.terms))
        self.terms = []
        return total

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def image_priors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total variation in L2 over 4 neighbour directions, L2 norm): smooth, bounded images."""
    diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
    return sum(torch.linalg.vector_norm(d) for d in diffs), torch.linalg.vector_norm(x)


def _cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / max(total, 1)))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters without gradients and every submodule in eval mode (only the images are optimised), each
    restored afterwards: submodule by submodule, as a wrapper's own flag says nothing of its children's."""
    flags = [p.requires_grad for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    module.eval().requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


StepCallback = Callable[[int, float], None]  # (iterations done in this shard, current loss)


def synthesize_batch(
    split: BackboneSplit, spec: InputSpec, settings: SynthesisSettings, *, count: int, imgsz: int, seed: int,
    device: torch.device, precision: Precision = Precision.FP32, labels: torch.Tensor | None = None, on_step: StepCallback | None = None,
    start: torch.Tensor | None = None, extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Optimise ``count`` images from noise (or from ``start``, images in [0, 1]); return them as uint8 N×3×H×W
    and loss statistics. ``extra_loss`` maps each step's model inputs to a term added to the loss (it runs
    right after the backbone's forward pass on them)."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if start is None:
        x = torch.randn(count, 3, imgsz, imgsz, generator=generator).to(device).requires_grad_(True)
    else:
        x = PIXEL_SCALE.normalize(start.float().to(device)).requires_grad_(True)
    lower = PIXEL_SCALE.normalize(torch.zeros(1, 3, 1, 1, device=device))
    upper = PIXEL_SCALE.normalize(torch.ones(1, 3, 1, 1, device=device))
    to_model = _rescaling(PIXEL_SCALE, spec, x)
    jitter = max(1, round(settings.jitter * imgsz / REFERENCE_IMGSZ)) if settings.jitter else 0
    mixed_precision = autocast(precision, device)
    phases = [(2, settings.low_res_iterations), (1, settings.iterations)]
    phases = [(factor, n) for factor, n in phases if n > 0]
    best, best_loss, done = x.detach().clone(), math.inf, 0
    with frozen(split.backbone), frozen(split.head), BatchNormStatsLoss(split.backbone, settings.first_bn_multiplier) as bn:
        bn_start = _bn_loss(split, bn, to_model(x), mixed_precision)
        for phase, (factor, iterations) in enumerate(phases):
            optimizer = torch.optim.Adam([x], lr=settings.lr, betas=settings.betas, eps=1e-8)
            final_phase = phase == len(phases) - 1
            for step in range(iterations):
                optimizer.param_groups[0]["lr"] = _cosine_lr(settings.lr, step, iterations)
                inputs = F.avg_pool2d(x, factor) if factor > 1 else x
                if jitter:
                    shift = jitter // factor
                    inputs = torch.roll(inputs, (rng.randint(-shift, shift), rng.randint(-shift, shift)), dims=(2, 3))
                if settings.flip and rng.random() < 0.5:
                    inputs = inputs.flip(3)
                with mixed_precision:
                    features = split.backbone(to_model(inputs))
                    class_loss = 0.0
                    if labels is not None:
                        class_loss = F.cross_entropy(split.head(features).float(), labels)
                    extra = extra_loss(to_model(inputs)) if extra_loss is not None else 0.0
                bn_loss = bn.value()
                tv, norm = image_priors(inputs.float())
                loss = settings.bn_weight * bn_loss + settings.tv_l2 * tv + settings.l2 * norm + settings.class_weight * class_loss + extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, upper), lower))
                if final_phase and loss.item() < best_loss:
                    best_loss, best = loss.item(), x.detach().clone()
                done += 1
                if on_step:
                    on_step(done, loss.item())
        bn_end = _bn_loss(split, bn, to_model(best), mixed_precision)
    images = PIXEL_SCALE.denormalize(best).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return images, {"bn_loss_start": bn_start, "bn_loss_end": bn_end, "best_loss": best_loss}


def _rescaling(source: InputSpec, target: InputSpec, like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inputs normalised by ``source`` → inputs normalised by ``target``, as one affine map (exactly the
    identity when the two agree, so classifiers' images are unchanged bit for bit)."""
    (source_mean, source_std), (target_mean, target_std) = source.moments(like), target.moments(like)
    scale, shift = source_std / target_std, (source_mean - target_mean) / target_std
    return lambda inputs: inputs * scale + shift


@torch.no_grad()
def _bn_loss(split: BackboneSplit, bn: BatchNormStatsLoss, x: torch.Tensor, mixed_precision) -> float:
    """The BatchNorm-statistics loss of images at full resolution, without jitter: comparable across settings."""
    with mixed_precision:
        split.backbone(x)
    return bn.value().item()


def shard_seed(seed: int, shard_index: int) -> int:
    """Each shard has its own seed, so a resumed run makes the same images as an uninterrupted one."""
    return (seed * 1_000_003 + shard_index) % 2**63


def balanced_labels(start: int, count: int, num_classes: int) -> torch.Tensor:
    return (torch.arange(start, start + count) % num_classes).long()


@dataclass
class SynthesisPlan:
    """The dataset being filled, the settings it was made with, and the shards still to make."""

    dataset: SyntheticDataset
    settings: SynthesisSettings
    seed: int
    precision: Precision
    classes: int | None
    shard_sizes: list[int]


def plan_synthesis(
    adapter: ModelAdapter, out: Path, *, num_images: int, imgsz: int, batch: int, settings: SynthesisSettings, seed: int,
    precision: Precision,
) -> SynthesisPlan:
    """Open (or continue) the dataset at ``out`` and work out which shards are still to be made.
    ``precision`` is resolved (bf16 or fp32): images made in another one are not appended."""
    classes = adapter.synthesis_classes() if settings.class_weight > 0 else None
    if classes is None:
        settings = replace(settings, class_weight=0.0)
    made = main_first(lambda: SyntheticDataset.create_or_resume(  # new, or continued (adopting shards other processes finished)
        out, teacher={"name": adapter.name, "family": adapter.family, "task": adapter.task, "fingerprint": adapter.fingerprint()},
        input_spec=adapter.input_spec.to_dict(), imgsz=imgsz, generation={**settings.to_dict(), "seed": seed, "batch": batch, "precision": str(precision)},
    ))
    dataset = made or SyntheticDataset.open(out)
    remaining = max(0, num_images - dataset.num_images)
    sizes = [min(batch, remaining - start) for start in range(0, remaining, batch)]
    if len(sizes) > 1 and sizes[-1] == 1:  # a lone image has no batch statistics: join it to the previous shard
        sizes[-2:] = [sizes[-2] + 1]
    return SynthesisPlan(dataset, settings, seed, precision, classes, sizes)


def run_synthesis(adapter: ModelAdapter, plan: SynthesisPlan, *, device: torch.device, on_progress: ProgressCallback = ignore) -> SyntheticDataset:
    """Make the planned shards; each is on disk (and recorded) once finished. Under torchrun the ranks take
    turns (shard k by rank k mod N): each shard's seed is its index, so the dataset is the same, image for
    image, whatever the number of processes; rank 0 records the others' shards once all are done."""
    dataset, world = plan.dataset, current()
    adapter.model.to(device)
    first, before = len(dataset.manifest["shards"]), dataset.num_images
    mine = [position for position in range(len(plan.shard_sizes)) if position % world.size == world.rank]
    if plan.shard_sizes:  # a finished dataset is only read: no lock
        with job_exclusive(dataset.root, "--out"):
            _make_shards(adapter, plan, adapter.split(), mine, first, before, device, on_progress)
    if not world.distributed:
        return dataset
    barrier()
    if world.main:
        dataset.adopt_finished()
    barrier()
    return dataset if world.main else SyntheticDataset.open(dataset.root)


def _make_shards(adapter: ModelAdapter, plan: SynthesisPlan, split: BackboneSplit, mine: list[int], first: int, before: int,
                 device: torch.device, on_progress: ProgressCallback) -> None:
    dataset, classes = plan.dataset, plan.classes
    steps = plan.settings.low_res_iterations + plan.settings.iterations
    for done_shards, position in enumerate(mine):
        count, index = plan.shard_sizes[position], first + position
        start = before + sum(plan.shard_sizes[:position])
        labels = balanced_labels(start, count, classes).to(device) if classes else None
        started = time.perf_counter()

        def report(done: int, loss: float, done_shards=done_shards, count=count, started=started) -> None:
            on_progress(ProgressEvent("synthesize", done_shards * steps + done, len(mine) * steps, {
                "batch": f"{done_shards + 1}/{len(mine)}", "it": f"{done}/{steps}", "loss": loss,
                "img·it/s": count * done / max(time.perf_counter() - started, 1e-9)}))

        images, stats = synthesize_batch(
            split, adapter.input_spec, plan.settings, count=count, imgsz=dataset.imgsz, seed=shard_seed(plan.seed, index),
            device=device, precision=plan.precision, labels=labels, on_step=report,
        )
        stats["seconds"], stats["precision"] = round(time.perf_counter() - started, 3), str(plan.precision)
        dataset.add_shard(images, None if labels is None else labels.cpu(), stats, index=index)

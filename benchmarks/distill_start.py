"""Distillation from the pruned or the reconstructed model, on the fixed synthetic set or a renewed stream:
the tables of docs/reconstruct.md ("distillation after reconstruction", "allocation") and docs/finetune.md ("a renewed
stream", "further augmentations").

    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 960                    # from the pruned model
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 960 --reconstruct 128  # from the reconstructed one
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 960 --reconstruct 128 --renew 64 --adversarial 1
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 256 --procedural half  # fresh procedural images in every batch
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 256 --augment zoom      # a further augmentation
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 960 --reconstruct 128 --criterion energy \
        --flops 0.5 --allocation uniform|sensitivity|refit                                          # a GFLOPs target, allocated

cifar: ResNet-56 at ratio 0.5, top-1 on the 5,000-image dev file; yolo: yolo11n-pose at ratio 0.3,
pose / box mAP50-95 on coco-mini-pose. Fine-tuning is compress's recipe (batch 32, ``--precision auto``).
``--procedural`` feeds fresh procedural images (dead leaves: discs and squares of random colours and
power-law sizes over coloured 1/f noise, free to make) into every batch after the usual augmentation:
``all`` of it, the second ``half`` of it, or one box of each image (``paste``). ``--augment`` adds one more
augmentation after the batch's CutMix (``perimage`` replaces it). ``--allocation refit`` is ``sensitivity`` with each
group's cost measured after its refit (on 32 images). ``--steps 0`` stops after pruning (and the refit).
Prints one JSON line: the metric at the start and the end, and the times. Run alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import asset, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine import finetune as distillation
from dfbf_cli.engine import pruning
from dfbf_cli.engine.efficiency import model_gflops
from dfbf_cli.engine.finetune import finetune
from dfbf_cli.engine.pruning import choose, plan_keep, prune
from dfbf_cli.engine.reconstruct import refit_pruned
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import Allocation, Criterion, FinetuneSettings, PruneSettings, ReconstructSettings

CPU = torch.device("cpu")
CASES = {
    "cifar": (lambda: load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th"))), 0.5,
              lambda: load_data(str(asset("data/cifar10-test-dev.npz"))), 32, ("top1",)),
    "yolo": (lambda: load_model(str(asset("models/yolo11n-pose.pt"))), 0.3, lambda: load_data(private_copy("coco-mini-pose")), 640,
             ("pose_map50_95", "box_map50_95")),
}
BATCH = 32
distillation_cutmix = distillation.cutmix  # what --procedural and --augment replace for the run


def dead_leaves(n: int, height: int, width: int, generator: torch.Generator, shapes: int = 60) -> torch.Tensor:
    """``n`` procedural images in [0, 1]: discs and squares (radius density ∝ r⁻³) painted over each other, plus 1/f noise."""
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, height, width).clone()
    size = min(height, width)
    smallest, largest = size / 40, size / 3
    for _ in range(shapes):
        radius = (smallest**-2 + torch.rand(n, generator=generator) * (largest**-2 - smallest**-2)) ** -0.5
        cy, cx = (torch.rand(n, generator=generator) * side for side in (height, width))
        dy, dx = (yy - cy.view(-1, 1, 1)).abs(), (xx - cx.view(-1, 1, 1)).abs()
        r = radius.view(-1, 1, 1)
        square = (torch.rand(n, generator=generator) < 0.5).view(-1, 1, 1)
        inside = torch.where(square, torch.maximum(dy, dx) < r, dy**2 + dx**2 < r**2)
        images = torch.where(inside[:, None], torch.rand(n, 3, 1, 1, generator=generator), images)
    noise = sum(F.interpolate(torch.randn(n, 3, max(2, height // o), max(2, width // o), generator=generator), size=(height, width), mode="bilinear")
                * (o / 32) for o in (4, 8, 16, 32))
    return (images + 0.08 * noise).clamp(0, 1)


def mix_procedural(how: str, seed: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Fine-tuning's batch mixing that also feeds procedural images (``how``: all, half or paste)."""
    generator = torch.Generator().manual_seed(seed + 1234)

    def mixed(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = distillation_cutmix(x, g)
        n, _, h, w = x.shape
        fresh = dead_leaves(n, h, w, generator)
        if how == "all":
            return fresh
        if how == "half":
            return torch.cat([x[: n // 2], fresh[n // 2 :]])
        share = float(torch.rand(1, generator=generator)) ** 0.5
        bh, bw = int(h * share), int(w * share)
        y, z = (int(torch.randint(0, size - box + 1, (1,), generator=generator)) for size, box in ((h, bh), (w, bw)))
        x = x.clone()
        x[:, :, y : y + bh, z : z + bw] = fresh[:, :, y : y + bh, z : z + bw]
        return x

    return mixed


def jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors in [1 - strength, 1 + strength]."""
    n = len(x)
    b, c, s = ((1 + strength * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)) for _ in range(3))
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * s
    x = x.mean((1, 2, 3), keepdim=True) + (x - x.mean((1, 2, 3), keepdim=True)) * c
    return (x * b).clamp(0, 1)


def per_image_cutmix(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """CutMix with a box of its own (share, place, partner) for every image."""
    n, _, h, w = x.shape
    partner = torch.randperm(n, generator=g)
    share = torch.rand(n, generator=g) ** 0.5
    bh, bw = (share * h).long(), (share * w).long()
    y = (torch.rand(n, generator=g) * (h - bh + 1)).long()
    z = (torch.rand(n, generator=g) * (w - bw + 1)).long()
    yy, zz = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = ((yy >= y.view(-1, 1, 1)) & (yy < (y + bh).view(-1, 1, 1)) & (zz >= z.view(-1, 1, 1)) & (zz < (z + bw).view(-1, 1, 1)))
    return torch.where(inside[:, None], x[partner], x)


def rotate(x: torch.Tensor, g: torch.Generator, degrees: float = 15.0, scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Per-image rotation (and zoom) with reflection at the borders."""
    n = len(x)
    angle = (2 * torch.rand(n, generator=g) - 1) * degrees * torch.pi / 180
    zoom = scale[0] + torch.rand(n, generator=g) * (scale[1] - scale[0])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


AUGMENTS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "jitter": lambda x, g: jitter(distillation_cutmix(x, g), g),
    "perimage": lambda x, g: per_image_cutmix(x, g),
    "noise": lambda x, g: (distillation_cutmix(x, g) + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1),
    "rotate": lambda x, g: rotate(distillation_cutmix(x, g), g),
    "zoom": lambda x, g: rotate(distillation_cutmix(x, g), g, degrees=0.0, scale=(0.75, 1.25)),
}


def refit_each_cut(refit_images: torch.Tensor, scope) -> Callable:
    """``pruning.cut`` followed by the refit on ``refit_images``: put in its place while ``plan_keep`` runs, the
    sensitivity allocation measures each group's cost after its refit (``--allocation refit``)."""
    plain = pruning.cut

    def cut(adapter, groups, chosen):
        alone = plain(adapter, groups, chosen)
        refit_pruned(alone, adapter, scope, chosen, refit_images, ReconstructSettings(), device=CPU)
        return alone

    return cut


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("--steps", type=int, default=960)
    parser.add_argument("--reconstruct", type=int, default=0, help="images to reconstruct on first (0: distil the pruned model)")
    parser.add_argument("--renew", type=int, default=0)
    parser.add_argument("--renew-steps", type=int, default=20)
    parser.add_argument("--adversarial", type=float, default=0.0)
    parser.add_argument("--procedural", choices=("all", "half", "paste"), default=None)
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default=None, help="a further augmentation in place of the batch's CutMix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flops", type=float, default=None, help="a GFLOPs target instead of the case's ratio")
    parser.add_argument("--allocation", choices=[a.value for a in Allocation] + ["refit"], default="uniform",
                        help="refit: sensitivity measured after each group's refit (on 32 images)")
    parser.add_argument("--criterion", choices=[c.value for c in Criterion], default="l1")
    parser.add_argument("--min-channels", type=int, default=8)
    args = parser.parse_args()
    if args.procedural and args.augment:
        parser.error("--procedural and --augment each replace the batch's CutMix: give one")
    if args.procedural and args.renew:
        parser.error("--procedural applies to the fixed set; the renewed stream would start from procedural images too")
    load, ratio, data, imgsz, metrics = CASES[args.case]
    original, labelled = load(), data()
    images = SyntheticDataset.open(args.synthetic).load()[0]
    allocation = Allocation.SENSITIVITY if args.allocation == "refit" else Allocation(args.allocation)
    settings = PruneSettings(None if args.flops else ratio, args.flops, allocation=allocation,
                             criterion=Criterion(args.criterion), min_channels=args.min_channels)
    scoring = images[:128].float() / 255
    plain_cut = pruning.cut
    if args.allocation == "refit":
        pruning.cut = refit_each_cut(images[:32].float() / 255, settings.scope)
    try:
        keep = plan_keep(original, settings, imgsz=imgsz, probe=scoring[:8], device=CPU, images=scoring)
    finally:
        pruning.cut = plain_cut
    chosen = choose(original, settings, keep, scoring)
    student, _ = prune(original, settings, chosen)

    def score() -> dict[str, float]:
        found = student.evaluate(labelled, imgsz=imgsz, batch=500 if args.case == "cifar" else 16, device=CPU)
        return {m: round(found[m], 4) for m in metrics}

    result = {"machine": machine(CPU), **vars(args), "synthetic": str(args.synthetic)}
    started = time.perf_counter()
    if args.reconstruct:
        refit_pruned(student, original, settings.scope, chosen, images[: args.reconstruct], ReconstructSettings(), device=CPU)
    result |= {"reconstruct_s": round(time.perf_counter() - started, 1), "gflops_kept": round(model_gflops(student, imgsz) / model_gflops(original, imgsz), 4),
               "keep": keep, "start": score()}
    if not args.steps:
        print(json.dumps(result), flush=True)
        return
    tuning = FinetuneSettings(epochs=max(1, args.steps // (len(images) // BATCH)), batch=BATCH, precision=resolve_precision("auto", CPU),
                              renew=args.renew, renew_steps=args.renew_steps, adversarial=args.adversarial)
    distillation.cutmix = (mix_procedural(args.procedural, args.seed) if args.procedural
                           else AUGMENTS[args.augment] if args.augment else distillation_cutmix)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            history = finetune(student, original, images, settings=tuning, scope=settings.scope, device=CPU, seed=args.seed,
                               state_path=Path(tmp) / "state.pt")
    finally:
        distillation.cutmix = distillation_cutmix
    result |= {"finetune_s": round(time.perf_counter() - started, 1), "final_loss": round(history[-1].loss, 4), "end": score()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

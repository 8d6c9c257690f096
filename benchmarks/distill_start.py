"""Distillation from the pruned or the reconstructed model, on the fixed synthetic set or a renewed stream:
the tables of docs/reconstruct.md ("distillation after reconstruction") and docs/finetune.md ("a renewed stream").

    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 960                    # from the pruned model
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 960 --reconstruct 128  # from the reconstructed one
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 960 --reconstruct 128 --renew 64 --adversarial 1
    .venv/bin/python benchmarks/distill_start.py cifar SYNTHETIC_DIR --steps 256 --procedural half  # fresh procedural images in every batch

cifar: ResNet-56 at ratio 0.5, top-1 on the 5,000-image dev file; yolo: yolo11n-pose at ratio 0.3,
pose / box mAP50-95 on coco-mini-pose. Fine-tuning is compress's recipe (batch 32, ``--precision auto``).
``--procedural`` feeds fresh procedural images (dead leaves: discs and squares of random colours and
power-law sizes over coloured 1/f noise, free to make) into every batch after the usual augmentation:
``all`` of it, the second ``half`` of it, or one box of each image (``paste``).
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
from dfbf_cli.engine.finetune import finetune
from dfbf_cli.engine.pruning import choose, prune
from dfbf_cli.engine.reconstruct import refit_pruned
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import FinetuneSettings, PruneSettings, ReconstructSettings

CPU = torch.device("cpu")
CASES = {
    "cifar": (lambda: load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th"))), 0.5,
              lambda: load_data(str(asset("data/cifar10-test-dev.npz"))), 32, ("top1",)),
    "yolo": (lambda: load_model(str(asset("models/yolo11n-pose.pt"))), 0.3, lambda: load_data(private_copy("coco-mini-pose")), 640,
             ("pose_map50_95", "box_map50_95")),
}
BATCH = 32


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


def mix_procedural(how: str, seed: int) -> Callable[[], None]:
    """Make fine-tuning's batch mixing also feed procedural images (``how``: all, half or paste); returns the undo."""
    generator, cutmix = torch.Generator().manual_seed(seed + 1234), distillation.cutmix

    def mixed(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = cutmix(x, g)
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

    distillation.cutmix = mixed

    def undo() -> None:
        distillation.cutmix = cutmix

    return undo


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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.procedural and args.renew:
        parser.error("--procedural applies to the fixed set; the renewed stream would start from procedural images too")
    load, ratio, data, imgsz, metrics = CASES[args.case]
    original, labelled = load(), data()
    images = SyntheticDataset.open(args.synthetic).load()[0]
    settings = PruneSettings(ratio)
    chosen = choose(original, settings)
    student, _ = prune(original, settings, chosen)

    def score() -> dict[str, float]:
        found = student.evaluate(labelled, imgsz=imgsz, batch=500 if args.case == "cifar" else 16, device=CPU)
        return {m: round(found[m], 4) for m in metrics}

    result = {"machine": machine(CPU), **vars(args), "synthetic": str(args.synthetic)}
    started = time.perf_counter()
    if args.reconstruct:
        refit_pruned(student, original, settings.scope, chosen, images[: args.reconstruct], ReconstructSettings(), device=CPU)
    result |= {"reconstruct_s": round(time.perf_counter() - started, 1), "start": score()}
    tuning = FinetuneSettings(epochs=max(1, args.steps // (len(images) // BATCH)), batch=BATCH, precision=resolve_precision("auto", CPU),
                              renew=args.renew, renew_steps=args.renew_steps, adversarial=args.adversarial)
    undo = mix_procedural(args.procedural, args.seed) if args.procedural else lambda: None
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            history = finetune(student, original, images, settings=tuning, scope=settings.scope, device=CPU, seed=args.seed,
                               state_path=Path(tmp) / "state.pt")
    finally:
        undo()
    result |= {"finetune_s": round(time.perf_counter() - started, 1), "final_loss": round(history[-1].loss, 4), "end": score()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

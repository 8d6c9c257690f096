"""Closed-form reconstruction after pruning, before any distillation: the table of docs/reconstruct.md.

    .venv/bin/python benchmarks/reconstruction.py yolo SYNTHETIC_DIR [--images 32,64,128] [--damping 1e-4,1e-3,1e-2]
    .venv/bin/python benchmarks/reconstruction.py cifar SYNTHETIC_DIR [--images 64,256,512] [--damping 1e-3]
    .venv/bin/python benchmarks/reconstruction.py yolo SYNTHETIC_DIR --scope trunk --flops 0.7 --images 112

SYNTHETIC_DIR: a dataset of the model from ``dfbf synthesize`` (balanced preset). yolo: yolo11n-pose,
ratio 0.3 (or --flops F, shared uniformly), backbone (or --scope trunk), scored on coco-mini-pose (pose
/ box mAP50-95); cifar: ResNet-56, ratio 0.5, scored on the 5,000-image dev file (top-1). Each row: the pruned model refit with that many of the
set's images at that damping, its metric, the feature distance on 16 held-back synthetic images
and the wall time of the refit. Run alone on the machine: the times are part of the result.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import asset, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.efficiency import model_gflops
from dfbf_cli.engine.features import feature_gap
from dfbf_cli.engine.pruning import choose, kept_outputs, plan_keep, prune
from dfbf_cli.engine.reconstruct import reconstruct
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import PruneSettings, Scope

CPU = torch.device("cpu")
CASES = {
    "yolo": (lambda: load_model(str(asset("models/yolo11n-pose.pt"))), 0.3, lambda: load_data(private_copy("coco-mini-pose")), 640,
             ("pose_map50_95", "box_map50_95")),
    "cifar": (lambda: load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th"))), 0.5,
              lambda: load_data(str(asset("data/cifar10-test-dev.npz"))), 32, ("top1",)),
}
HELD_BACK = 16  # the set's last images: never fitted on, the feature distance is measured there


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("--images", default="64")
    parser.add_argument("--damping", default="1e-3")
    parser.add_argument("--scope", type=Scope, default=Scope.BACKBONE)
    parser.add_argument("--flops", type=float, default=None)
    args = parser.parse_args()
    load, ratio, data, imgsz, metrics = CASES[args.case]
    original, labelled = load(), data()
    images = SyntheticDataset.open(args.synthetic).load()[0]
    held_back = images[-HELD_BACK:].float() / 255
    settings = PruneSettings(None if args.flops else ratio, args.flops, scope=args.scope)
    keep = plan_keep(original, settings, imgsz=imgsz, probe=None, device=CPU)
    chosen = choose(original, settings, keep)
    pruned, _ = prune(original, settings, chosen)
    kept = kept_outputs(original, settings.scope, chosen)
    cost = [model_gflops(m, imgsz) for m in (original, pruned)]

    def row(label: str, model, seconds: float | None) -> None:
        scores = model.evaluate(labelled, imgsz=imgsz, batch=16 if args.case == "yolo" else 500, device=CPU)
        gap = feature_gap(model, original, held_back, scope=settings.scope, device=CPU)
        cells = " / ".join(f"{scores[m]:.3f}" if scores[m] < 1.5 else f"{scores[m]:.2f}" for m in metrics)
        print(f"| {label} | {cells} | {gap:.4f} | {'-' if seconds is None else f'{seconds:.0f} s'} |", flush=True)

    target = f"GFLOPs kept {args.flops}" if args.flops else f"ratio {ratio}"
    print(f"machine: {machine(CPU)}; {args.case}, {target}, {settings.scope}: {cost[0]:.2f} → {cost[1]:.2f} GFLOPs "
          f"({1 - cost[1] / cost[0]:.1%} fewer); synthetic set {args.synthetic}\n")
    print(f"| model | {' / '.join(metrics)} | feature distance (held-back synthetic) | refit time |\n|---|---|---|---|")
    row("original", original, None)
    row("pruned (L1)", pruned, None)
    for count in (int(c) for c in args.images.split(",")):
        for damping in (float(d) for d in args.damping.split(",")):
            student = pruned.with_model(copy.deepcopy(pruned.model))
            start = time.perf_counter()
            reconstruct(student, original, images[: min(count, len(images) - HELD_BACK)], kept=kept, scope=settings.scope, damping=damping,
                        device=CPU)
            row(f"reconstructed, {count} images, damping {damping:g}", student, time.perf_counter() - start)


if __name__ == "__main__":
    main()

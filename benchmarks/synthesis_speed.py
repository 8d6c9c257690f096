"""Synthesis speed (image·iterations per second) and the effect of the half-resolution first phase.

Run on an otherwise idle machine (two jobs on 2 cores slow each other several-fold):

    .venv/bin/python benchmarks/synthesis_speed.py [--device cpu|cuda] > result.md

Needs ../shared/assets. Prints a markdown report; docs/synthesis.md holds the figures measured here.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import asset, machine

from dfbf_cli.adapters import load_model
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.engine.synthesis import synthesize_batch
from dfbf_cli.settings import Precision, SynthesisSettings

YOLO = (str(asset("models/yolo11n-pose.pt")), None)
RESNET56 = ("cifar-resnet56", str(asset("models/cifar10-resnet56.th")))


def run(model, *, imgsz: int, count: int, low: int, full: int, device: torch.device) -> tuple[float, dict]:
    adapter = load_model(*model)
    settings = SynthesisSettings(low_res_iterations=low, iterations=full, class_weight=0.0)
    start = time.perf_counter()
    _, stats = synthesize_batch(adapter.split(), adapter.input_spec, settings, count=count, imgsz=imgsz, seed=0, device=device,
                                precision=resolve_precision(Precision.AUTO, device))
    return time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every iteration count (GPU: try 10)")
    args = parser.parse_args()
    device, k = torch.device(args.device), args.scale
    print(f"machine: {machine(device)}\n")
    print("| model | px | images | iterations | seconds | image·iterations/s |\n|---|---|---|---|---|---|")
    for label, model, imgsz, count, iters in [("yolo11n-pose", YOLO, 320, 8, 20), ("yolo11n-pose", YOLO, 640, 4, 10),
                                              ("CIFAR ResNet-56", RESNET56, 32, 64, 30)]:
        iters = int(iters * k)
        seconds, _ = run(model, imgsz=imgsz, count=count, low=0, full=iters, device=device)
        print(f"| {label} | {imgsz} | {count} | {iters} | {seconds:.1f} | {count * iters / seconds:.1f} |")
    print("\nSame number of steps, all at full resolution vs half of them at half resolution first:\n")
    print("| model | px | images | low-res + full-res steps | seconds | BN loss: noise → result (full res) |\n|---|---|---|---|---|---|")
    for label, model, imgsz, count, n in [("yolo11n-pose", YOLO, 320, 8, 50), ("CIFAR ResNet-56", RESNET56, 32, 64, 100)]:
        n = int(n * k)
        for low, full in [(0, 2 * n), (n, n)]:
            seconds, stats = run(model, imgsz=imgsz, count=count, low=low, full=full, device=device)
            print(f"| {label} | {imgsz} | {count} | {low} + {full} | {seconds:.1f} | {stats['bn_loss_start']:.1f} → {stats['bn_loss_end']:.1f} |")


if __name__ == "__main__":
    main()

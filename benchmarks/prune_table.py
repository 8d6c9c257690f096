"""What structured pruning buys and costs before any fine-tuning (docs/pruning.md).

    .venv/bin/python benchmarks/prune_table.py > result.md

For yolo11n-pose (pose and box mAP50-95 on coco-mini-pose, 640 px) and CIFAR ResNet-56 (top-1 on
cifar10-test-dev.npz) at ratios 0.3 and 0.5: parameters, GFLOPs and CPU latency (batch 1, median,
original and pruned timed interleaved), and the task metric right after pruning.
Run on an otherwise idle machine.
"""

from __future__ import annotations

import torch
from common import asset, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.efficiency import measure_efficiency
from dfbf_cli.engine.pruning import prune
from dfbf_cli.settings import PruneSettings

CASES = [
    ("yolo11n-pose", (str(asset("models/yolo11n-pose.pt")), None), "coco-mini-pose", ("pose_map50_95", "box_map50_95")),
    ("CIFAR ResNet-56", ("cifar-resnet56", str(asset("models/cifar10-resnet56.th"))), "cifar10-test-dev.npz", ("top1",)),
]


def main() -> None:
    device = torch.device("cpu")
    print(f"machine: {machine(device)}\n")
    print("| model | ratio | backbone params | params | GFLOPs | CPU latency (ms) | metric after pruning (no fine-tuning) |")
    print("|---|---|---|---|---|---|---|")
    for label, spec, data_name, metrics in CASES:
        data = load_data(private_copy(data_name) if not data_name.endswith(".npz") else asset(f"data/{data_name}"))
        original = load_model(*spec)
        size = original.input_spec.imgsz
        base = original.evaluate(data, imgsz=size, batch=16 if size > 64 else 500, device=device)
        for ratio in (0.3, 0.5):
            pruned, _ = prune(original, PruneSettings(ratio))
            before, after = measure_efficiency([(original, size), (pruned, size)], device=device, runs=30)
            scores = pruned.evaluate(data, imgsz=size, batch=16 if size > 64 else 500, device=device)
            change = lambda b, a: f"{b:,.3g} → {a:,.3g} (−{1 - a / b:.1%})"  # noqa: E731
            shown = ", ".join(f"{m} {base[m]:.3f} → {scores[m]:.3f}" for m in metrics)
            print(f"| {label} | {ratio} | {change(before.backbone_params, after.backbone_params)} | {change(before.params, after.params)} "
                  f"| {change(before.gflops, after.gflops)} | {change(before.latency_cpu_ms, after.latency_cpu_ms)} | {shown} |")


if __name__ == "__main__":
    main()

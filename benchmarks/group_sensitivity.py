"""Which channel group costs yolo11n-pose the most when pruned alone? (Li et al.'s sensitivity analysis.)

    .venv/bin/python benchmarks/group_sensitivity.py [RATIO] [SYNTHETIC_DIR]   # ≈2 min here

Prunes one group at a time (one-shot L1, RATIO default 0.3, no fine-tuning) and reports pose / box
mAP50-95 on coco-mini-pose at 640 px and the GFLOPs saved. With SYNTHETIC_DIR, also the data-free
proxy that progressive pruning uses: the relative change of the backbone's outputs on 8 synthetic
images at 160 px, to see whether it ranks the groups as real mAP does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import asset, machine, private_copy, pruned_with_ratios

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.efficiency import gflops
from dfbf_cli.engine.progressive import PROBE_MAX_IMGSZ, OutputImpact
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import ProgressiveSettings, PruneSettings

CPU = torch.device("cpu")


def main(ratio: float, synthetic: Path | None) -> None:
    original = load_model(str(asset("models/yolo11n-pose.pt")))
    data = load_data(private_copy("coco-mini-pose"))
    example = torch.zeros(1, 3, 640, 640)
    base = gflops(original.model, example)
    impact = None
    if synthetic is not None:
        probe = torch.nn.functional.interpolate(SyntheticDataset.open(synthetic).probe(8).float(), size=PROBE_MAX_IMGSZ, mode="bilinear", antialias=True)
        impact = OutputImpact(original.split(), probe, ProgressiveSettings(alpha=1.0), original.input_spec.normalize, seed=0)
    print(f"machine: {machine(CPU)}; each group pruned alone at {ratio}, no fine-tuning\n")
    print("| group | channels | GFLOPs | pose / box mAP50-95 | output change on synthetic images |\n|---|---|---|---|---|")
    metrics = original.evaluate(data, imgsz=640, batch=16, device=CPU)
    print(f"| none | - | - | {metrics['pose_map50_95']:.3f} / {metrics['box_map50_95']:.3f} | - |")
    for group in original.channel_groups():
        student = pruned_with_ratios(original, lambda g: ratio if g.name == group.name else 0.0)  # noqa: B023 (used at once)
        metrics = student.evaluate(data, imgsz=640, batch=16, device=CPU)
        change = "-"
        if impact is not None:
            change = f"{impact.score(student.split().backbone):.3f}"
        print(f"| {group.name} | {group.size} → {PruneSettings(ratio).keep_count(group.size)} | {gflops(student.model, example) / base - 1:+.1%} "
              f"| {metrics['pose_map50_95']:.3f} / {metrics['box_map50_95']:.3f} | {change} |", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.3, Path(sys.argv[2]) if len(sys.argv) > 2 else None)

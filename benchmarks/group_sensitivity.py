"""Which channel group costs yolo11n-pose the most when pruned alone, and does the data-free measure
that `--allocation sensitivity` uses rank the groups as real data does?

    .venv/bin/python benchmarks/group_sensitivity.py SYNTHETIC_DIR [--scope trunk] [--ratio 0.5]   # ≈2 min here (backbone)

Prunes one group at a time (one-shot L1, no fine-tuning) and reports, per group: the GFLOPs saved at
640 px, pose / box mAP50-95 on coco-mini-pose, the real cost per GFLOP saved (pose mAP lost / GFLOPs),
and the allocation's own data-free cost per GFLOP (engine.pruning.group_costs: the feature distance to
the original on 8 of the synthetic images). The last line is the Spearman rank correlation of the two costs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import asset, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.pruning import FlopModel, channel_scores, cut, group_costs, select_channels
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import PruneSettings, Scope

CPU = torch.device("cpu")


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    for rank, index in enumerate(order):
        result[index] = float(rank)
    return result


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    return covariance / (sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb)) ** 0.5


def main(synthetic: Path, scope: Scope, ratio: float) -> None:
    original = load_model(str(asset("models/yolo11n-pose.pt")))
    data = load_data(private_copy("coco-mini-pose"))
    settings = PruneSettings(ratio, scope=scope)
    groups = original.channel_groups(scope)
    flops = FlopModel(original.model, groups, torch.zeros(1, 3, 640, 640))
    proxy = group_costs(original, groups, SyntheticDataset.open(synthetic).probe(8), flops, settings, device=CPU)
    base = original.evaluate(data, imgsz=640, batch=16, device=CPU)
    print(f"machine: {machine(CPU)}; scope {scope}; each group pruned alone at {ratio}, no fine-tuning\n")
    print(f"unpruned: pose / box mAP50-95 {base['pose_map50_95']:.3f} / {base['box_map50_95']:.3f}, {flops.gflops({}):.2f} GFLOPs\n")
    print("| group | channels | GFLOPs saved | pose / box mAP50-95 | real cost (pose mAP / GFLOP) | data-free cost (distance / GFLOP) |")
    print("|---|---|---|---|---|---|")
    real, free = [], []
    scores = channel_scores(original, groups, settings.criterion, None)
    for group in groups:
        if group.name not in proxy:
            continue
        keep = settings.keep_count(group.size)
        metrics = cut(original, groups, select_channels(scores, {group.name: keep})).evaluate(data, imgsz=640, batch=16, device=CPU)
        saved = flops.gflops({}) - flops.gflops({group.name: keep})
        real.append((base["pose_map50_95"] - metrics["pose_map50_95"]) / saved)
        free.append(proxy[group.name])
        print(f"| {group.name} | {group.size} → {keep} | {saved:.3f} | {metrics['pose_map50_95']:.3f} / {metrics['box_map50_95']:.3f} "
              f"| {real[-1]:.3f} | {free[-1]:.3f} |", flush=True)
    print(f"\nSpearman rank correlation of the two costs over {len(real)} groups: {spearman(real, free):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("--scope", type=Scope, default=Scope.TRUNK)
    parser.add_argument("--ratio", type=float, default=0.5)
    arguments = parser.parse_args()
    main(arguments.synthetic, arguments.scope, arguments.ratio)

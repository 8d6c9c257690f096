"""How far is a fine-tuned student from its teacher on images it never saw? A label-free yardstick.

    .venv/bin/python benchmarks/feature_gap.py STUDENT.pt [...] --synthetic DIR [...]   # ≈ 1 min per model here

For each student (a pruned or fine-tuned yolo11n-pose), the fine-tuning objective itself (L1 between
student and teacher at the feature taps, weights rising with depth, both models in eval mode, no
augmentation) on each synthetic set given and on the 150 real photos at 320 and 640 px. A student
that reproduces its training images but not new synthetic ones has overfitted its set; one that
reproduces synthetic images but not photos is limited by how unlike real images they are. Steadier
than coco-mini-pose's 28-image mAP, which moves by a few hundredths between equal runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import as_uint8, asset, machine

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.features import FeatureTaps, tap_weights, weighted_distance
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import Distance, TapWeighting

CPU = torch.device("cpu")
BATCH = 32


@torch.no_grad()
def tap_features(adapter: ModelAdapter, images: torch.Tensor) -> list[list[torch.Tensor]]:
    """The feature taps' outputs for ``images`` (uint8 N×3×H×W), batch by batch."""
    split = adapter.split()
    split.backbone.eval()
    batches = []
    with FeatureTaps(adapter.model, split.feature_taps) as taps:
        for start in range(0, len(images), BATCH):
            split.backbone(adapter.input_spec.normalize(images[start : start + BATCH].float().div(255)))
            batches.append(taps.take())
    return batches


def feature_gap(student: list[list[torch.Tensor]], teacher: list[list[torch.Tensor]]) -> tuple[float, list[float]]:
    """(weighted L1 as fine-tuning weighs it, L1 per tap), averaged over the batches."""
    weights = tap_weights(TapWeighting.LINEAR, len(student[0]))
    per_tap = torch.stack([weighted_distance(sb, tb, weights, Distance.L1)[1] for sb, tb in zip(student, teacher)]).mean(0)
    return float((torch.tensor(weights) * per_tap).sum()), per_tap.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("students", nargs="+", type=Path)
    parser.add_argument("--synthetic", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    teacher = load_model(str(asset("models/yolo11n-pose.pt")))
    photos = load_data(asset("data/photos"))
    sets = {str(d): SyntheticDataset.open(d).load()[0] for d in args.synthetic}
    sets |= {f"150 photos, {size} px": as_uint8(photos, size) for size in (320, 640)}
    targets = {name: tap_features(teacher, images) for name, images in sets.items()}
    print(f"machine: {machine(CPU)}\n\nfeature loss (per tap, shallow to deep)\n")
    print("| student | " + " | ".join(sets) + " |\n" + "|---" * (len(sets) + 1) + "|")
    for path in args.students:
        student = teacher.reload(path)
        cells = []
        for name, images in sets.items():
            total, per_tap = feature_gap(tap_features(student, images), targets[name])
            cells.append(f"{total:.4f} ({' / '.join(f'{v:.3f}' for v in per_tap)})")
        print(f"| {path} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

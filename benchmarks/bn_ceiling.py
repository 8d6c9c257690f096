"""How much do an image set's BatchNorm statistics cost the model? A ceiling for train-mode fine-tuning.

    .venv/bin/python benchmarks/bn_ceiling.py [SYNTHETIC_DIR ...] [--images N]   # ≈ 10 s per set here

The unpruned yolo11n-pose gets its backbone's BatchNorm statistics re-estimated on each image set
(train-mode passes in batches of 32, cumulative average: what fine-tuning with train-mode
BatchNorm leaves in the student) and is scored on coco-mini-pose at 640 px. The 150 real photos at
320 px are always included for scale. Synthetic images whose statistics match the original's
training data score like the original; the gap is what no amount of fine-tuning on them recovers.
(Recomputing every layer's statistics in one eval-mode pass instead is wrong: each layer's new
statistics change the next layer's inputs. That mistake scores 0.000 even on the evaluation images.)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from common import as_uint8, asset, machine, private_copy
from torch import nn

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

CPU = torch.device("cpu")
BATCH = 32


@torch.no_grad()
def reestimated(original: ModelAdapter, images: torch.Tensor) -> ModelAdapter:
    """A copy of ``original`` whose backbone BatchNorm statistics are those of ``images`` (uint8 N×3×H×W)."""
    adapter = original.with_model(copy.deepcopy(original.model).eval())
    backbone = adapter.split().backbone
    for layer in backbone.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the batches
    backbone.train()
    for start in range(0, len(images) - BATCH + 1, BATCH):
        backbone(adapter.input_spec.normalize(images[start : start + BATCH].float().div(255)))
    adapter.model.eval()
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("synthetic", nargs="*", type=Path)
    parser.add_argument("--images", type=int, help="use the first N images of each set")
    args = parser.parse_args()
    original = load_model(str(asset("models/yolo11n-pose.pt")))
    labelled = load_data(private_copy("coco-mini-pose"))
    photos = as_uint8(load_data(asset("data/photos")), 320)
    sets = {"150 real photos, 320 px": photos} | {str(d): SyntheticDataset.open(d).load()[0] for d in args.synthetic}
    print(f"machine: {machine(CPU)}\n\n| statistics from | images | pose / box mAP50-95 |\n|---|---|---|")
    metrics = original.evaluate(labelled, imgsz=640, batch=16, device=CPU)
    print(f"| the original's own | - | {metrics['pose_map50_95']:.3f} / {metrics['box_map50_95']:.3f} |")
    for name, images in sets.items():
        images = images[: args.images]
        metrics = reestimated(original, images).evaluate(labelled, imgsz=640, batch=16, device=CPU)
        print(f"| {name} | {len(images)} | {metrics['pose_map50_95']:.3f} / {metrics['box_map50_95']:.3f} |")


if __name__ == "__main__":
    main()

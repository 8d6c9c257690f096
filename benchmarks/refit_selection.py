"""What to cut, and in how many steps, when a closed-form refit follows: docs/reconstruct.md's selection table.

    .venv/bin/python benchmarks/refit_selection.py cifar SYNTHETIC_DIR [--rows oneshot rounds2 rounds4 progressive energy]
    .venv/bin/python benchmarks/refit_selection.py yolo|person SYNTHETIC_DIR --rows oneshot energy

Every row ends at the same size (the one-shot counts of ratio 0.5 for ResNet-56, 0.3 for yolo11n-pose,
backbone) and is refit by dfbf's reconstruction on the set's first 128 images; no fine-tuning.
``oneshot``: L1 selection, one refit (``dfbf prune --reconstruct --criterion l1``). ``roundsK``: K rounds of L1 selection
on the current (refit) weights, each followed by a refit against the original. ``progressive``: Paoding's
search with its merges (``--strategy progressive``), scored before and after the refit. ``energy``: ``dfbf prune --criterion
energy --reconstruct``: per group the channels whose
contribution to their consumers' outputs carries the most energy on the synthetic images (E[a²]·‖W[:, c]‖²
summed over consumers: a first-order ThiNet), then the refit. Scores: the task metric, then the adapter's
robustness metrics (classifiers: FGSM ε 0.01 / 0.05 and Gaussian noise σ 0.05; YOLO: under noise).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import asset, machine, private_copy
from torch import nn

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine import progressive
from dfbf_cli.engine.compress import round_keep
from dfbf_cli.engine.pruning import choose, kept_output_indices, kept_outputs, plan_keep, prune
from dfbf_cli.engine.reconstruct import reconstruct
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import Criterion, ProgressiveSettings, PruneSettings

CPU = torch.device("cpu")
REFIT_IMAGES, DAMPING = 128, 1e-3
CASES = {
    "cifar": (lambda: load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th"))), 0.5,
              lambda: load_data(str(asset("data/cifar10-test-dev.npz"))), 32, 500),
    "yolo": (lambda: load_model(str(asset("models/yolo11n-pose.pt"))), 0.3, lambda: load_data(private_copy("coco-mini-pose")), 640, 16),
    "person": (lambda: load_model(str(asset("models/yolo11n-person.pt"))), 0.3, lambda: load_data(private_copy("coco-mini-person")), 640, 16),
}


def students_for(row: str, original: ModelAdapter, settings: PruneSettings, keep: dict[str, int],
                 images: torch.Tensor) -> list[tuple[str, ModelAdapter]]:
    """The row's refit model (and, for ``progressive``, the pruned one before its refit), labelled."""
    def refit(student: ModelAdapter, kept: dict[str, torch.Tensor]) -> ModelAdapter:
        reconstruct(student, original, images, kept=kept, scope=settings.scope, damping=DAMPING, device=CPU)
        return student

    groups = original.channel_groups(settings.scope)
    if row in ("oneshot", "energy"):  # dfbf prune --reconstruct --criterion l1 | energy
        selecting = replace(settings, criterion=Criterion.ENERGY if row == "energy" else Criterion.L1)
        chosen = choose(original, selecting, keep, images.float() / 255 if row == "energy" else None)
        return [(row, refit(prune(original, selecting, chosen)[0], kept_outputs(original, settings.scope, chosen)))]
    if row == "progressive":
        cuts: dict[str, torch.Tensor] = {}
        cutter = progressive.apply_pruning

        def recording(model: nn.Module, groups, kept: dict[str, torch.Tensor]) -> None:  # which of the original's channels survive
            cuts.update(kept_output_indices(model, groups, kept))
            cutter(model, groups, kept)

        progressive.apply_pruning = recording
        try:
            student, _ = progressive.progressive_prune(original, settings, keep, ProgressiveSettings(), images.float() / 255, seed=0)
        finally:
            progressive.apply_pruning = cutter
        unrefit = student.with_model(copy.deepcopy(student.model))
        return [("progressive, not refit", unrefit), (row, refit(student, cuts))]
    rounds, student, kept = int(row.removeprefix("rounds")), original, {}
    sizes = {g.name: g.size for g in groups}
    for k in range(1, rounds + 1):
        counts = round_keep(sizes, keep, k, rounds)
        chosen = choose(student, settings, counts)
        now = kept_outputs(student, settings.scope, chosen)  # indices into the current student's channels
        kept = {name: kept[name][index] if name in kept else index for name, index in now.items()} | {n: i for n, i in kept.items() if n not in now}
        student = refit(prune(student, settings, chosen)[0], kept)
    return [(row, student)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("--rows", nargs="+", default=["oneshot", "rounds2", "rounds4", "progressive", "energy"])
    parser.add_argument("--first", type=int, default=0, help="index of the first image used: another 128 of a larger set are another draw")
    args = parser.parse_args()
    unknown = [row for row in args.rows if not re.fullmatch(r"oneshot|progressive|energy|rounds[1-9][0-9]*", row)]
    if unknown:
        parser.error(f"unknown rows {unknown}: oneshot, progressive, energy or roundsK")
    load, ratio, data, imgsz, batch = CASES[args.case]
    original, labelled = load(), data()
    images = SyntheticDataset.open(args.synthetic).load()[0][args.first : args.first + REFIT_IMAGES]
    settings = PruneSettings(ratio)
    keep = plan_keep(original, settings, imgsz=imgsz, probe=None, device=CPU)
    last = args.first + len(images) - 1
    print(f"machine: {machine(CPU)}; {args.case}, ratio {ratio}, {settings.scope}; refit on images {args.first}-{last} of {args.synthetic}")
    for row in args.rows:
        started = time.perf_counter()
        made = students_for(row, original, settings, keep, images)
        seconds = time.perf_counter() - started  # the whole row: the search and its refit
        for label, student in made:
            scores = {**student.evaluate(labelled, imgsz=imgsz, batch=batch, device=CPU), **student.robustness(labelled, imgsz=imgsz, batch=batch, device=CPU)}
            print(json.dumps({"row": label, "seconds": round(seconds, 1), **{k: round(v, 4) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()

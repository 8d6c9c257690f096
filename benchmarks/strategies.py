"""One-shot L1 vs progressive (Paoding-style) pruning at the same size, before and after DFBF fine-tuning.

    .venv/bin/python benchmarks/strategies.py cifar SYNTHETIC_DIR [EPOCHS]  # ResNet-56 at 0.3 and 0.5, cifar10-test-dev
    .venv/bin/python benchmarks/strategies.py yolo SYNTHETIC_DIR [EPOCHS]   # yolo11n-pose at 0.3, coco-mini-pose

SYNTHETIC_DIR: a synthetic dataset of that model (e.g. the run directory's synthetic/ from
benchmarks/recovery.py). Clean and robust metrics (classifier: FGSM ε 0.01/0.05 and Gaussian noise
σ 0.05; YOLO: Gaussian noise σ 0.05), with the time each pruning and fine-tuning took. EPOCHS of
fine-tuning default to 10 (where ResNet-56's recovery plateaus, docs/finetune.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from common import asset, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.finetune import finetune
from dfbf_cli.engine.progressive import progressive_prune
from dfbf_cli.engine.pruning import choose, plan_keep, prune
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import FinetuneSettings, ProgressiveSettings, PruneSettings, Scope, Strategy

CPU = torch.device("cpu")


def main(kind: str, synthetic: Path, epochs: int) -> None:
    if kind == "cifar":
        original = load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th")))
        data, ratios, batch = load_data(asset("data/cifar10-test-dev.npz")), (0.3, 0.5), 1000
        shown = ("top1", "top1_fgsm_0.01", "top1_fgsm_0.05", "top1_noise_0.05")
    else:
        original = load_model(str(asset("models/yolo11n-pose.pt")))
        data, ratios, batch = load_data(private_copy("coco-mini-pose")), (0.3,), 16
        shown = ("pose_map50_95", "pose_map50_95_noise_0.05", "box_map50_95", "box_map50_95_noise_0.05")
    dataset = SyntheticDataset.open(synthetic)
    dataset.check_teacher(original.fingerprint(), allow_mismatch=False)
    images, _ = dataset.load()
    probe = dataset.probe(ProgressiveSettings.probe_images)
    size = original.input_spec.imgsz

    def scores(adapter) -> str:
        metrics = adapter.evaluate(data, imgsz=size, batch=batch, device=CPU) | adapter.robustness(data, imgsz=size, batch=batch, device=CPU)
        return " / ".join(f"{metrics[m]:.2f}" if m.startswith("top") else f"{metrics[m]:.3f}" for m in shown)

    print(f"machine: {machine(CPU)}; metrics: {' / '.join(shown)}; fine-tuning: {epochs} epochs on {len(images)} synthetic images\n")
    print("| model | ratio | strategy | pruning time | after pruning | fine-tuning time | after DFBF fine-tuning |\n|---|---|---|---|---|---|---|")
    print(f"| {original.name} | 0 | unpruned | - | {scores(original)} | - | - |")
    for ratio in ratios:
        settings = PruneSettings(ratio)
        keep = plan_keep(original, settings, imgsz=size, probe=None, device=CPU)
        for strategy in Strategy:
            start = time.perf_counter()
            if strategy == Strategy.PROGRESSIVE:
                pruned, _ = progressive_prune(original, settings, keep, ProgressiveSettings(), probe, seed=0)
            else:
                pruned, _ = prune(original, settings, choose(original, settings, keep))
            prune_seconds = time.perf_counter() - start
            before = scores(pruned)
            start = time.perf_counter()
            state = Path(tempfile.mkdtemp()) / "state.pt"
            finetune(pruned, original, images, settings=FinetuneSettings(epochs=epochs), scope=Scope.BACKBONE, device=CPU, seed=0, state_path=state)
            minutes = (time.perf_counter() - start) / 60
            print(f"| {original.name} | {ratio} | {strategy} | {prune_seconds:.1f} s | {before} | {minutes:.1f} min | {scores(pruned)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 10)

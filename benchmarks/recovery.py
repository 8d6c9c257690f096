"""Does dfbf recover a pruned model without data? The quality table of docs/benchmarks.md.

    .venv/bin/python benchmarks/recovery.py cifar     # CIFAR ResNet-56, ratio 0.5 (≈15 min here)
    .venv/bin/python benchmarks/recovery.py yolo      # yolo11n-pose, ratio 0.3 (≈90 min here)

Columns: unpruned | pruned, no fine-tune | `dfbf compress` (balanced preset, run as a user would, timed)
| control: the same fine-tune on Gaussian-noise images | upper bound: the same fine-tune on as many
real images. CIFAR: the dev file is split in two class-balanced halves: the upper bound trains on
half A, every column is scored on half B. YOLO: scored on coco-mini-pose; the upper bound trains on
the real photos in shared/assets/data/photos, and agreement with the teacher is measured on them.
Run on an otherwise idle machine: the compress time is part of the result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import as_uint8, asset, cifar_dev_halves, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.finetune import finetune
from dfbf_cli.settings import PRESETS, FinetuneSettings, Scope

CPU = torch.device("cpu")
WORK = Path(tempfile.mkdtemp(prefix="dfbf-recovery-"))


def compress(*args: str) -> tuple[dict, float]:
    """``dfbf compress`` in a fresh process, as a user runs it; its report.json and wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dfbf_cli", "compress", *args, "--out", str(WORK / "run"), "--device", "cpu", "-q"], check=True)
    return json.loads((WORK / "run" / "report.json").read_text()), time.perf_counter() - start


def finetuned_on(images: torch.Tensor, original: ModelAdapter, epochs: int, tag: str) -> tuple[ModelAdapter, float]:
    """The pruned model of the compress run, fine-tuned exactly as compress does, on other images."""
    student = original.reload(WORK / "run" / f"pruned{original.default_suffix}")
    start = time.perf_counter()
    finetune(student, original, images, settings=FinetuneSettings(epochs=epochs), scope=Scope.BACKBONE, device=CPU, seed=0,
             state_path=WORK / f"{tag}.pt")
    return student, time.perf_counter() - start


def gaussian_noise_like(images: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 64 + 128
    return noise.clamp(0, 255).to(torch.uint8)


def cifar() -> None:
    weights = str(asset("models/cifar10-resnet56.th"))
    x, half_a, half_b = cifar_dev_halves(WORK)
    report, seconds = compress("cifar-resnet56", "--weights", weights, "--ratio", "0.5", "--data", str(half_b))
    top1 = {stage: report["models"][stage]["metrics"]["top1"] for stage in ("original", "pruned", "compressed")}
    original = load_model("cifar-resnet56", weights)
    count = PRESETS["balanced"].num_images(32)
    epochs = PRESETS["balanced"].epochs(count, FinetuneSettings.batch, 32)
    real = torch.from_numpy(x[np.random.default_rng(0).choice(half_a, count, replace=False)]).permute(0, 3, 1, 2).contiguous()
    data_b = load_data(half_b)
    scores = {}
    for tag, images in (("noise", gaussian_noise_like(real)), ("real", real)):
        model, _ = finetuned_on(images, original, epochs, tag)
        scores[tag] = model.evaluate(data_b, imgsz=32, batch=500, device=CPU)["top1"]
    print(f"| CIFAR ResNet-56, ratio 0.5, top-1 % on half B (2,500 images) | {top1['original']:.2f} | {top1['pruned']:.2f} "
          f"| **{top1['compressed']:.2f}** ({seconds / 60:.1f} min) | {scores['noise']:.2f} | {scores['real']:.2f} |")


def yolo() -> None:
    model = str(asset("models/yolo11n-pose.pt"))
    data = private_copy("coco-mini-pose")
    report, seconds = compress(model, "--ratio", "0.3", "--data", str(data))
    original = load_model(model)
    run = WORK / "run"
    preset = PRESETS["balanced"]
    size = preset.imgsz(original.input_spec.imgsz)
    epochs = preset.epochs(preset.num_images(size), FinetuneSettings.batch, size)
    photos = load_data(asset("data/photos"))
    real = as_uint8(photos, size)[: preset.num_images(size)]
    models = {"original": original, "pruned": original.reload(run / "pruned.pt"), "compressed": original.reload(run / "compressed.pt")}
    for tag, images in (("noise", gaussian_noise_like(real)), ("real photos", real)):
        models[tag], _ = finetuned_on(images, original, epochs, tag.split()[0])
    labelled = load_data(data)
    cells = []
    for tag, adapter in models.items():
        metrics = adapter.evaluate(labelled, imgsz=640, batch=16, device=CPU)
        agreement = adapter.agreement(original, photos, imgsz=640, batch=16, device=CPU)
        cell = f"{metrics['pose_map50_95']:.3f} / {metrics['box_map50_95']:.3f} / {agreement['agreement_pose_map50_95']:.3f}"
        cells.append(f"**{cell}** ({seconds / 60:.1f} min)" if tag == "compressed" else cell)
    print("| yolo11n-pose, ratio 0.3: pose / box mAP50-95 on coco-mini-pose / pose agreement with the teacher on 150 photos | " + " | ".join(cells) + " |")
    print(f"\n(the compress run's own report: {json.dumps({k: v['metrics'] for k, v in report['models'].items()})})")


if __name__ == "__main__":
    print(f"machine: {machine(CPU)}\n")
    print("| case | unpruned | pruned, no fine-tune | dfbf compress (balanced) | control: fine-tune on Gaussian noise "
          "| upper bound: fine-tune on real images |")
    print("|---|---|---|---|---|---|")
    {"cifar": cifar, "yolo": yolo}[sys.argv[1]]()

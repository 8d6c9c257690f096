"""Helpers shared by the benchmark scripts: where the assets are, and a private copy of YOLO datasets."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dfbf_cli.contract import ChannelGroup, ImageFolder, ModelAdapter
from dfbf_cli.engine.pruning import channel_scores, cut, select_channels
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.settings import Criterion, Precision, PruneSettings

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def asset(relative: str) -> Path:
    path = ASSETS / relative
    if not path.exists():
        sys.exit(f"needs {path}: run on a machine with the project's shared assets")
    return path


def private_copy(dataset: str) -> Path:
    """Copy a small YOLO dataset to a temporary folder (Ultralytics writes label caches beside it)."""
    target = Path(tempfile.mkdtemp(prefix="dfbf-bench-")) / dataset
    shutil.copytree(asset(f"data/{dataset}"), target)
    return target / "data.yaml"


def as_uint8(photos: ImageFolder, size: int) -> torch.Tensor:
    """A folder of photos as uint8 N×3×size×size images, the form synthetic datasets hold."""
    return (torch.cat(list(photos.batches(size, 32))) * 255).round().to(torch.uint8)


def machine(device: torch.device) -> str:
    """The device, and the arithmetic ``--precision auto`` gives there."""
    arithmetic = "bf16 autocast" if resolve_precision(Precision.AUTO, device) == "bf16" else "fp32"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {arithmetic}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {arithmetic}"


def cifar_dev_halves(folder: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """The dev file's images and half A's indices (class-balanced), with half B saved as folder/half_b.npz
    (fine-tune on A, score on B)."""
    with np.load(asset("data/cifar10-test-dev.npz")) as archive:
        x, y = archive["x"], archive["y"]
    half_a = np.concatenate([np.flatnonzero(y == c)[: (y == c).sum() // 2] for c in range(10)])
    half_b = np.setdiff1d(np.arange(len(y)), half_a)
    np.savez(folder / "half_b.npz", x=x[half_b], y=y[half_b])
    return x, half_a, folder / "half_b.npz"


def pruned_with_ratios(original: ModelAdapter, ratio_of: Callable[[ChannelGroup], float]) -> ModelAdapter:
    """A copy of the model, each channel group pruned (one-shot L1) at its own ratio: for experiments
    on where to prune, which the product's uniform / layer-dependent schedules do not express."""
    groups = original.channel_groups()
    keep = {g.name: PruneSettings(ratio_of(g)).keep_count(g.size) for g in groups}
    return cut(original, groups, select_channels(channel_scores(original, groups, Criterion.L1, None), keep))


def yolo_val_openvino(model, fp32: Path, data: Path) -> dict[str, float]:
    """An OpenVINO model (``ov.Model``) of the YOLO exported to ``fp32``, scored by stock Ultralytics on ``data`` (square
    640-px inputs, batch 1): its mAP50-95 figures ×100."""
    import openvino as ov
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model_openvino_model"
        folder.mkdir()
        ov.save_model(model, folder / "model.xml", compress_to_fp16=False)
        shutil.copy(fp32 / "metadata.yaml", folder / "metadata.yaml")
        metrics = YOLO(str(folder)).val(data=str(data), imgsz=640, batch=1, rect=False, plots=False, verbose=False, workers=0).results_dict
    return {k: round(v * 100, 2) for k, v in metrics.items() if "mAP50-95" in k}


PARETO_RESULTS = Path("/tmp/dfbf-pareto/results.jsonl")  # benchmarks/pareto.py's, which levers.py and int8.py add to


def append_point(results: Path, point: dict, device: torch.device) -> None:
    """One measured point of the Pareto plot, with the machine it was measured on, appended to ``results``."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as file:
        file.write(json.dumps({**point, "machine": machine(device)}) + "\n")
    print(json.dumps(point), flush=True)

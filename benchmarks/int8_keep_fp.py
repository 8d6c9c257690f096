"""Which parts of a YOLO model to keep in floating point in its INT8 export: docs/export.md, "What stays in FP".

    .venv/bin/python benchmarks/int8_keep_fp.py FP32_OPENVINO_DIR SYNTHETIC_DIR DATA_YAML [--variants mixed pose-branch ...]

FP32_OPENVINO_DIR: a fixed-shape FP32 OpenVINO export of a YOLO model (``dfbf export MODEL --format openvino``);
SYNTHETIC_DIR: the calibration set ``dfbf export --int8`` makes at the export's size. Every variant is NNCF's
mixed preset calibrated on the set less its held-out quarter (as dfbf's export does), the detection head's
decode in FP (dfbf's ``mixed`` recipe), and in FP besides: ``mixed`` nothing; ``outputs`` the output layers
(dfbf's ``outputs-fp``); ``pose-branch`` every convolution of the keypoint branch (``cv4``); ``box-branch`` the
box branch (``cv2``); ``first`` the first convolution; ``head.PATTERN`` the head's convolutions whose names continue with PATTERN
(``head.cv4.0.`` the keypoint branch at stride 8); ``bias`` full bias correction instead of fast. Variants
combine with ``+`` (``pose-branch+first``). Scored by Ultralytics' validator on DATA_YAML (square 640-px inputs,
batch 1), then timed (batch 1, median of three blocks of 30 passes, the variants in turn). Prints a JSON line
per variant and one of latencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from common import machine, yolo_val_openvino

from dfbf_cli.adapters.yolo_export import decode_ops
from dfbf_cli.engine.export import held_out_split
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.int8 import WEIGHTED_OPS, output_layers

PARTS = {"pose-branch": ".cv4.", "box-branch": ".cv2.", "class-branch": ".cv3."}


def in_fp(model, part: str) -> list[str]:
    """The operations variant part ``part`` keeps in FP (besides the decode)."""
    if part in ("mixed", "bias"):
        return []
    if part == "outputs":
        return output_layers(model, decode_ops(model))
    weighted = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in WEIGHTED_OPS]
    if part == "first":
        return weighted[:1]
    head = decode_ops(model)[0].split("/", 1)[0]
    pattern = part.removeprefix("head") if part.startswith("head.") else PARTS[part]
    return [name for name in weighted if name.startswith(head + pattern)]


def main() -> None:
    import nncf
    import openvino as ov
    import torch
    import torch.nn.functional as F

    parser = argparse.ArgumentParser()
    parser.add_argument("fp32", type=Path)
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--variants", nargs="+", default=["mixed", "pose-branch", "first", "pose-branch+first", "bias+pose-branch"])
    args = parser.parse_args()
    nncf.set_log_level(logging.WARNING)
    core, model = ov.Core(), ov.Core().read_model(args.fp32 / "model.xml")
    images, _ = SyntheticDataset.open(args.synthetic).load()
    calibration, _ = held_out_split(images)
    samples = [(F.interpolate(t[None].float(), size=(640, 640), mode="bilinear", antialias=True) / 255).numpy() for t in calibration]  # as the export resizes
    x = np.zeros((1, 3, 640, 640), np.float32)
    compiled = {}
    print(f"machine: {machine(torch.device('cpu'))}; {args.fp32}, {len(calibration)} calibration images of {args.synthetic}")
    for variant in ["fp32", *args.variants]:
        parts = variant.split("+")
        kept = sorted({name for part in parts for name in in_fp(model, part)}) if variant != "fp32" else []
        started = time.perf_counter()
        if variant == "fp32":
            quantized = model
        else:
            ignored = nncf.IgnoredScope(names=[*decode_ops(model), *kept], validate=False)
            quantized = nncf.quantize(model, nncf.Dataset(samples), preset=nncf.QuantizationPreset.MIXED, subset_size=len(samples),
                                      fast_bias_correction="bias" not in parts, ignored_scope=ignored)
        seconds = time.perf_counter() - started
        compiled[variant] = core.compile_model(quantized, "CPU")
        print(json.dumps({"variant": variant, "fp_convolutions": len(kept), "quantize_s": round(seconds),
                          **yolo_val_openvino(quantized, args.fp32, args.data)}), flush=True)
    times: dict[str, list[float]] = {variant: [] for variant in compiled}
    for _ in range(3):  # blocks of 30 passes, variants in turn: drifts in the machine's speed hit every variant alike
        for variant, model_ in compiled.items():
            for _ in range(5):
                model_(x)
            for _ in range(30):
                started = time.perf_counter()
                model_(x)
                times[variant].append(time.perf_counter() - started)
    print(json.dumps({"median_latency_ms": {variant: round(1000 * float(np.median(t)), 1) for variant, t in times.items()}}), flush=True)


if __name__ == "__main__":
    main()

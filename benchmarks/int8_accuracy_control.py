"""NNCF's accuracy-controlled INT8 with a data-free metric: docs/export.md, "Accuracy control without labels".

    .venv/bin/python benchmarks/int8_accuracy_control.py FP32_OPENVINO_DIR SYNTHETIC_DIR DATA_YAML [--iterations 8]

FP32_OPENVINO_DIR: a fixed-shape FP32 OpenVINO export of a YOLO model (``dfbf export MODEL --format openvino``);
SYNTHETIC_DIR: the calibration set ``dfbf export --int8`` makes at the export's size. NNCF's mixed preset
calibrates on the set less its held-out quarter (as dfbf's export does), with the detection head's decode in FP
(Ultralytics' choice, dfbf's ``mixed`` recipe); then ``nncf.quantize_with_accuracy_control`` reverts up to
``--iterations`` rounds of the operations whose INT8 copy moves the raw outputs most, the metric being the
agreement of the raw outputs with FP32 (1 − mean |INT8 − FP32| / mean |FP32|) on all the set's images. Both
models are then scored by Ultralytics' validator on DATA_YAML (square 640-px inputs, batch 1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import machine, yolo_val_openvino

from dfbf_cli.adapters.yolo_export import decode_ops
from dfbf_cli.engine.export import held_out_split
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset


def main() -> None:
    import nncf
    import openvino as ov
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("fp32", type=Path)
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--iterations", type=int, default=8)
    args = parser.parse_args()
    core, model = ov.Core(), ov.Core().read_model(args.fp32 / "model.xml")
    images, _ = SyntheticDataset.open(args.synthetic).load()
    calibration, _ = held_out_split(images)
    as_input = lambda batch: [(t[None].float() / 255).numpy() for t in batch]  # noqa: E731
    reference_model = core.compile_model(model, "CPU")
    scored = as_input(images)
    reference = [reference_model(x)[0] for x in scored]
    scale = float(np.mean([np.abs(r).mean() for r in reference]))

    def agreement(compiled, items) -> tuple[float, list[float]]:
        per_image = [1 - float(np.abs(compiled(x)[0] - r).mean()) / scale for x, r in zip(items, reference)]
        return float(np.mean(per_image)), per_image

    decode = nncf.IgnoredScope(names=decode_ops(model), validate=False)
    common = {"preset": nncf.QuantizationPreset.MIXED, "subset_size": len(calibration), "ignored_scope": decode}
    print(f"machine: {machine(torch.device('cpu'))}; {args.fp32}, {len(calibration)} calibration images of {args.synthetic}")
    for label in ("mixed", "accuracy control"):
        started = time.perf_counter()
        if label == "mixed":
            quantized = nncf.quantize(model, nncf.Dataset(as_input(calibration)), **common)
        else:
            restorer = nncf.AdvancedAccuracyRestorerParameters(max_num_iterations=args.iterations, ranking_subset_size=len(scored))
            quantized = nncf.quantize_with_accuracy_control(model, nncf.Dataset(as_input(calibration)), nncf.Dataset(scored), validation_fn=agreement,
                                                            max_drop=0.0, drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer,
                                                            **common)
        seconds = time.perf_counter() - started
        print(json.dumps({"recipe": label, "seconds": round(seconds), "agreement": round(agreement(core.compile_model(quantized, "CPU"), scored)[0], 5),
                          **yolo_val_openvino(quantized, args.fp32, args.data)}), flush=True)


if __name__ == "__main__":
    main()

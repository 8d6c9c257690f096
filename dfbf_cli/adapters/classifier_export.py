"""Classifiers in an inference runtime: OpenVINO (INT8 by NNCF's post-training quantization) or ONNX
(INT8 by ONNX Runtime's static quantization), each the runtime's own recommended path, calibrated on
the synthetic images. What reads such an export back lives beside the adapter (``ExportedClassifier``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dfbf_cli.contract import Artefact
from dfbf_cli.images import fit_to_square
from dfbf_cli.settings import ExportFormat, Int8Recipe

if TYPE_CHECKING:
    from dfbf_cli.adapters.classifier import ClassifierAdapter


def _inputs(adapter: ClassifierAdapter, images: torch.Tensor, imgsz: int) -> np.ndarray:
    """uint8 images → the model's normalised float input at ``imgsz``."""
    return adapter.input_spec.normalize(torch.stack([fit_to_square(i, imgsz) for i in images]).float() / 255).numpy()


def export_classifier(adapter: ClassifierAdapter, folder: Path, fmt: ExportFormat, *, imgsz: int, calibration: torch.Tensor | None,
                      recipe: Int8Recipe) -> Artefact:
    model, example = adapter.model.eval().cpu(), torch.zeros(1, 3, imgsz, imgsz)
    samples = [] if calibration is None else [_inputs(adapter, calibration[i : i + 1], imgsz) for i in range(len(calibration))]
    if fmt == ExportFormat.OPENVINO:
        import openvino as ov

        from dfbf_cli.int8 import quantize_openvino

        converted, kept = ov.convert_model(model, example_input=example, input=[-1, 3, imgsz, imgsz]), []
        if samples:
            converted, kept = quantize_openvino(converted, samples, recipe)
        target = folder / f"{adapter.stem}_openvino_model"
        target.mkdir(parents=True)
        ov.save_model(converted, str(target / "model.xml"), compress_to_fp16=False)
        return Artefact(target, tuple(kept))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{adapter.stem}.onnx"
    float_model = folder / "float.onnx" if samples else target
    torch.onnx.export(model, example, str(float_model), input_names=["images"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    if samples:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(samples)

            def get_next(self):
                return next(({"images": batch} for batch in self.batches), None)

        prepared = folder / "prepared.onnx"
        quant_pre_process(str(float_model), str(prepared))  # shape inference and graph optimisation, as ONNX Runtime advises
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return Artefact(target)

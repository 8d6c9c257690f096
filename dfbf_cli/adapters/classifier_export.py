"""Classifiers in an inference runtime: OpenVINO (INT8 by NNCF's post-training quantization) or ONNX
(INT8 by ONNX Runtime's static quantization), each the runtime's own recommended path, calibrated on
the synthetic images; and the adapter that scores such an export (``dfbf eval`` on the folder or file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfbf_cli.adapters.classifier import ClassifierAdapter
from dfbf_cli.contract import Artefact, EvalData, Exported, InputSpec
from dfbf_cli.errors import DfbfError
from dfbf_cli.images import fit_to_square
from dfbf_cli.settings import ExportFormat, Int8Recipe


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


class RuntimeModel(nn.Module):
    """An exported classifier behind the ``nn.Module`` call the engine times and scores: normalised N×3×H×W in, logits out."""

    def __init__(self, path: Path):
        super().__init__()
        if path.is_dir():
            import openvino as ov

            compiled = ov.Core().compile_model(str(path / "model.xml"), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
            self.run = lambda x: compiled(x)[0]
        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()  # idle threads sleep: spinning ones slow whatever runs next (a PyTorch model timed beside it)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.run = lambda x: session.run(None, {"images": x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x.detach().cpu().float().numpy())))


class ExportedClassifier(Exported, ClassifierAdapter):
    """A classifier dfbf exported (its record says what it was): scored and timed in its runtime."""

    def __init__(self, path: Path, record: dict):
        spec = record["input_spec"]
        super().__init__(RuntimeModel(path), task="classify", name=path.name, source=path, suffix=path.suffix,
                         input_spec=InputSpec(record["imgsz"], tuple(spec["mean"]), tuple(spec["std"])))
        self.record, self.outputs = record, record["classes"]

    def num_outputs(self) -> int:
        return self.outputs

    def robustness(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        raise DfbfError(f"--robustness needs gradients, which the exported {self.name} does not give; evaluate the PyTorch model.")

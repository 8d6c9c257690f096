"""YOLO models in an inference runtime: written by Ultralytics' own exporter, so ``YOLO(path)`` predicts and
validates with the result without dfbf.

OpenVINO INT8 quantises the exporter's FP32 model with NNCF itself (``dfbf_cli.int8``) rather than through
the exporter, so that the engine can compare recipes; the detection head's decode stays in floating point
as in Ultralytics' own INT8. ONNX INT8 is the exporter's. ``ExportedYolo`` (beside the adapter) reads it back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dfbf_cli.adapters.yolo_data import pseudo_labelled
from dfbf_cli.adapters.yolo_ultralytics import OPENVINO_SUFFIX, keeping_torch_threads
from dfbf_cli.contract import Artefact
from dfbf_cli.images import save_images
from dfbf_cli.settings import ExportFormat, Int8Recipe

if TYPE_CHECKING:
    from dfbf_cli.adapters.yolo import YoloAdapter


def export_yolo(adapter: YoloAdapter, folder: Path, fmt: ExportFormat, *, imgsz: int, calibration: torch.Tensor | None,
                recipe: Int8Recipe) -> Artefact:
    arguments = {"format": str(fmt), "imgsz": imgsz, "device": "cpu", "verbose": False}
    if calibration is not None and fmt == ExportFormat.ONNX:  # the exporter's loader reads the images as an unlabelled dataset
        arguments |= {"quantize": 8, "data": str(_calibration_dataset(adapter, folder / "calibration", calibration)), "fraction": 1.0, "batch": 1}
    with keeping_torch_threads():
        written = Path(adapter._stock(folder).export(**arguments))
    if calibration is None or fmt == ExportFormat.ONNX:
        return Artefact(written)
    return _quantize_openvino(written, folder / written.name.replace(OPENVINO_SUFFIX, f"_int8{OPENVINO_SUFFIX}"), calibration, imgsz, recipe,
                              adapter.task)


def _quantize_openvino(fp32: Path, target: Path, calibration: torch.Tensor, imgsz: int, recipe: Int8Recipe, task: str) -> Artefact:
    """The FP32 folder's model in INT8, written to ``target`` beside a copy of its metadata."""
    import openvino as ov
    import torchvision.transforms.functional as TF

    from dfbf_cli.int8 import quantize_openvino

    model = ov.Core().read_model(str(next(fp32.glob("*.xml"))))
    samples = [(TF.resize(image, [imgsz, imgsz], antialias=True).float() / 255).unsqueeze(0).numpy() for image in calibration]
    quantized, kept = quantize_openvino(model, samples, recipe, keep_fp=kept_in_fp(model, task))
    target.mkdir()
    ov.save_model(quantized, str(target / "model.xml"), compress_to_fp16=False)
    for extra in fp32.iterdir():
        if extra.suffix not in (".xml", ".bin"):
            shutil.copy2(extra, target / extra.name)
    return Artefact(target, tuple(kept))


def _head(operations) -> str | None:
    """The detection head's module name in the PyTorch frontend's "module/op" names ("" when names are not in that
    form; None without a head: a classifier)."""
    sigmoids = [op.get_friendly_name() for op in operations if op.get_type_name() == "Sigmoid"]
    return sigmoids[-1].split("/", 1)[0] if sigmoids else None


def decode_ops(model) -> list[str]:
    """The detection head's decode (box distribution, anchors, sigmoids): kept in FP, as Ultralytics' INT8 keeps it."""
    operations = model.get_ordered_ops()
    head = _head(operations)
    if head is None:
        return []
    if not head:  # keep only the sigmoids rather than everything
        return [op.get_friendly_name() for op in operations if op.get_type_name() == "Sigmoid"]
    return [name for op in operations
            if op.get_type_name() == "Sigmoid" or (name := op.get_friendly_name()).startswith((f"{head}/", f"{head}.dfl"))]


def kept_in_fp(model, task: str) -> list[str]:
    """What every INT8 recipe keeps in FP: the decode and, for pose, the keypoint branch at the coarsest stride,
    whose raw outputs the decode multiplies by the largest stride (measured: docs/export.md, "What stays in FP")."""
    from dfbf_cli.int8 import WEIGHTED_OPS

    operations, decode = model.get_ordered_ops(), decode_ops(model)
    head = _head(operations)
    if task != "pose" or not head:
        return decode
    branches: dict[int, list[str]] = {}  # the keypoint branch (Ultralytics' cv4) at each stride, finest first
    for op in operations:
        name = op.get_friendly_name()
        if op.get_type_name() in WEIGHTED_OPS and name.startswith(f"{head}.cv4."):
            branches.setdefault(int(name.removeprefix(f"{head}.cv4.").split(".", 1)[0]), []).append(name)
    return decode + (branches[max(branches)] if branches else [])


def _calibration_dataset(adapter: YoloAdapter, folder: Path, images: torch.Tensor) -> Path:
    pictures = save_images(images, folder / "images" / "calib", "synthetic")
    config = {"names": dict(adapter.model.names)} | ({"kpt_shape": list(adapter.model.kpt_shape)} if adapter.task == "pose" else {})
    return pseudo_labelled(folder / "dataset", list(pictures), {}, config)

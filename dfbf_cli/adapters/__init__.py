"""Model adapters: turn what the user typed as MODEL (and --data) into the contract's objects.

| MODEL | adapter |
| --- | --- |
| ``*.pt`` checkpoint, Ultralytics name (``yolo11n-pose.pt``), model YAML | :mod:`.yolo` |
| ``torchvision:NAME`` (+ ``--weights FILE|NAME``), ``cifar-resnetN`` (+ ``--weights FILE``) | :mod:`.classifier` |
| ``*.safetensors``, ``*.th``, ``*.pth`` saved by dfbf (names its architecture) | :mod:`.classifier` |

A new family is an adapter module (a :class:`~dfbf_cli.contract.ModelAdapter` subclass and its
loader) plus its branch in :func:`load_model`, and in :func:`load_data` if it has its own data format.
"""

from __future__ import annotations

from pathlib import Path

from dfbf_cli.contract import EvalData, ModelAdapter
from dfbf_cli.errors import DfbfError

YOLO_SUFFIXES = {".pt", ".yaml", ".yml"}
CLASSIFIER_SUFFIXES = {".safetensors", ".th", ".pth"}  # a dfbf-written one names its architecture; .pt is YOLO's


def load_model(spec: str, weights: str | None = None, weights_option: str = "--weights") -> ModelAdapter:
    """Load MODEL as the user typed it (``weights`` given as ``weights_option``); every failure is a
    :class:`DfbfError` naming what to do."""
    from dfbf_cli.adapters import classifier

    if spec.startswith("torchvision:") or spec.startswith("cifar-resnet"):
        return classifier.load_classifier(spec, weights)
    path = Path(spec).expanduser()
    if path.suffix == ".onnx" or (path.is_dir() and any(path.glob("*.xml"))):
        return _load_export(path, weights, weights_option)
    if path.suffix in CLASSIFIER_SUFFIXES:
        if not path.is_file():
            raise DfbfError(f"Model file '{spec}' does not exist.")
        arch = classifier.weights_record(path).get(classifier.ARCH_METADATA_KEY)
        if arch is None:
            raise DfbfError(f"'{spec}' does not say which architecture it holds; give it as weights instead, e.g. "
                            f"'cifar-resnet56 --weights {spec}' or 'torchvision:resnet18 --weights {spec}'.")
        if weights:
            raise DfbfError(f"{weights_option} does not apply to '{spec}': the file holds its own weights.")
        return classifier.load_classifier(arch, str(path))
    if path.suffix in YOLO_SUFFIXES:
        if weights:
            raise DfbfError(f"{weights_option} applies to torchvision and CIFAR models; a YOLO checkpoint holds its own weights.")
        from dfbf_cli.adapters import yolo

        return yolo.load_yolo(spec)
    if path.exists():
        raise DfbfError(f"'{spec}' is not a model dfbf can read (expected .pt, .yaml, .safetensors, .th or .pth).")
    raise DfbfError(f"Unknown model '{spec}': give a YOLO checkpoint or YAML (model.pt, yolov8n-pose.yaml), 'torchvision:NAME' or 'cifar-resnetN'.")


def _load_export(path: Path, weights: str | None, weights_option: str) -> ModelAdapter:
    """An exported model: one dfbf made of a classifier (its record says so), else an Ultralytics export."""
    if not path.exists():
        raise DfbfError(f"Model '{path}' does not exist.")
    if weights:
        raise DfbfError(f"{weights_option} does not apply to '{path}': an export holds its own weights.")
    from dfbf_cli.export_record import check_packages, read_record
    from dfbf_cli.settings import ExportFormat

    check_packages(ExportFormat.ONNX if path.suffix == ".onnx" else ExportFormat.OPENVINO)
    record = read_record(path)
    if record is not None and record["source"]["family"] == "classifier":
        from dfbf_cli.adapters.classifier import ExportedClassifier

        return ExportedClassifier(path, record)
    from dfbf_cli.adapters.yolo import ExportedYolo

    return ExportedYolo(path)  # Ultralytics' own exports, dfbf's or not


def load_data(spec: str | Path) -> EvalData:
    """Open and check what --data points at: a family's own format (an Ultralytics dataset YAML), or an
    .npz, a class-per-folder tree or a folder of images."""
    from dfbf_cli.data import read_generic_data

    path = Path(spec).expanduser()
    if not path.exists():
        raise DfbfError(f"Data '{spec}' does not exist.")
    if path.is_file() and path.suffix.lower() in {".yaml", ".yml"}:
        from dfbf_cli.adapters.yolo_data import YoloDataset

        return YoloDataset.load(path)
    return read_generic_data(path)

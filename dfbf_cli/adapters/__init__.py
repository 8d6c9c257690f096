"""Model adapters: turn what the user typed as MODEL into a :class:`ModelAdapter`.

| MODEL | adapter |
| --- | --- |
| ``*.pt`` checkpoint, Ultralytics name (``yolo11n-pose.pt``), model YAML | :mod:`.yolo` |
| ``torchvision:NAME`` (+ ``--weights FILE|ENUM``), ``cifar-resnetN`` (+ ``--weights FILE``) | :mod:`.classifier` |
| ``*.safetensors`` saved by dfbf (names its architecture) | :mod:`.classifier` |
"""

from __future__ import annotations

from pathlib import Path

from dfbf_cli.adapters.base import BackboneSplit, InputSpec, ModelAdapter
from dfbf_cli.errors import DfbfError

__all__ = ["BackboneSplit", "InputSpec", "ModelAdapter", "load_model"]

YOLO_SUFFIXES = {".pt", ".yaml", ".yml"}


def load_model(spec: str, weights: str | None = None) -> ModelAdapter:
    """Load MODEL as the user typed it; every failure is a :class:`DfbfError` naming what to do."""
    from dfbf_cli.adapters import classifier

    if spec.startswith("torchvision:") or spec.startswith("cifar-resnet"):
        return classifier.load_classifier(spec, weights)
    path = Path(spec).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise DfbfError(f"Model file '{spec}' does not exist.")
        arch = classifier.safetensors_arch(path)
        if arch is None:
            raise DfbfError(
                f"'{spec}' does not say which architecture it holds; "
                "give it as weights instead, e.g. 'torchvision:resnet18 --weights FILE'."
            )
        return classifier.load_classifier(arch, str(path))
    if path.suffix in YOLO_SUFFIXES:
        if weights:
            raise DfbfError("--weights applies to torchvision and CIFAR models; a YOLO checkpoint holds its own weights.")
        from dfbf_cli.adapters import yolo

        return yolo.load_yolo(spec)
    if path.exists():
        raise DfbfError(f"'{spec}' is not a model dfbf can read (expected .pt, .yaml or .safetensors).")
    raise DfbfError(
        f"Unknown model '{spec}': give a YOLO checkpoint or YAML (model.pt, yolov8n-pose.yaml), "
        "'torchvision:NAME' or 'cifar-resnetN'."
    )

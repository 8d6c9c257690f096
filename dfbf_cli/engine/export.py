"""Export to an inference runtime, INT8 calibrated on dfbf's own synthetic images.

Every INT8 path needs calibration images, exactly what a dfbf user lacks; the synthetic dataset made
from the model's BatchNorm statistics serves (docs/export.md measures how well). The adapter does the
format's work (Ultralytics' exporter for YOLO, OpenVINO + NNCF or ONNX Runtime for classifiers); this
module checks the request, picks the calibration images, and moves the result into place only once
it is complete, with a record of what it is (``dfbf.json``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from dfbf_cli import __version__
from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.efficiency import count_params, example_input, gflops
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import CALIBRATION_IMAGES, EXPORT_EXTRA, EXPORT_PACKAGES, ExportFormat, Scope

RECORD = "dfbf.json"  # beside an exported folder's files; inside an .onnx file's metadata under this key


def check_packages(fmt: ExportFormat) -> None:
    """The runtime packages ``fmt`` needs are installed (Ultralytics would try to pip-install them)."""
    missing = [name for name in EXPORT_PACKAGES[ExportFormat(fmt)] if importlib.util.find_spec(name) is None]
    if missing:
        raise DfbfError(f"Exporting to {fmt} needs {', '.join(missing)}: install dfbf's export extra ({EXPORT_EXTRA}).")


def default_path(stem: str, fmt: ExportFormat, int8: bool) -> Path:
    """``STEM[_int8]_openvino_model/`` or ``STEM[-int8].onnx``, as Ultralytics names its exports."""
    if fmt == ExportFormat.OPENVINO:
        return Path(f"{stem}{'_int8' if int8 else ''}_openvino_model")
    return Path(f"{stem}{'-int8' if int8 else ''}.onnx")


def calibration_images(dataset: SyntheticDataset, limit: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """Up to ``limit`` images of the synthetic set (uint8 N×3×H×W), spread across its shards."""
    images, _ = dataset.load()
    if len(images) > limit:
        images = images[torch.linspace(0, len(images) - 1, limit).round().long()]
    return images


def check_target(out: Path) -> None:
    """An export may replace an earlier dfbf export at ``out``, nothing else."""
    if out.exists() and (out.is_dir() != (out.suffix != ".onnx") or read_record(out) is None):
        raise DfbfError(f"--out {out} exists and is not a dfbf export of this format; choose a new path.")


def export(adapter: ModelAdapter, fmt: ExportFormat, out: Path, *, imgsz: int, calibration: SyntheticDataset | None) -> Path:
    """Write ``adapter`` as ``fmt`` (INT8 when a calibration set is given) to ``out``, which appears only
    once complete."""
    images = None if calibration is None else calibration_images(calibration)
    example = example_input(imgsz)
    record = {
        "dfbf_version": __version__, "format": str(fmt), "precision": "int8" if images is not None else "fp32", "imgsz": imgsz,
        "input_spec": adapter.input_spec.to_dict(), "classes": adapter.synthesis_classes(),
        "source": {"name": adapter.name, "family": adapter.family, "task": adapter.task, "params": count_params(adapter.model),
                   "backbone_params": count_params(adapter.split(Scope.BACKBONE).backbone), "gflops": gflops(adapter.model.cpu().eval(), example)},
        "calibration": None if calibration is None else {"synthetic": str(calibration.root), "images": len(images), "teacher": calibration.fingerprint},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dfbf-export-", dir=out.parent) as tmp:
        artefact = adapter.export(Path(tmp), fmt, imgsz=imgsz, calibration=images)
        if artefact.is_dir():
            (artefact / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        else:
            _embed(artefact, record)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        artefact.replace(out)
    return out


def _embed(onnx_file: Path, record: dict) -> None:
    import onnx

    model = onnx.load(str(onnx_file))
    entry = next((p for p in model.metadata_props if p.key == RECORD), None) or model.metadata_props.add()
    entry.key, entry.value = RECORD, json.dumps(record)
    onnx.save(model, str(onnx_file))


def read_record(path: Path) -> dict | None:
    """The record of a dfbf export (folder or .onnx), or None if dfbf did not write it."""
    try:
        if path.is_dir():
            return json.loads((path / RECORD).read_text()) if (path / RECORD).is_file() else None
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        entry = next((p for p in model.metadata_props if p.key == RECORD), None)
        return None if entry is None else json.loads(entry.value)
    except Exception as error:  # a damaged file: onnx and json raise many types
        raise DfbfError(f"'{path}' is not a readable export ({str(error).splitlines()[0] if str(error) else type(error).__name__}).") from error

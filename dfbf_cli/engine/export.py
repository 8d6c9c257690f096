"""Export to an inference runtime, INT8 calibrated on dfbf's own synthetic images.

Every INT8 path needs calibration images, exactly what a dfbf user lacks; the synthetic dataset made
from the model's BatchNorm statistics serves (docs/export.md measures how well). The adapter does the
format's work (Ultralytics' exporter for YOLO, OpenVINO + NNCF or ONNX Runtime for classifiers); this
module checks the request, picks the calibration images (or makes a small set at the export's size),
chooses the INT8 recipe by agreement with the FP32 model on held-out synthetic images, and moves the
result into place only once it is complete, with a record of what it is (``dfbf.json``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dfbf_cli import __version__
from dfbf_cli.contract import Artefact, ImageFolder, ModelAdapter
from dfbf_cli.engine.efficiency import count_params, example_input, gflops
from dfbf_cli.engine.progress import ProgressCallback, ProgressEvent, ignore
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.errors import DfbfError
from dfbf_cli.export_record import read_record, write_record
from dfbf_cli.images import save_images
from dfbf_cli.settings import (
    CALIBRATION_IMAGES,
    CALIBRATION_SET_BATCH,
    CALIBRATION_SET_IMAGES,
    CALIBRATION_SYNTHESIS,
    HELD_OUT_SHARE,
    INT8_CANDIDATES,
    MIN_HELD_OUT,
    ExportFormat,
    Int8Recipe,
    Precision,
    Scope,
)


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


def calibration_path(out: Path, adapter: ModelAdapter, imgsz: int, seed: int) -> Path:
    """Where ``dfbf export --int8`` keeps the calibration set it makes: beside the export, named by the model (its
    name and a short fingerprint: two models called compressed.pt do not share one), the size and a non-zero seed,
    so that the next export of the same model at that size reuses it."""
    return out.parent / f"{adapter.stem}-{adapter.fingerprint()[:8]}-synthetic-{imgsz}px{f'-seed{seed}' if seed else ''}"


def make_calibration_set(adapter: ModelAdapter, folder: Path, *, imgsz: int, device: torch.device, seed: int,
                         on_progress: ProgressCallback = ignore) -> SyntheticDataset:
    """A small synthetic set at the export's input size (made, or continued after an interruption)."""
    from dfbf_cli.engine.runtime import resolve_precision
    from dfbf_cli.engine.synthesis import plan_synthesis, run_synthesis

    plan = plan_synthesis(adapter, folder, num_images=CALIBRATION_SET_IMAGES, imgsz=imgsz, batch=CALIBRATION_SET_BATCH,
                          settings=CALIBRATION_SYNTHESIS, seed=seed, precision=resolve_precision(Precision.AUTO, device))
    return run_synthesis(adapter, plan, device=device, on_progress=on_progress)


def check_target(out: Path) -> None:
    """An export may replace an earlier dfbf export at ``out``, nothing else."""
    if out.exists() and (out.is_dir() != (out.suffix != ".onnx") or read_record(out) is None):
        raise DfbfError(f"--out {out} exists and is not a dfbf export of this format; choose a new path.")


def export(adapter: ModelAdapter, fmt: ExportFormat, out: Path, *, imgsz: int, calibration: SyntheticDataset | None,
           recipe: Int8Recipe = Int8Recipe.AUTO, on_progress: ProgressCallback = ignore) -> dict:
    """Write ``adapter`` as ``fmt`` (INT8 when a calibration set is given) to ``out``, which appears only
    once complete; return its record."""
    images = None if calibration is None else calibration_images(calibration)
    example = example_input(imgsz)
    record = {
        "dfbf_version": __version__, "format": str(fmt), "precision": "int8" if images is not None else "fp32", "imgsz": imgsz,
        "input_spec": adapter.input_spec.to_dict(), "classes": adapter.synthesis_classes(),
        "source": {"name": adapter.name, "family": adapter.family, "task": adapter.task, "params": count_params(adapter.model),
                   "backbone_params": count_params(adapter.split(Scope.BACKBONE).backbone), "gflops": gflops(adapter.model.cpu().eval(), example)},
        "calibration": None if calibration is None else {"synthetic": str(calibration.root), "teacher": calibration.fingerprint},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dfbf-export-", dir=out.parent) as tmp:
        if images is None:
            artefact = adapter.export(Path(tmp), fmt, imgsz=imgsz, calibration=None)
        else:
            artefact, record["int8"] = _quantise(adapter, fmt, Path(tmp), images, record, recipe=recipe, imgsz=imgsz, on_progress=on_progress)
            record["calibration"]["images"] = record["int8"].pop("calibration_images")
        write_record(artefact.path, record)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        artefact.path.replace(out)
    return record


def held_out_split(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out): every k-th image kept aside for scoring, none when too few would be."""
    held = torch.zeros(len(images), dtype=torch.bool)
    if round(len(images) * HELD_OUT_SHARE) >= MIN_HELD_OUT:
        held[torch.linspace(0, len(images) - 1, round(len(images) * HELD_OUT_SHARE)).round().long()] = True
    return images[~held], images[held]


def _quantise(adapter: ModelAdapter, fmt: ExportFormat, folder: Path, images: torch.Tensor, record: dict, *, recipe: Int8Recipe, imgsz: int,
              on_progress: ProgressCallback) -> tuple[Artefact, dict]:
    """The INT8 export by ``recipe``; for AUTO, by each candidate recipe the format offers, the one whose outputs agree
    best with ``adapter``'s own on held-out synthetic images. Returns it and what was chosen and measured."""
    calibration, held_out = held_out_split(images)
    openvino = fmt == ExportFormat.OPENVINO
    recipes = [recipe] if recipe != Int8Recipe.AUTO else list(INT8_CANDIDATES if openvino and len(held_out) else INT8_CANDIDATES[:1])
    pictures = _pictures(folder / "held-out", held_out)
    metric = adapter.primary_metric().agreement()
    sign = 1.0 if metric.higher_is_better else -1.0
    trials: list[tuple[str, Artefact, dict[str, float]]] = []
    failed: dict[str, str] = {}
    for done, candidate in enumerate(recipes):
        on_progress(ProgressEvent("INT8 recipes", done, len(recipes), {"trying": str(candidate)}))
        name = str(candidate) if openvino else str(fmt)  # ONNX INT8 has one recipe: its runtime's
        try:
            artefact = adapter.export(folder / str(candidate), fmt, imgsz=imgsz, calibration=calibration, recipe=candidate)
        except Exception as error:  # an optional recipe that NNCF cannot apply to this graph: the others still serve
            if done == 0:
                raise
            failed[name] = str(error).splitlines()[0] if str(error) else type(error).__name__
            continue
        write_record(artefact.path, record)  # reading an export back needs its record
        scores = {} if pictures is None else adapter.load_export(artefact.path).agreement(adapter, pictures, imgsz=imgsz, batch=1,
                                                                                          device=torch.device("cpu"))
        trials.append((name, artefact, scores))
    on_progress(ProgressEvent("INT8 recipes", len(recipes), len(recipes)))
    chosen, artefact, _ = max(trials, key=lambda t: sign * t[2].get(metric.name, 0.0))  # the first of equals
    return artefact, {"recipe": chosen if openvino else None, "kept_fp": list(artefact.kept_fp), "held_out_images": len(held_out),
                      "calibration_images": len(calibration), "agreement_metric": metric.name,
                      "agreement": {name: scores for name, _, scores in trials}, **({"failed": failed} if failed else {})}


def _pictures(folder: Path, images: torch.Tensor) -> ImageFolder | None:
    """``images`` as PNG files (what an adapter's agreement reads), or None when there are none."""
    return ImageFolder(folder, save_images(images, folder, "held-out")) if len(images) else None

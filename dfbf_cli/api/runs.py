"""The whole-run commands as functions: compress, evaluate, export."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from dfbf_cli.api.common import as_device, at_least, choice, dfbf_log, pruning_target, read_synthetic_set
from dfbf_cli.engine.progress import ProgressCallback, ignore
from dfbf_cli.errors import DfbfError, refuse_unused
from dfbf_cli.files import Kind, Output, check_outputs, input_paths
from dfbf_cli.settings import (
    DEFAULT_PRESET,
    DEFAULT_SCOPE,
    EVAL_BATCH,
    Allocation,
    Criterion,
    ExportFormat,
    FinetuneSettings,
    Int8Recipe,
    Precision,
    PresetName,
    ReconstructSettings,
    Schedule,
    Scope,
    Strategy,
)

if TYPE_CHECKING:
    import torch

    from dfbf_cli.contract import Metric, ModelAdapter
    from dfbf_cli.engine.compress import CompressResult
    from dfbf_cli.engine.evaluate import ModelReport, Verdict



@dataclass(frozen=True)
class CompressRun:
    """A finished :func:`compress` run: its run directory, report and verdict; ``model`` loads the compressed model."""

    result: CompressResult

    @property
    def root(self) -> Path:
        return self.result.run.root

    @property
    def report(self) -> dict:
        return self.result.summary

    @property
    def gate_failure(self) -> str | None:
        """Why ``max_drop`` failed (the CLI exits 1 with it), or None."""
        return self.result.gate_failure

    @cached_property
    def model(self) -> ModelAdapter:
        from dfbf_cli.adapters import load_model

        return load_model(str(self.result.run.compressed))


def compress(model: str, *, ratio: float | None = None, flops: float | None = None, weights: str | None = None, data: str | None = None,
             out: str | Path | None = None, scope: Scope = DEFAULT_SCOPE, allocation: Allocation = Allocation.UNIFORM, rounds: int = 1,
             reconstruct: bool = False, synthetic: str | Path | None = None, preset: PresetName = DEFAULT_PRESET, max_drop: float | None = None,
             criterion: Criterion | None = None, schedule: Schedule = Schedule.UNIFORM, strategy: Strategy = Strategy.ONESHOT,
             num_images: int | None = None, epochs: int | None = None, imgsz: int | None = None, export: ExportFormat | None = None,
             int8: bool = False, allow_teacher_mismatch: bool = False, device: str | torch.device = "auto", precision: Precision = Precision.AUTO,
             seed: int = 0, on_progress: ProgressCallback = ignore) -> CompressRun:
    """Synthesize → prune → fine-tune → evaluate ``model`` in one resumable run directory (``out``). ``criterion``
    None: energy with ``reconstruct``, L1 without."""
    from dfbf_cli.adapters import load_data, load_model
    from dfbf_cli.engine.compress import compress as run_compress
    from dfbf_cli.engine.compress import plan_compress
    from dfbf_cli.engine.runtime import resolve_precision

    where = as_device(device)
    settings = pruning_target(ratio, flops, reconstruct=reconstruct, scope=scope, allocation=allocation, criterion=criterion, schedule=schedule)
    preset, strategy, precision = choice(PresetName, preset, "--preset"), choice(Strategy, strategy, "--strategy"), choice(Precision, precision, "--precision")
    export = None if export is None else choice(ExportFormat, export, "--export")
    at_least("--imgsz", imgsz, 8), at_least("--num-images", num_images, 2), at_least("--epochs", epochs, 1)
    eval_data = load_data(data) if data else None
    original = load_model(model, weights)
    plan = plan_compress(
        original, model_spec=model, prune_settings=settings, strategy=strategy, rounds=rounds,
        reconstruct_settings=ReconstructSettings() if reconstruct else None, preset=preset,
        finetune_settings=FinetuneSettings(precision=resolve_precision(precision, where)), epochs=epochs, num_images=num_images, export=export,
        int8=int8, imgsz=imgsz, synthetic=None if synthetic is None else Path(synthetic), allow_teacher_mismatch=allow_teacher_mismatch,
        eval_data=eval_data, max_drop=max_drop, out=None if out is None else Path(out), seed=seed, device=where,
        inputs=input_paths(model=model, weights=weights, synthetic=synthetic, data=data),
    )
    return CompressRun(run_compress(plan, on_progress=on_progress))


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured: one report per model (then each free alternative), the metric watched,
    and for each later model its verdict against the first at equal GFLOPs (by label)."""

    reports: list[ModelReport]
    metric: Metric
    verdicts: list[tuple[str, Verdict]]


def evaluate(models: list[str], data: str, *, weights: str | None = None, teacher: str | None = None, teacher_weights: str | None = None,
             imgsz: int | None = None, batch: int = EVAL_BATCH, latency_runs: int = 10, robustness: bool = False, baseline: bool = True,
             device: str | torch.device = "auto", on_progress: ProgressCallback = ignore) -> Evaluation:
    """Task metric (or agreement with ``teacher`` on photos), parameters, GFLOPs, latency and file size of each
    model; with labelled data and a YOLO model, also the first model at the size where it costs what each later one does."""
    from dfbf_cli.adapters import load_data, load_model
    from dfbf_cli.contract import ImageFolder
    from dfbf_cli.engine.efficiency import check_imgsz
    from dfbf_cli.engine.evaluate import Candidate, Verdict, check_evaluation, evaluate_models, free_alternative, watched_metric

    where = as_device(device)
    at_least("--imgsz", imgsz, 8), at_least("--batch", batch, 1), at_least("--latency-runs", latency_runs, 1)
    if weights and len(models) > 1:
        raise DfbfError("--weights applies to a single MODEL; evaluate models with different weights one by one.")
    refuse_unused(teacher_weights=(teacher_weights is not None and teacher is None, "applies to a --teacher."))
    eval_data = load_data(data)
    refuse_unused(robustness=(robustness and isinstance(eval_data, ImageFolder), "needs labelled --data (unlabelled photos measure agreement only)."))
    teacher_model = load_model(teacher, teacher_weights, "--teacher-weights") if teacher else None
    adapters = [load_model(spec, weights) for spec in models]
    if len({a.input_spec.imgsz for a in adapters}) > 1 and imgsz is None:
        raise DfbfError("These models have different input sizes; pass --imgsz to compare them at one size.")
    for adapter in adapters:
        check_evaluation(adapter, eval_data, teacher_model)
        check_imgsz(adapter, imgsz or adapter.input_spec.imgsz, batch, where, training=False)
    candidates = [Candidate(a.name, a, imgsz or a.input_spec.imgsz) for a in adapters]
    comparisons = []  # (later model's index, its free alternative's index)
    if baseline and not isinstance(eval_data, ImageFolder):
        for index, candidate in enumerate(candidates[1:len(adapters)], 1):
            alternative = free_alternative(adapters[0], candidate.adapter, candidates[0].imgsz, adapters[0].name)
            if alternative is not None:
                candidates.append(alternative)
                comparisons.append((index, len(candidates) - 1))
    dfbf_log().info("Evaluating %s on %s (%s) ...", ", ".join(c.label for c in candidates), data, where)
    reports = evaluate_models(candidates, eval_data, teacher=teacher_model, batch=batch, device=where, latency_runs=latency_runs,
                              robustness=robustness, on_progress=on_progress)
    metric = watched_metric(adapters[0], eval_data)
    return Evaluation(reports, metric, [(candidates[i].label, Verdict.of(metric, reports[i], reports[b])) for i, b in comparisons])


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: the folder or file, and its record (format, precision, calibration, INT8 recipe and agreement)."""

    path: Path
    record: dict


def export(model: str, fmt: ExportFormat, *, weights: str | None = None, int8: bool = False, synthetic: str | Path | None = None,
           recipe: Int8Recipe = Int8Recipe.AUTO, imgsz: int | None = None, out: str | Path | None = None, allow_teacher_mismatch: bool = False,
           device: str | torch.device = "auto", seed: int = 0, on_progress: ProgressCallback = ignore) -> Exported:
    """``model`` in OpenVINO or ONNX, INT8 calibrated on synthetic images (``synthetic``, else a small set made beside the export)."""
    import torch

    from dfbf_cli.adapters import load_model
    from dfbf_cli.engine.efficiency import check_imgsz
    from dfbf_cli.engine.export import calibration_path, check_target, default_path, make_calibration_set
    from dfbf_cli.engine.export import export as write_export
    from dfbf_cli.export_record import check_packages
    from dfbf_cli.settings import CALIBRATION_SET_BATCH, CALIBRATION_SET_IMAGES

    log, fmt, recipe = dfbf_log(), choice(ExportFormat, fmt, "--format"), choice(Int8Recipe, recipe, "--int8-recipe")
    at_least("--imgsz", imgsz, 8)
    refuse_unused(allow_teacher_mismatch=(allow_teacher_mismatch and synthetic is None, "applies to a --synthetic dataset."))
    if synthetic is not None and not int8:
        raise DfbfError("--synthetic is read for INT8 calibration only; add --int8 or leave it out.")
    if recipe != Int8Recipe.AUTO and not (int8 and fmt == ExportFormat.OPENVINO):
        raise DfbfError("--int8-recipe chooses how NNCF quantises an OpenVINO export: it needs --int8 --format openvino.")
    check_packages(fmt)
    adapter = load_model(model, weights)
    size = imgsz or adapter.input_spec.imgsz
    check_imgsz(adapter, size, 1, torch.device("cpu"), training=False)  # the export runs on the CPU
    path = Path(out) if out is not None else default_path(adapter.stem, fmt, int8)
    made = calibration_path(path, adapter, size, seed) if int8 and synthetic is None else None
    where = as_device(device) if made is not None else None  # only the calibration set is computed anywhere else
    if made is not None:
        check_imgsz(adapter, size, CALIBRATION_SET_BATCH, where, training=True)
    check_outputs([Output("--out", path, Kind.DIRECTORY if fmt == ExportFormat.OPENVINO else Kind.FILE)]
                  + ([Output("the calibration set", made, Kind.DIRECTORY)] if made else []),
                  input_paths(model=model, weights=weights, synthetic=synthetic))
    adapter.check_export_path(path, fmt)
    check_target(path)
    dataset = None
    if made is not None:
        log.info("No --synthetic given: synthesising %d calibration images at %d px into %s on %s (kept: the next export of this model at "
                 "this size reuses them).", CALIBRATION_SET_IMAGES, size, made, where)
        dataset = make_calibration_set(adapter, made, imgsz=size, device=where, seed=seed, on_progress=on_progress)
    elif synthetic is not None:
        dataset = read_synthetic_set(synthetic, adapter, minimum=1, what="INT8 calibration", allow_mismatch=allow_teacher_mismatch, lineage=True)
    log.info("Exporting %s to %s%s at %d px%s", adapter.describe(), fmt, " INT8" if int8 else "", size,
             f", calibrated on {dataset.num_images} synthetic image(s) from {dataset.root} (a quarter held out to measure agreement)."
             if dataset else ".")
    record = write_export(adapter, fmt, path, imgsz=size, calibration=dataset, recipe=recipe, on_progress=on_progress)
    return Exported(path, record)

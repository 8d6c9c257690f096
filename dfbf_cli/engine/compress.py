"""The whole job: synthesise → prune → fine-tune → evaluate, as one validated plan and one resumable run.

:func:`plan_compress` checks every argument and input before anything is computed (a mistake costs
seconds, not the forty minutes of a YOLO run); :func:`compress` then runs the stages, each one
"reuse the artefact if the run directory has it, else make it and save it", so re-running the same
command after an interruption continues where it stopped. The run directory::

    RUN/run.json               what was asked (a re-run must ask the same; --data is not part of it)
    RUN/synthetic/             the synthetic training images (unless --synthetic points elsewhere)
    RUN/holdout/               a few fresh synthetic images the student never trains on (fidelity)
    RUN/pruning.json           how many channels each group keeps
    RUN/pruned<ext>            the pruned model, before fine-tuning
    RUN/reconstructed<ext>     the pruned model with its scope refit in closed form (the distillation's start)
    RUN/round-<k><ext>         with --rounds K: the model after round k's prune and distillation
    RUN/finetune-state[-k].pt  round k's fine-tuning checkpoint (only while unfinished)
    RUN/finetune-history.json  the loss per epoch (written before each round's model)
    RUN/compressed<ext>        the final model
    RUN/calibration/           with --int8: synthetic images at the export's input size, when the run's are smaller
    RUN/compressed[_int8]_openvino_model/ or compressed[-int8].onnx   with --export: the final model, exported
    RUN/report.json|md|png     original / pruned / compressed (and the free alternative), loss curve
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dfbf_cli import __version__
from dfbf_cli.contract import EvalData, ImageFolder, Metric, ModelAdapter
from dfbf_cli.engine.distributed import barrier, check_batch_split, current, job_exclusive, main_first
from dfbf_cli.engine.efficiency import check_imgsz
from dfbf_cli.engine.evaluate import Candidate, ModelReport, Verdict, check_evaluation, evaluate_models, free_alternative, watched_metric
from dfbf_cli.engine.export import default_path, make_calibration_set
from dfbf_cli.engine.export import export as export_model
from dfbf_cli.engine.features import feature_gap
from dfbf_cli.engine.finetune import EpochRecord, finetune
from dfbf_cli.engine.progress import ProgressCallback, ignore
from dfbf_cli.engine.progressive import progressive_prune
from dfbf_cli.engine.pruning import choose, plan_keep, prune, scoring_images
from dfbf_cli.engine.reconstruct import refit_pruned
from dfbf_cli.engine.report import write_report
from dfbf_cli.engine.synthesis import plan_synthesis, run_synthesis
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.errors import DfbfError
from dfbf_cli.export_record import check_packages
from dfbf_cli.files import LOCK_FILE, Kind, Output, check_outputs, read_json, write_json
from dfbf_cli.settings import (
    CALIBRATION_SET_BATCH,
    EVAL_BATCH,
    PRESETS,
    SYNTHESIS_BATCH,
    ExportFormat,
    FinetuneSettings,
    Preset,
    PresetName,
    ProgressiveSettings,
    PruneSettings,
    ReconstructSettings,
    Strategy,
)

log = logging.getLogger("dfbf")

HOLDOUT_IMAGES = 16  # at most; a quarter of the training set for smaller ones
HOLDOUT_SEED_OFFSET = 2**32  # the holdout's shards never share a seed with a training set's


@dataclass(frozen=True)
class RunDirectory:
    root: Path
    suffix: str

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def holdout(self) -> Path:
        return self.root / "holdout"

    @property
    def pruning(self) -> Path:
        return self.root / "pruning.json"

    @property
    def pruned(self) -> Path:
        return self.root / f"pruned{self.suffix}"

    @property
    def reconstructed(self) -> Path:
        return self.root / f"reconstructed{self.suffix}"

    def round(self, k: int) -> Path:
        return self.root / f"round-{k}{self.suffix}"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def compressed(self) -> Path:
        return self.root / f"compressed{self.suffix}"

    def exported(self, fmt: ExportFormat, int8: bool) -> Path:
        return self.root / default_path("compressed", fmt, int8)

    def finetune_state(self, k: int) -> Path:
        """Round ``k``'s fine-tuning checkpoint (only while unfinished)."""
        return self.root / ("finetune-state.pt" if k == 1 else f"finetune-state-{k}.pt")

    @property
    def history(self) -> Path:
        return self.root / "finetune-history.json"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    def check(self, request: dict) -> None:
        """Accept a new or empty folder, or one holding a run of the same request (to resume it)."""
        if self.run_file.exists():
            previous = read_json(self.run_file, "the run's request")
            previous = previous.get("request") if isinstance(previous, dict) else None
            if not isinstance(previous, dict):
                raise DfbfError(f"{self.run_file} is damaged; delete the run directory to start over.")
            if previous != request:
                changed = sorted(k for k in {*previous, *request} if previous.get(k) != request.get(k))
                raise DfbfError(f"{self.root} holds a run with other settings ({', '.join(changed)} differ); use another --out.")
        elif self.root.exists() and any(p.name != LOCK_FILE for p in self.root.iterdir()):
            raise DfbfError(f"{self.root} exists and is not a dfbf compress run; choose an empty or new --out.")

    def start(self, request: dict) -> None:
        if not self.run_file.exists():
            write_json(self.run_file, {"dfbf_version": __version__, "request": request})


@dataclass(frozen=True)
class CompressPlan:
    """Everything ``dfbf compress`` will do, validated."""

    original: ModelAdapter
    run: RunDirectory
    request: dict  # the run's identity (run.json)
    prune: PruneSettings
    strategy: Strategy
    progressive: ProgressiveSettings
    rounds: int
    reconstruct: ReconstructSettings | None  # None: distillation starts from the pruned model itself
    finetune: FinetuneSettings
    preset: Preset
    imgsz: int  # synthesis and fine-tuning
    num_images: int
    synthetic: SyntheticDataset | None  # given with --synthetic; else made in the run directory
    eval_data: EvalData | None
    export: ExportFormat | None
    int8: bool
    max_drop: float | None
    seed: int
    device: torch.device


def plan_compress(
    original: ModelAdapter, *, model_spec: str, prune_settings: PruneSettings, strategy: Strategy, rounds: int,
    reconstruct_settings: ReconstructSettings | None, preset: PresetName,
    finetune_settings: FinetuneSettings, epochs: int | None, num_images: int | None, imgsz: int | None, synthetic: Path | None,
    export: ExportFormat | None, int8: bool,
    allow_teacher_mismatch: bool, eval_data: EvalData | None, max_drop: float | None, out: Path | None, seed: int,
    device: torch.device, inputs: dict[str, Path | None],
) -> CompressPlan:
    """Check every argument and input against each other; nothing is computed or written."""
    check_batch_split(finetune_settings.batch)
    budget = PRESETS[preset]
    if rounds < 1:
        raise DfbfError(f"--rounds must be at least 1, got {rounds}.")
    if rounds > 1 and strategy == Strategy.PROGRESSIVE:
        raise DfbfError("--rounds applies to one-shot pruning; progressive pruning already works in small steps (--strategy oneshot).")
    if reconstruct_settings is not None:
        reconstruct_settings.validate()
        if rounds > 1 or strategy == Strategy.PROGRESSIVE:
            raise DfbfError("--reconstruct follows one-shot pruning in one round; leave it out with --rounds or --strategy progressive.")
    if int8 and export is None:
        raise DfbfError("--int8 applies to --export FORMAT (the compressed model exported, INT8 calibrated on synthetic images).")
    if export is not None:
        check_packages(export)
    if max_drop is not None:
        if not (math.isfinite(max_drop) and max_drop >= 0):
            raise DfbfError(f"--max-drop must be 0 or more, got {max_drop}.")
        if eval_data is None:
            raise DfbfError("--max-drop needs --data (labelled data, or photos to measure agreement on) to measure the metric on.")
    if eval_data is not None:
        check_evaluation(original, eval_data, original if isinstance(eval_data, ImageFolder) else None)
    dataset = None
    if synthetic is not None:
        dataset = SyntheticDataset.open(synthetic)
        dataset.verify()
        dataset.check_teacher(original.fingerprint(), allow_mismatch=allow_teacher_mismatch)
        if imgsz is not None and imgsz != dataset.imgsz:
            raise DfbfError(f"--imgsz {imgsz} differs from the {dataset.imgsz} px of the images in {synthetic}; leave --imgsz out.")
        if num_images is not None:
            raise DfbfError(f"--num-images applies to images compress makes; {synthetic} holds {dataset.num_images} already.")
        if dataset.num_images < 2:
            raise DfbfError(f"{synthetic} holds {dataset.num_images} image(s); fine-tuning needs at least 2.")
    elif allow_teacher_mismatch:
        raise DfbfError("--allow-teacher-mismatch applies to a --synthetic dataset made from another model.")
    size = dataset.imgsz if dataset else imgsz or budget.imgsz(original.input_spec.imgsz)
    check_imgsz(original, size, finetune_settings.batch, device, training=True)
    if int8 and size != original.input_spec.imgsz:  # the calibration set is made at the export's size
        check_imgsz(original, original.input_spec.imgsz, CALIBRATION_SET_BATCH, device, training=True)
    num_images = dataset.num_images if dataset else num_images or budget.num_images(size)
    settings = replace(finetune_settings, epochs=epochs or budget.epochs(num_images, finetune_settings.batch, size))
    settings.validate()
    run = RunDirectory(out or Path(f"{original.stem}-compressed"), original.default_suffix)
    check_outputs([Output("--out", run.root, Kind.DIRECTORY)], inputs)
    request = {
        "model": model_spec, "fingerprint": original.fingerprint(), **{k: str(v) if v is not None else None for k, v in
        (("ratio", prune_settings.ratio), ("flops", prune_settings.flops))}, "scope": str(prune_settings.scope),
        "allocation": str(prune_settings.allocation), "criterion": str(prune_settings.criterion), "schedule": str(prune_settings.schedule),
        "strategy": str(strategy), "rounds": rounds, "reconstruct": reconstruct_settings and reconstruct_settings.to_dict(), "preset": str(preset),
        "epochs": settings.epochs, "precision": str(settings.precision),
        "imgsz": size, "num_images": num_images, "seed": seed, "synthetic": None if synthetic is None else str(synthetic.resolve()),
        "synthetic_content": None if dataset is None else dataset.content_id(),
    }
    run.check(request)
    return CompressPlan(original, run, request, prune_settings, strategy, ProgressiveSettings(), rounds, reconstruct_settings, settings, budget, size,
                        num_images, dataset, eval_data, export, int8, max_drop, seed, device)


@dataclass(frozen=True)
class CompressResult:
    run: RunDirectory
    summary: dict  # what report.json holds
    reports: list[ModelReport]
    verdict: Verdict | None
    gate_failure: str | None  # why --max-drop failed, if it did
    watched: Metric | None = None  # the metric the report's drop is measured in (with --data)


def _synthesize(plan: CompressPlan, folder: Path, count: int, seed: int, on_progress: ProgressCallback) -> SyntheticDataset:
    synthesis = plan_synthesis(plan.original, folder, num_images=count, imgsz=plan.imgsz, batch=min(SYNTHESIS_BATCH, count),
                               settings=plan.preset.synthesis, seed=seed, precision=plan.finetune.precision)
    if synthesis.shard_sizes:
        log.info("Synthesising %d image(s) at %d px from %s on %s (%s) into %s.", sum(synthesis.shard_sizes), plan.imgsz,
                 plan.original.describe(), plan.device, plan.finetune.precision, folder)
    return run_synthesis(plan.original, synthesis, device=plan.device, on_progress=on_progress)


@dataclass(frozen=True)
class Selection:
    """What pruning keeps: channels per group, and for one-shot pruning which ones (``chosen``: the cut and the refit read them)."""

    keep: dict[str, int]
    chosen: dict[str, torch.Tensor] | None


def _selection(plan: CompressPlan, dataset: SyntheticDataset, on_progress: ProgressCallback) -> Selection:
    """Decided once and saved (the allocation measures the groups and the energy criterion scores channels on images,
    which take a while): by rank 0 under torchrun, read by the others."""
    one_shot = plan.strategy == Strategy.ONESHOT  # (with --rounds, the pruned model of the report is cut in one shot too)

    def decide() -> None:
        saved = read_json(plan.run.pruning, "the pruning plan") if plan.run.pruning.exists() else {}
        if "keep" in saved and (saved.get("chosen") or not one_shot):
            return
        scored = scoring_images(plan.prune.criterion, dataset.probe)
        if "keep" not in saved:
            probe = dataset.probe(plan.progressive.probe_images).to(plan.device)
            saved["keep"] = plan_keep(plan.original, plan.prune, imgsz=plan.original.input_spec.imgsz, probe=probe, device=plan.device,
                                      images=scored, on_progress=on_progress)
        if one_shot:
            saved["chosen"] = {name: index.tolist() for name, index in choose(plan.original, plan.prune, saved["keep"], scored).items()}
        write_json(plan.run.pruning, saved)

    main_first(decide)
    saved = read_json(plan.run.pruning, "the pruning plan")
    chosen = saved.get("chosen")
    return Selection(saved["keep"], chosen and {name: torch.tensor(index, dtype=torch.long) for name, index in chosen.items()})


def _pruned(plan: CompressPlan, selection: Selection, dataset: SyntheticDataset, on_progress: ProgressCallback) -> ModelAdapter:
    if plan.strategy == Strategy.PROGRESSIVE:
        probe = dataset.probe(plan.progressive.probe_images)
        return progressive_prune(plan.original, plan.prune, selection.keep, plan.progressive, probe, seed=plan.seed, on_progress=on_progress)[0]
    return prune(plan.original, plan.prune, selection.chosen)[0]


def _reconstructed(plan: CompressPlan, pruned: ModelAdapter, selection: Selection, dataset: SyntheticDataset,
                   on_progress: ProgressCallback) -> ModelAdapter:
    images = dataset.load()[0][: plan.reconstruct.images]
    log.info("Reconstructing the pruned %s in closed form on %d synthetic image(s).", plan.prune.scope, len(images))
    student = pruned.with_model(copy.deepcopy(pruned.model))
    refit_pruned(student, plan.original, plan.prune.scope, selection.chosen, images, plan.reconstruct, device=plan.device, on_progress=on_progress)
    return student


def round_keep(sizes: dict[str, int], keep: dict[str, int], k: int, rounds: int) -> dict[str, int]:
    """Round ``k`` of ``rounds`` keeps this many per group: the final counts reached in equal steps."""
    return {name: sizes[name] - round((sizes[name] - keep[name]) * k / rounds) for name in keep}


def _distilled(plan: CompressPlan, keep: dict[str, int], start: ModelAdapter, dataset: SyntheticDataset,
               on_progress: ProgressCallback) -> tuple[ModelAdapter, list[EpochRecord]]:
    """Prune and distil in ``rounds`` steps (one: ``start``, the pruned or reconstructed model, is distilled once), each round's result kept."""
    run, original, rounds = plan.run, plan.original, plan.rounds
    history = [EpochRecord(**r) for r in read_json(run.history, "the fine-tuning history")] if run.history.exists() else []
    if run.compressed.exists() and run.history.exists():
        return original.reload(run.compressed), history
    images, _ = dataset.load()
    sizes = {g.name: g.size for g in original.channel_groups(plan.prune.scope)}
    settings = replace(plan.finetune, epochs=math.ceil(plan.finetune.epochs / rounds))
    student = original
    for k in range(1, rounds + 1):
        done = run.round(k) if k < rounds else run.compressed
        if done.exists():  # its history was written before it
            student = original.reload(done)
            continue
        history = [r for r in history if r.epoch <= (k - 1) * settings.epochs]  # a round interrupted after its history was written
        if rounds == 1:
            student = start.with_model(copy.deepcopy(start.model))
        else:
            chosen = choose(student, plan.prune, round_keep(sizes, keep, k, rounds), scoring_images(plan.prune.criterion, dataset.probe))
            student = prune(student, plan.prune, chosen)[0]
        log.info("Fine-tuning%s %d epoch(s) over %d image(s) at %d px on %s (%s).", f" round {k}/{rounds}:" if rounds > 1 else "",
                 settings.epochs, len(images), dataset.imgsz, plan.device, settings.precision)
        records = finetune(student, original, images, settings=settings, scope=plan.prune.scope, device=plan.device, seed=plan.seed + k - 1,
                           state_path=run.finetune_state(k), resume=True, data_id=dataset.content_id(), on_progress=on_progress)
        history += [replace(r, epoch=len(history) + r.epoch) for r in records]

        def record(student=student, done=done, k=k, history=history) -> None:
            write_json(run.history, [vars(r) for r in history])  # before the model: a model on disk means its round is recorded
            student.save(done)
            run.finetune_state(k).unlink(missing_ok=True)

        main_first(record)
    return student, history


def compress(plan: CompressPlan, *, on_progress: ProgressCallback = ignore) -> CompressResult:
    """Run the plan's stages, reusing every artefact the run directory already holds (one process at a time)."""
    with job_exclusive(plan.run.root, "--out"):
        return _run_stages(plan, on_progress)


def _run_stages(plan: CompressPlan, on_progress: ProgressCallback) -> CompressResult:
    run, original, world = plan.run, plan.original, current()
    barrier()  # every rank has checked the run directory before rank 0 writes into it
    if world.main:
        run.start(plan.request)
    dataset = plan.synthetic or _synthesize(plan, run.synthetic, plan.num_images, plan.seed, on_progress)
    selection = _selection(plan, dataset, on_progress)
    main_first(lambda: run.pruned.exists() or _pruned(plan, selection, dataset, on_progress).save(run.pruned))
    pruned = original.reload(run.pruned)
    start = pruned
    if plan.reconstruct is not None:
        main_first(lambda: run.reconstructed.exists() or _reconstructed(plan, pruned, selection, dataset, on_progress).save(run.reconstructed))
        start = original.reload(run.reconstructed)
    compressed, history = _distilled(plan, selection.keep, start, dataset, on_progress)
    count = min(HOLDOUT_IMAGES, max(2, plan.num_images // 4))
    holdout = _synthesize(plan, run.holdout, count, plan.seed + HOLDOUT_SEED_OFFSET, on_progress).load()[0].float() / 255
    if not world.main:  # under torchrun, rank 0 alone exports, evaluates and reports
        return CompressResult(run, {}, [], None, None)
    exported = None
    if plan.export is not None:
        target = run.exported(plan.export, plan.int8)
        if not target.exists():
            size = original.input_spec.imgsz
            calibration = None
            if plan.int8:  # at the export's size: the run's own images are at the preset's, a mismatch that costs INT8 accuracy (docs/export.md)
                calibration = dataset if dataset.imgsz == size else make_calibration_set(original, run.calibration, imgsz=size, device=plan.device,
                                                                                           seed=plan.seed, on_progress=on_progress)
            log.info("Exporting the compressed model to %s%s.", plan.export, " INT8, calibrated on synthetic images" if plan.int8 else "")
            export_model(compressed, plan.export, target, imgsz=size, calibration=calibration, on_progress=on_progress)
        exported = compressed.load_export(target)
    stages = [("pruned", pruned)] + ([("reconstructed", start)] if plan.reconstruct else []) + [("compressed", compressed)]
    fidelity = {stage: feature_gap(model, original, holdout, scope=plan.prune.scope, device=plan.device) for stage, model in stages}
    reports, baseline, verdict = _evaluate(plan, pruned, compressed, exported, on_progress)
    metric = None if plan.eval_data is None else watched_metric(original, plan.eval_data)
    drop = None if metric is None else (reports[0].metrics[metric.name] - reports[2].metrics[metric.name]) * (1 if metric.higher_is_better else -1)
    summary = write_report(run.root, plan.request, reports, history, metric=metric and metric.name, drop=drop, fidelity=fidelity,
                           baseline=baseline, verdict=verdict, precision=plan.finetune.precision,
                           files={"pruned": run.pruned, "compressed": run.compressed})
    failure = None
    if plan.max_drop is not None and drop > plan.max_drop:
        failure = f"{metric.name} dropped by {drop:.4g}, more than --max-drop {plan.max_drop}."
    return CompressResult(run, summary, reports + ([baseline] if baseline else []), verdict, failure, metric)


def _evaluate(plan: CompressPlan, pruned: ModelAdapter, compressed: ModelAdapter, exported: ModelAdapter | None,
              on_progress: ProgressCallback) -> tuple[list[ModelReport], ModelReport | None, Verdict | None]:
    """Original, pruned, compressed (and its export) at the model's size; with labelled data and a free input
    size, also the original at the size of the compressed model's GFLOPs (the free alternative), and the verdict."""
    original, size, data = plan.original, plan.original.input_spec.imgsz, plan.eval_data
    candidates = [Candidate("original", original, size), Candidate("pruned", pruned, size), Candidate("compressed", compressed, size)]
    if exported is not None:
        candidates.append(Candidate(f"compressed {'INT8' if plan.int8 else 'FP32'} {plan.export}", exported, size))
    baseline = None if data is None or isinstance(data, ImageFolder) else free_alternative(original, compressed, size, "original")
    if data is not None:
        log.info("Evaluating %s on %s.", ", ".join(c.label for c in candidates + [baseline] if c), data.source)
    reports = evaluate_models(candidates + ([baseline] if baseline else []), data, teacher=original if isinstance(data, ImageFolder) else None,
                              batch=EVAL_BATCH, device=plan.device, on_progress=on_progress)
    if baseline is None:
        return reports, None, None
    return reports[:-1], reports[-1], Verdict.of(watched_metric(original, data), reports[2], reports[-1])

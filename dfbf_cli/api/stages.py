"""The single-stage commands as functions: synthesize, prune, finetune."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dfbf_cli.api.common import as_device, at_least, choice, dfbf_log, pruning_target, read_synthetic_set
from dfbf_cli.engine.progress import ProgressCallback, ignore
from dfbf_cli.errors import DfbfError, refuse_unused
from dfbf_cli.files import Kind, Output, check_outputs, input_paths
from dfbf_cli.settings import (
    DEFAULT_PRESET,
    DEFAULT_SCOPE,
    PRESETS,
    SYNTHESIS_BATCH,
    Allocation,
    Criterion,
    FinetuneSettings,
    Precision,
    PresetName,
    ProgressiveSettings,
    PruneSettings,
    ReconstructSettings,
    Schedule,
    Scope,
    Strategy,
)

if TYPE_CHECKING:
    import torch

    from dfbf_cli.contract import ModelAdapter
    from dfbf_cli.engine.efficiency import Efficiency
    from dfbf_cli.engine.pruning import GroupOutcome
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset



def synthesize(model: str, out: str | Path, *, weights: str | None = None, preset: PresetName = DEFAULT_PRESET, num_images: int | None = None,
               imgsz: int | None = None, iterations: int | None = None, low_res_iterations: int | None = None, batch: int = SYNTHESIS_BATCH,
               device: str | torch.device = "auto", precision: Precision = Precision.AUTO, seed: int = 0,
               on_progress: ProgressCallback = ignore) -> SyntheticDataset:
    """Synthetic images of ``model`` in the dataset folder ``out`` (made, or continued with the same settings)."""
    from dfbf_cli.adapters import load_model
    from dfbf_cli.engine.efficiency import check_imgsz
    from dfbf_cli.engine.runtime import resolve_precision
    from dfbf_cli.engine.synthesis import plan_synthesis, run_synthesis

    where, out = as_device(device), Path(out)
    chosen, precision = PRESETS[choice(PresetName, preset, "--preset")], choice(Precision, precision, "--precision")
    at_least("--imgsz", imgsz, 8), at_least("--num-images", num_images, 2), at_least("--batch", batch, 2)
    adapter = load_model(model, weights)
    check_outputs([Output("--out", out, Kind.DIRECTORY)], input_paths(model=model, weights=weights))
    size = imgsz or chosen.imgsz(adapter.input_spec.imgsz)
    check_imgsz(adapter, size, batch, where, training=True)
    settings = replace(chosen.synthesis, iterations=chosen.synthesis.iterations if iterations is None else iterations,
                       low_res_iterations=chosen.synthesis.low_res_iterations if low_res_iterations is None else low_res_iterations)
    settings.validate()
    arithmetic = resolve_precision(precision, where)
    plan = plan_synthesis(adapter, out, num_images=num_images or chosen.num_images(size), imgsz=size, batch=batch, settings=settings, seed=seed,
                          precision=arithmetic)
    dfbf_log().info("Synthesising %d image(s) at %d px from %s on %s (%s) into %s (%d already there).", sum(plan.shard_sizes), size,
                    adapter.describe(), where, arithmetic, out, plan.dataset.num_images)
    return run_synthesis(adapter, plan, device=where, on_progress=on_progress)


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune` made: the model (written to ``path`` unless a dry run), per-layer outcomes, costs before and after."""

    model: ModelAdapter
    path: Path | None
    settings: PruneSettings
    outcomes: list[GroupOutcome]
    before: Efficiency
    after: Efficiency
    reconstructed: bool


def prune(model: str, *, ratio: float | None = None, flops: float | None = None, weights: str | None = None, out: str | Path | None = None,
          scope: Scope = DEFAULT_SCOPE, allocation: Allocation = Allocation.UNIFORM, criterion: Criterion | None = None,
          schedule: Schedule = Schedule.UNIFORM, min_channels: int = 8, round_to: int = 1, strategy: Strategy = Strategy.ONESHOT,
          synthetic: str | Path | None = None, reconstruct: bool = False, steps: int | None = None, dry_run: bool = False,
          imgsz: int | None = None, latency_runs: int = 20, device: str | torch.device = "auto", seed: int = 0,
          on_progress: ProgressCallback = ignore) -> Pruned:
    """``model`` with channels removed for real, to a ratio or a GFLOPs target; the task head stays bit-identical.
    ``criterion`` None: energy with ``reconstruct``, L1 without."""
    from dfbf_cli.adapters import load_model
    from dfbf_cli.engine.distributed import current
    from dfbf_cli.engine.efficiency import check_imgsz, measure_efficiency
    from dfbf_cli.engine.progressive import progressive_prune
    from dfbf_cli.engine.pruning import choose, plan_keep, scoring_images
    from dfbf_cli.engine.pruning import prune as prune_model
    from dfbf_cli.engine.reconstruct import refit_pruned

    where, strategy = as_device(device), choice(Strategy, strategy, "--strategy")
    settings = pruning_target(ratio, flops, reconstruct=reconstruct, scope=scope, allocation=allocation, criterion=criterion, schedule=schedule,
                              min_channels=min_channels, round_to=round_to)
    at_least("--imgsz", imgsz, 8), at_least("--latency-runs", latency_runs, 1), at_least("--steps", steps, 1)
    progressive = strategy == Strategy.PROGRESSIVE
    energy = settings.criterion == Criterion.ENERGY
    needs_images = reconstruct or progressive or energy or (flops is not None and settings.allocation == Allocation.SENSITIVITY)
    refuse_unused(steps=(steps is not None and not progressive, "applies to --strategy progressive."),
                  synthetic=(synthetic is not None and not needs_images, "is read by --reconstruct, --strategy progressive, --criterion energy "
                             "and --allocation sensitivity only."),
                  reconstruct=(reconstruct and progressive, "follows one-shot pruning; progressive pruning merges channels instead."),
                  out=(out is not None and dry_run, "does not apply to --dry-run, which writes nothing."))
    progressive_settings = replace(ProgressiveSettings(), steps=steps or ProgressiveSettings.steps)
    original = load_model(model, weights)
    path = None if dry_run else original.output_path(None if out is None else Path(out),
                                                     f"pruned{round(ratio * 100)}" if ratio else f"flops{round(flops * 100)}")
    if path is not None:
        check_outputs([Output("--out", path)], input_paths(model=model, weights=weights, synthetic=synthetic))
    size = imgsz or original.input_spec.imgsz
    check_imgsz(original, size, 1, where, training=False)
    probe = images = scored = None
    if needs_images:
        if synthetic is None:
            raise DfbfError("--reconstruct, --strategy progressive, --criterion energy and --allocation sensitivity work on synthetic images: "
                            "pass --synthetic DIR (from 'dfbf synthesize').")
        dataset = read_synthetic_set(synthetic, original, minimum=1, what="pruning", override=None)
        probe = dataset.probe(progressive_settings.probe_images)
        images = dataset.load()[0][: ReconstructSettings.images] if reconstruct else None
        scored = scoring_images(settings.criterion, dataset.probe)
    keep = plan_keep(original, settings, imgsz=size, probe=probe, device=where, images=scored, on_progress=on_progress)
    if progressive:
        pruned, outcomes = progressive_prune(original, settings, keep, progressive_settings, probe, seed=seed, on_progress=on_progress)
    else:
        chosen = choose(original, settings, keep, scored)
        pruned, outcomes = prune_model(original, settings, chosen)
        if images is not None:
            refit_pruned(pruned, original, settings.scope, chosen, images, ReconstructSettings(), device=where, on_progress=on_progress)
    before, after = measure_efficiency([(original, size), (pruned, size)], device=where, runs=latency_runs)
    if path is not None and current().main:
        pruned.save(path)
    return Pruned(pruned, path, settings, outcomes, before, after, images is not None)


@dataclass(frozen=True)
class Finetuned:
    """What :func:`finetune` made: the student (written to ``path``), its settings and per-epoch history."""

    model: ModelAdapter
    path: Path
    scope: Scope
    settings: FinetuneSettings
    history: list


def finetune(pruned: str, teacher: str, data: str | Path, *, out: str | Path | None = None, weights: str | None = None,
             teacher_weights: str | None = None, scope: Scope | None = None, resume: bool = False, allow_teacher_mismatch: bool = False,
             device: str | torch.device = "auto", precision: Precision = Precision.AUTO, seed: int = 0, on_progress: ProgressCallback = ignore,
             **settings) -> Finetuned:
    """Train ``pruned``'s pruned part to reproduce ``teacher``'s features on the synthetic set ``data``; the head is
    the teacher's. ``settings``: any :class:`FinetuneSettings` field (epochs default to the balanced preset's steps)."""
    from dfbf_cli.adapters import load_model
    from dfbf_cli.engine.distributed import check_batch_split, current
    from dfbf_cli.engine.efficiency import check_imgsz
    from dfbf_cli.engine.finetune import check_compatible, fitting_scope
    from dfbf_cli.engine.finetune import finetune as distil
    from dfbf_cli.engine.runtime import resolve_precision

    where, precision = as_device(device), choice(Precision, precision, "--precision")
    scope = None if scope is None else choice(Scope, scope, "--scope")
    unknown = set(settings) - {f.name for f in fields(FinetuneSettings)} | ({"precision"} & set(settings))
    if unknown:
        raise DfbfError(f"finetune() takes no setting {', '.join(sorted(unknown))}; see FinetuneSettings.")
    batch = settings.get("batch", FinetuneSettings.batch)
    FinetuneSettings(**{**settings, "epochs": settings.get("epochs") or 1}).validate()  # the options first, before any model is read
    check_batch_split(batch)
    student = load_model(pruned, weights)
    original = load_model(teacher, teacher_weights, "--teacher-weights")
    dataset = read_synthetic_set(data, original, minimum=2, what="fine-tuning", allow_mismatch=allow_teacher_mismatch)
    if settings.get("epochs") is None:
        settings["epochs"] = PRESETS[DEFAULT_PRESET].epochs(dataset.num_images, batch, dataset.imgsz)
    chosen = FinetuneSettings(**settings, precision=resolve_precision(precision, where))  # the record says bf16 or fp32, not auto
    path = student.output_path(None if out is None else Path(out), "finetuned")
    state_path = path.with_name(f"{path.stem}.finetune-state.pt")
    check_outputs([Output("--out", path), Output("the fine-tuning checkpoint", state_path)],
                  input_paths(model=pruned, teacher=teacher, weights=weights, teacher_weights=teacher_weights, data=data))
    check_imgsz(student, dataset.imgsz, min(batch, dataset.num_images), where, training=True)
    scope = scope or fitting_scope(student, original, dataset.imgsz)
    check_compatible(student, original, dataset.imgsz, scope)
    images, _ = dataset.load()
    dfbf_log().info("Fine-tuning %d epoch(s) over %d image(s) at %d px on %s (%s), scope %s.", chosen.epochs, len(images), dataset.imgsz, where,
                chosen.precision, scope)
    history = distil(student, original, images, settings=chosen, scope=scope, device=where, seed=seed, state_path=state_path, resume=resume,
                     data_id=dataset.content_id(), on_progress=on_progress)
    if current().main:  # under torchrun, rank 0 writes the one checkpoint
        student.save(path)
        state_path.unlink(missing_ok=True)
    return Finetuned(student, path, scope, chosen, history)



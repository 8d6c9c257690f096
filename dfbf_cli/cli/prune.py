"""``dfbf prune``: remove channels for real (fewer parameters, FLOPs and milliseconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfbf_cli.cli.common import (
    MODEL_HELP,
    AllocationOption,
    CriterionOption,
    DeviceOption,
    FlopsOption,
    JsonOption,
    QuietOption,
    RatioOption,
    ScheduleOption,
    ScopeOption,
    SeedOption,
    StrategyOption,
    WeightsOption,
    input_paths,
    refuse_unused,
    session,
)
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import DEFAULT_SCOPE, Allocation, Criterion, ProgressiveSettings, Schedule, Strategy


def prune_command(
    model: Annotated[str, typer.Argument(help=f"The model to prune. {MODEL_HELP}", show_default=False)],
    ratio: RatioOption = None,
    flops: FlopsOption = None,
    scope: ScopeOption = DEFAULT_SCOPE,
    allocation: AllocationOption = Allocation.UNIFORM,
    out: Annotated[Path | None, typer.Option("--out", help="Output file, in the input's format \\[default: NAME-pruned.EXT here].", show_default=False)] = None,
    criterion: CriterionOption = Criterion.L1,
    schedule: ScheduleOption = Schedule.UNIFORM,
    min_channels: Annotated[int, typer.Option("--min-channels", min=1, help="Never keep fewer channels than this in a group.")] = 8,
    round_to: Annotated[int, typer.Option("--round-to", min=1, help="Round kept channels to a multiple of this (8 suits most hardware).")] = 1,
    strategy: StrategyOption = Strategy.ONESHOT,
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="Synthetic dataset of this model (for --reconstruct, --strategy "
        "progressive and --allocation sensitivity).")] = None,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Then refit the pruned layers in closed form to the original's outputs on "
        "--synthetic images (about a minute): a far better start for 'dfbf finetune'.")] = False,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help=f"Progressive: rounds to reach the target \\[default: "
        f"{ProgressiveSettings.steps}].", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what pruning would do; write nothing.")] = False,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Image size for GFLOPs and latency \\[default: the model's].")] = None,
    latency_runs: Annotated[int, typer.Option("--latency-runs", min=1, help="Timed forward passes per latency figure (median).")] = 20,
    weights: WeightsOption = None,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Prune channels by L1 norm (or BN scale) to a ratio or a GFLOPs target; the task head stays bit-identical.

    The result uses stock modules: a pruned YOLO checkpoint loads with plain ultralytics.YOLO(path).
    Recover its accuracy with 'dfbf finetune' (or do everything with 'dfbf compress').

    Examples:

      dfbf prune yolo11n-pose.pt --ratio 0.3 --out yolo11n-pose-p30.pt

      dfbf prune yolo11n-pose.pt --flops 0.7 --scope trunk --dry-run

      dfbf prune yolo11n-pose.pt --ratio 0.3 --synthetic synth/ --reconstruct

      dfbf prune cifar-resnet56 --weights r56.th --ratio 0.5 --out r56-p50.safetensors
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        from dataclasses import replace

        from dfbf_cli.adapters import load_model
        from dfbf_cli.cli.tables import stage_table, summary_table
        from dfbf_cli.engine.distributed import current
        from dfbf_cli.engine.efficiency import check_imgsz, measure_efficiency
        from dfbf_cli.engine.files import Output, check_outputs
        from dfbf_cli.engine.progressive import progressive_prune
        from dfbf_cli.engine.pruning import plan_keep, prune
        from dfbf_cli.engine.reconstruct import refit_pruned
        from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
        from dfbf_cli.settings import PruneSettings, ReconstructSettings, require_fraction

        if ratio is not None:
            require_fraction("--ratio", ratio)
        settings = PruneSettings(ratio, flops, scope, allocation, criterion, schedule, min_channels, round_to)
        settings.validate()
        progressive = strategy == Strategy.PROGRESSIVE
        needs_images = reconstruct or progressive or (flops is not None and allocation == Allocation.SENSITIVITY)
        refuse_unused(steps=(steps is not None and not progressive, "applies to --strategy progressive."),
                      synthetic=(synthetic is not None and not needs_images, "is read by --reconstruct, --strategy progressive and --allocation "
                                 "sensitivity only."),
                      reconstruct=(reconstruct and progressive, "follows one-shot pruning; progressive pruning merges channels instead."),
                      out=(out is not None and dry_run, "does not apply to --dry-run, which writes nothing."))
        progressive_settings = replace(ProgressiveSettings(), steps=steps or ProgressiveSettings.steps)
        original = load_model(model, weights)
        path = None if dry_run else original.output_path(out, f"pruned{round(ratio * 100)}" if ratio else f"flops{round(flops * 100)}")
        if path is not None:
            check_outputs([Output("--out", path)], input_paths(model=model, weights=weights, synthetic=synthetic))
        size = imgsz or original.input_spec.imgsz
        check_imgsz(original, size, 1, ctx.device, training=False)
        probe = images = None
        if needs_images:
            if synthetic is None:
                raise DfbfError("--reconstruct, --strategy progressive and --allocation sensitivity work on synthetic images: pass --synthetic DIR "
                                "(from 'dfbf synthesize').")
            dataset = SyntheticDataset.open(synthetic)
            dataset.verify()
            dataset.check_teacher(original.fingerprint(), allow_mismatch=False, override=None)
            probe = dataset.probe(progressive_settings.probe_images)
            images = dataset.load()[0][: ReconstructSettings.images] if reconstruct else None
        with ctx.progress() as show:
            keep = plan_keep(original, settings, imgsz=size, probe=probe, device=ctx.device, on_progress=show)
            if progressive:
                pruned, outcomes = progressive_prune(original, settings, keep, progressive_settings, probe, seed=seed, on_progress=show)
            else:
                pruned, outcomes = prune(original, settings, keep)
            if images is not None:
                refit_pruned(pruned, original, settings, keep, images, ReconstructSettings(), device=ctx.device, on_progress=show)
        before, after = measure_efficiency([(original, size), (pruned, size)], device=ctx.device, runs=latency_runs)
        if path is not None and current().main:
            pruned.save(path)
        ctx.results.print(stage_table(outcomes))
        ctx.results.print(summary_table(before, after))
        ctx.say("Dry run: nothing written." if path is None else f"Pruned model written to {path}")
        ctx.emit({
            "command": "prune", "model": model, "out": None if path is None else str(path), "dry_run": dry_run,
            "settings": {k: str(v) if hasattr(v, "value") else v for k, v in vars(settings).items()}, "strategy": str(strategy),
            "reconstructed": images is not None,
            "imgsz": size, "before": before.to_dict(), "after": after.to_dict(),
            "reduction": {k: 1 - after.to_dict()[k] / v for k, v in before.to_dict().items() if isinstance(v, (int, float)) and v and k != "imgsz"},
            "pruned_layers": [vars(o) for o in outcomes if o.after < o.before],
        })

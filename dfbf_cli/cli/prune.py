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
    session,
)
from dfbf_cli.settings import DEFAULT_SCOPE, Allocation, ProgressiveSettings, Schedule, Strategy


def prune_command(
    model: Annotated[str, typer.Argument(help=f"The model to prune. {MODEL_HELP}", show_default=False)],
    ratio: RatioOption = None,
    flops: FlopsOption = None,
    scope: ScopeOption = DEFAULT_SCOPE,
    allocation: AllocationOption = Allocation.UNIFORM,
    out: Annotated[Path | None, typer.Option("--out", help="Output file, in the input's format \\[default: NAME-pruned.EXT here].", show_default=False)] = None,
    criterion: CriterionOption = None,
    schedule: ScheduleOption = Schedule.UNIFORM,
    min_channels: Annotated[int, typer.Option("--min-channels", min=1, help="Never keep fewer channels than this in a group.")] = 8,
    round_to: Annotated[int, typer.Option("--round-to", min=1, help="Round kept channels to a multiple of this (8 suits most hardware).")] = 1,
    strategy: StrategyOption = Strategy.ONESHOT,
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="Synthetic dataset of this model (for --reconstruct, --strategy "
        "progressive, --criterion energy and --allocation sensitivity).")] = None,
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
        from dfbf_cli.api import prune
        from dfbf_cli.cli.tables import stage_table, summary_table

        with ctx.progress() as show:
            done = prune(model, ratio=ratio, flops=flops, weights=weights, out=out, scope=scope, allocation=allocation, criterion=criterion,
                         schedule=schedule, min_channels=min_channels, round_to=round_to, strategy=strategy, synthetic=synthetic,
                         reconstruct=reconstruct, steps=steps, dry_run=dry_run, imgsz=imgsz, latency_runs=latency_runs, device=ctx.device,
                         seed=seed, on_progress=show)
        before, after = done.before.to_dict(), done.after.to_dict()
        ctx.results.print(stage_table(done.outcomes))
        ctx.results.print(summary_table(done.before, done.after))
        ctx.say("Dry run: nothing written." if done.path is None else f"Pruned model written to {done.path}")
        ctx.emit({
            "command": "prune", "model": model, "out": None if done.path is None else str(done.path), "dry_run": dry_run,
            "settings": {k: str(v) if hasattr(v, "value") else v for k, v in vars(done.settings).items()}, "strategy": str(strategy),
            "reconstructed": done.reconstructed, "imgsz": before["imgsz"], "before": before, "after": after,
            "reduction": {k: 1 - after[k] / v for k, v in before.items() if isinstance(v, (int, float)) and v and k != "imgsz"},
            "pruned_layers": [vars(o) for o in done.outcomes if o.after < o.before],
        })

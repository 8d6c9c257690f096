"""``dfbf prune``: remove backbone channels for real (fewer parameters, FLOPs and milliseconds)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from dfbf_cli.adapters import ModelAdapter, load_model
from dfbf_cli.cli.common import DeviceOption, JsonOption, QuietOption, SeedOption, Session, WeightsOption, session
from dfbf_cli.engine.efficiency import Efficiency, measure_efficiency
from dfbf_cli.engine.progressive import ProgressiveSettings, check_strategy, prune_with_strategy
from dfbf_cli.engine.pruning import GroupOutcome, PruneSettings, require_ratio
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset


def stage_table(outcomes: list[GroupOutcome]) -> Table:
    stages: dict[str, list[GroupOutcome]] = defaultdict(list)
    for outcome in outcomes:
        stages[outcome.stage].append(outcome)
    table = Table(title="channels per stage (prunable groups)", title_justify="left")
    for column in ("stage", "groups", "before", "after", "removed"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, members in stages.items():
        before, after = sum(m.before for m in members), sum(m.after for m in members)
        table.add_row(stage, str(len(members)), str(before), str(after), f"{1 - after / before:.0%}")
    return table


def _reduction(before: float, after: float) -> str:
    return f"{1 - after / before:+.1%}".replace("+", "−") if before else "-"


def summary_table(before: Efficiency, after: Efficiency) -> Table:
    table = Table(title="before → after", title_justify="left")
    for column in ("", "original", "pruned", "reduction"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [
        ("backbone params (M)", before.backbone_params / 1e6, after.backbone_params / 1e6, "{:.3f}"),
        ("params (M)", before.params / 1e6, after.params / 1e6, "{:.3f}"),
        ("GFLOPs", before.gflops, after.gflops, "{:.2f}"),
        ("CPU latency (ms)", before.latency_cpu_ms, after.latency_cpu_ms, "{:.1f}"),
    ]
    if before.latency_device_ms is not None:
        rows.append(("device latency (ms)", before.latency_device_ms, after.latency_device_ms, "{:.2f}"))
    for label, b, a, fmt in rows:
        table.add_row(label, fmt.format(b), fmt.format(a), _reduction(b, a))
    return table


def pruned_model(
    ctx: Session, original: ModelAdapter, settings: PruneSettings, strategy: str, probe: torch.Tensor | None,
    progressive: ProgressiveSettings, seed: int,
) -> tuple[ModelAdapter, list[GroupOutcome]]:
    """Prune with a progress bar for the progressive strategy (shared by ``prune`` and ``compress``)."""
    with ctx.progress() as progress:
        task = progress.add_task(f"prune ({strategy})", total=None, status="")

        def on_step(step: int, removed: int, total: int, score: float) -> None:
            progress.update(task, total=total, completed=removed,
                            status=f"step {step}/{progressive.steps} · {removed}/{total} channels merged · layer score {score:.4f}")

        return prune_with_strategy(original, settings, strategy, probe=probe, progressive=progressive, seed=seed, on_step=on_step)


def prune_command(
    model: Annotated[str, typer.Argument(help="The model to prune (YOLO .pt/.yaml, torchvision:NAME, cifar-resnetN).", show_default=False)],
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of each prunable layer's channels to remove, 0 < R < 1.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="Output file, in the input's format \\[default: NAME-pruned.EXT here].", show_default=False)] = None,
    criterion: Annotated[str, typer.Option("--criterion", help="Channel importance: l1 (filter L1 norm) or bn (BatchNorm |gamma|).")] = "l1",
    schedule: Annotated[str, typer.Option("--schedule", help="uniform (same ratio everywhere) or layer-dependent (DFBF's rule: more in wide layers).")] = "uniform",
    min_channels: Annotated[int, typer.Option("--min-channels", help="Never keep fewer channels than this in a layer.")] = 8,
    round_to: Annotated[int, typer.Option("--round-to", help="Round kept channels to a multiple of this (8 suits most hardware).")] = 1,
    strategy: Annotated[str, typer.Option("--strategy", help="oneshot (all at once by --criterion) or progressive (Paoding-style: small steps, channels merged into their most similar survivor, scored on --synthetic images).")] = "oneshot",
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="Synthetic dataset of this model (for --strategy progressive).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Progressive: rounds to reach the ratio.")] = 8,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what pruning would do; write nothing.")] = False,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Image size for GFLOPs and latency \\[default: the model's].")] = None,
    latency_runs: Annotated[int, typer.Option("--latency-runs", min=1, help="Timed forward passes per latency figure (median).")] = 20,
    weights: WeightsOption = None,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Prune the backbone's channels by L1 norm (or BN scale); the head stays bit-identical.

    The result uses stock modules: a pruned YOLO checkpoint loads with plain ultralytics.YOLO(path).

    Examples:

      dfbf prune yolo11n-pose.pt --ratio 0.3 --out yolo11n-pose-p30.pt

      dfbf prune cifar-resnet56 --weights r56.th --ratio 0.5 --out r56-p50.safetensors

      dfbf prune yolo11n.pt --ratio 0.5 --round-to 8 --dry-run --json
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        require_ratio(ratio)
        settings = PruneSettings(ratio, criterion, schedule, min_channels, round_to)
        settings.validate()
        check_strategy(strategy)
        original = load_model(model, weights)
        path = None if dry_run else original.output_path(out, f"pruned{round(ratio * 100)}")
        progressive = ProgressiveSettings(steps=steps)
        probe = None
        if synthetic is not None:
            dataset = SyntheticDataset.open(synthetic)
            dataset.check_teacher(original.fingerprint(), allow_mismatch=False)
            probe = dataset.probe(progressive.probe_images)
        pruned, outcomes = pruned_model(ctx, original, settings, strategy, probe, progressive, seed)
        size = imgsz or original.input_spec.imgsz
        before, after = measure_efficiency([original, pruned], imgsz=size, device=ctx.device, runs=latency_runs)
        if path is not None:
            pruned.save(path)
        ctx.console.print(stage_table(outcomes))
        ctx.console.print(summary_table(before, after))
        ctx.console.print("Dry run: nothing written." if path is None else f"Pruned model written to {path}", highlight=False)
        ctx.emit({
            "command": "prune", "model": model, "out": None if path is None else str(path), "dry_run": dry_run,
            "settings": vars(settings), "strategy": strategy, "imgsz": size, "before": before.to_dict(), "after": after.to_dict(),
            "reduction": {k: 1 - after.to_dict()[k] / v for k, v in before.to_dict().items() if isinstance(v, (int, float)) and v},
            "pruned_layers": [vars(o) for o in outcomes if o.after < o.before],
        })

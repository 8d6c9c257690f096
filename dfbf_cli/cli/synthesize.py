"""``dfbf synthesize``: dream up a synthetic dataset from the model itself, or inspect one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dfbf_cli.adapters import ModelAdapter, load_model
from dfbf_cli.cli.common import DeviceOption, JsonOption, PrecisionOption, QuietOption, SeedOption, WeightsOption, session
from dfbf_cli.engine.presets import DEFAULT_PRESET, PRESETS
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.engine.synthesis import SynthesisPlan, plan_synthesis, run_synthesis
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.errors import DfbfError

PresetName = typer.Option("--preset", help="Budget: quick (minutes), balanced (the default), paper (the reference settings: slow).")


def manifest_table(dataset: SyntheticDataset) -> Table:
    m = dataset.manifest
    table = Table(title=f"synthetic dataset {dataset.root}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("images", f"{dataset.num_images} in {len(m['shards'])} shard(s), {m['imgsz']}×{m['imgsz']} px"),
        ("teacher", f"{m['teacher']['name']} ({m['teacher']['family']} {m['teacher']['task']})"),
        ("fingerprint", m["teacher"]["fingerprint"]),
        ("generation", ", ".join(f"{k}={v}" for k, v in m["generation"].items())),
        ("made by", f"dfbf {m['dfbf_version']} (format v{m['format_version']})"),
    ]
    if m["shards"]:
        last = m["shards"][-1]
        rows.append(("last shard", f"BN loss {last['bn_loss_start']:.1f} → {last['bn_loss_end']:.1f} in {last['seconds']:.0f} s"))
    for row in rows:
        table.add_row(*row)
    return table


def run_synthesis_with_progress(ctx, adapter: ModelAdapter, plan: SynthesisPlan, precision: str) -> SyntheticDataset:
    """Fill the planned shards with a progress bar (shared by ``synthesize`` and ``compress``); ``precision`` is
    already resolved (bf16 or fp32)."""
    existing = plan.dataset.num_images
    if not ctx.quiet:
        ctx.console.print(
            f"Synthesising {sum(plan.shard_sizes)} image(s) at {plan.dataset.imgsz} px from {adapter.describe()} "
            f"on {ctx.device} ({precision}) into {plan.dataset.root} ({existing} already there).", highlight=False,
        )
    steps = plan.settings.low_res_iterations + plan.settings.iterations
    with ctx.progress() as progress:
        task = progress.add_task("synthesize", total=plan.total_iterations, status="")

        def on_step(shard: int, done: int, loss: float, rate: float) -> None:
            progress.update(task, completed=shard * steps + done,
                            status=f"batch {shard + 1}/{len(plan.shard_sizes)} · it {done}/{steps} · loss {loss:.3f} · {rate:.0f} img·it/s")

        return run_synthesis(adapter, plan, device=ctx.device, precision=precision, on_step=on_step)


def synthesize_command(
    model: Annotated[str | None, typer.Argument(help="The model to synthesise images from (its backbone's BatchNorm statistics).", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Dataset directory: created, or continued when it holds the same settings.", show_default=False)] = None,
    preset: Annotated[str, PresetName] = DEFAULT_PRESET,
    num_images: Annotated[int | None, typer.Option("--num-images", min=1, help="Images wanted in total (more than exist: the rest are appended) \\[default: preset].")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Image size \\[default: the model's, capped by the preset].")] = None,
    iterations: Annotated[int | None, typer.Option("--iterations", min=1, help="Full-resolution steps per batch \\[default: preset].")] = None,
    low_res_iterations: Annotated[int | None, typer.Option("--low-res-iterations", min=0, help="Half-resolution steps first (0 disables) \\[default: preset].")] = None,
    batch: Annotated[int, typer.Option("--batch", min=2, help="Images optimised together (BatchNorm statistics need several); one shard each.")] = 32,
    weights: WeightsOption = None,
    info: Annotated[Path | None, typer.Option("--info", help="Only describe an existing dataset directory and exit.")] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Generate synthetic training images from MODEL alone (no data), as a shareable dataset.

    Interrupted runs keep their finished shards: run the same command again to continue.

    Examples:

      dfbf synthesize yolo11n-pose.pt --out synth/ --preset quick

      dfbf synthesize cifar-resnet56 --weights r56.th --out synth-r56/ --num-images 512

      dfbf synthesize --info synth/
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        if info is not None:
            dataset = SyntheticDataset.open(info)
            dataset.verify()
            ctx.console.print(manifest_table(dataset))
            ctx.emit({"command": "synthesize", "info": str(info), "num_images": dataset.num_images, "manifest": dataset.manifest})
            return
        if model is None or out is None:
            raise DfbfError("Give MODEL and --out DIR (or --info DIR to describe a dataset).")
        if preset not in PRESETS:
            raise DfbfError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
        chosen = PRESETS[preset]
        precision = resolve_precision(precision, ctx.device)  # bf16 or fp32; an unknown one fails before the dataset is created
        adapter = load_model(model, weights)
        size = imgsz or chosen.imgsz(adapter.input_spec.imgsz)
        settings = replace(
            chosen.synthesis,
            iterations=chosen.synthesis.iterations if iterations is None else iterations,
            low_res_iterations=chosen.synthesis.low_res_iterations if low_res_iterations is None else low_res_iterations,
        )
        wanted = num_images or chosen.num_images(size)
        plan = plan_synthesis(adapter, out, num_images=wanted, imgsz=size, batch=batch, settings=settings, seed=seed)
        dataset = run_synthesis_with_progress(ctx, adapter, plan, precision)
        ctx.console.print(manifest_table(dataset))
        ctx.emit({"command": "synthesize", "out": str(out), "num_images": dataset.num_images, "manifest": dataset.manifest})

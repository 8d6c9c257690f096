"""``dfbf finetune``: recover a pruned model's accuracy on synthetic images, without real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from dfbf_cli.adapters import ModelAdapter, load_model
from dfbf_cli.cli.common import (
    DeviceOption,
    JsonOption,
    PrecisionOption,
    QuietOption,
    SeedOption,
    TeacherWeightsOption,
    WeightsOption,
    session,
)
from dfbf_cli.engine.finetune import EpochRecord, FinetuneSettings, finetune
from dfbf_cli.engine.presets import DEFAULT_PRESET, PRESETS, SMALL_INPUT
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

_BALANCED = PRESETS[DEFAULT_PRESET]
EpochsOption = Annotated[int | None, typer.Option("--epochs", min=1, help=(
    f"Passes over the synthetic images \\[default: the {DEFAULT_PRESET} preset's optimiser steps: {_BALANCED.finetune_steps_small:,} "
    f"for inputs up to {SMALL_INPUT} px, {_BALANCED.finetune_steps_large:,} for larger ones]."), show_default=False)]
BatchOption = Annotated[int, typer.Option("--batch", min=2, help="Images per step.")]
LrOption = Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine schedule).")]
WeightDecayOption = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay; 0 measured best with adam (the reference's SGD used 5e-4).")]
OptimizerOption = Annotated[str, typer.Option("--optimizer", help="adam (measured best here) or sgd (the reference: momentum 0.9).")]
LossOption = Annotated[str, typer.Option("--loss", help="Feature distance: l1 (the reference), mse or smoothl1.")]
TapWeightsOption = Annotated[str, typer.Option("--tap-weights", help="Weights over the feature taps: linear (rising with depth), uniform, or last (final output only).")]
AllowMismatchOption = Annotated[bool, typer.Option("--allow-teacher-mismatch", help="Use a synthetic dataset made from another model than --teacher.")]


def tap_summary(tap_losses: list[float]) -> str:
    """Loss of the shallow, middle and deep thirds of the taps (or each tap, when there are few)."""
    if len(tap_losses) <= 3:
        return " ".join(f"{v:.3f}" for v in tap_losses)
    thirds = [tap_losses[i * len(tap_losses) // 3 : (i + 1) * len(tap_losses) // 3] for i in range(3)]
    return "shallow/mid/deep " + "/".join(f"{sum(t) / len(t):.3f}" for t in thirds)


def run_finetune(
    ctx, progress: Progress, student: ModelAdapter, teacher: ModelAdapter, dataset: SyntheticDataset, *,
    settings: FinetuneSettings, seed: int, state_path: Path, resume: bool,
) -> list[EpochRecord]:
    """Fine-tune with a progress bar (shared by ``finetune`` and ``compress``)."""
    images, _ = dataset.load()
    if not ctx.quiet:
        ctx.console.print(f"Fine-tuning {settings.epochs} epoch(s) over {len(images)} image(s) at {dataset.imgsz} px on {ctx.device} "
                          f"({settings.precision}).", highlight=False)
    task = progress.add_task("finetune", total=settings.epochs, status="")

    def on_step(epoch: int, step: int, steps: int, loss: float, taps: list[float], rate: float) -> None:
        progress.update(task, completed=epoch + step / steps,
                        status=f"epoch {epoch + 1}/{settings.epochs} · loss {loss:.4f} · {tap_summary(taps)} · {rate:.0f} img/s")

    return finetune(student, teacher, images, settings=settings, device=ctx.device, seed=seed,
                    state_path=state_path, resume=resume, on_step=on_step)


def finetune_command(
    pruned: Annotated[str, typer.Argument(help="The pruned model (from 'dfbf prune').", show_default=False)],
    teacher: Annotated[str, typer.Option("--teacher", help="The original, unpruned model.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="Synthetic dataset directory (from 'dfbf synthesize' on the teacher).", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="Output model file, in the input's format \\[default: NAME-finetuned.EXT here].", show_default=False)] = None,
    epochs: EpochsOption = None,
    batch: BatchOption = 32,
    lr: LrOption = 1e-3,
    weight_decay: WeightDecayOption = 0.0,
    optimizer: OptimizerOption = "adam",
    loss: LossOption = "l1",
    tap_weights: TapWeightsOption = "linear",
    bn: Annotated[str, typer.Option("--bn", help="Student BatchNorm: train (batch statistics on synthetic images) or frozen.")] = "train",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished epoch.")] = False,
    allow_teacher_mismatch: AllowMismatchOption = False,
    weights: WeightsOption = None,
    teacher_weights: TeacherWeightsOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Train the pruned backbone to reproduce the original backbone's features; reattach the original head.

    A checkpoint is written after every epoch (NAME.finetune-state.pt beside --out); after an
    interruption, run the same command with --resume.

    Example:

      dfbf finetune yolo11n-pose-pruned30.pt --teacher yolo11n-pose.pt --data synth/ --out yolo11n-pose-ft.pt
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        dataset = SyntheticDataset.open(data)
        settings = FinetuneSettings(epochs=epochs or PRESETS[DEFAULT_PRESET].epochs(dataset.num_images, batch, dataset.imgsz), batch=batch, lr=lr, weight_decay=weight_decay, optimizer=optimizer, loss=loss, tap_weights=tap_weights, bn=bn,
                                    precision=resolve_precision(precision, ctx.device))  # the JSON says bf16 or fp32, not auto
        settings.validate()
        student = load_model(pruned, weights)
        original = load_model(teacher, teacher_weights)
        path = student.output_path(out, "finetuned")
        dataset.check_teacher(original.fingerprint(), allow_mismatch=allow_teacher_mismatch)
        state_path = path.with_name(f"{path.stem}.finetune-state.pt")
        with ctx.progress() as progress:
            history = run_finetune(ctx, progress, student, original, dataset, settings=settings, seed=seed, state_path=state_path, resume=resume)
        student.save(path)
        state_path.unlink(missing_ok=True)
        ctx.console.print(f"Fine-tuned model written to {path} (final feature loss {history[-1].loss:.4f}).", highlight=False)
        ctx.emit({"command": "finetune", "out": str(path), "settings": vars(settings),
                  "history": [vars(r) for r in history]})

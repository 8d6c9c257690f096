"""``dfbf finetune``: recover a pruned model's accuracy on synthetic images, without real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfbf_cli.cli.common import (
    TRUST_NOTE,
    DeviceOption,
    JsonOption,
    PrecisionOption,
    QuietOption,
    SeedOption,
    TeacherWeightsOption,
    WeightsOption,
    session,
)
from dfbf_cli.settings import (
    DEFAULT_PRESET,
    PRESETS,
    SMALL_INPUT,
    BatchNormMode,
    Distance,
    FinetuneSettings,
    Optimizer,
    Precision,
    Scope,
    TapWeighting,
)

_BALANCED = PRESETS[DEFAULT_PRESET]
EpochsOption = Annotated[int | None, typer.Option("--epochs", min=1, help=(
    f"Passes over the synthetic images \\[default: the {DEFAULT_PRESET} preset's optimiser steps: {_BALANCED.finetune_steps_small:,} "
    f"for inputs up to {SMALL_INPUT} px, {_BALANCED.finetune_steps_large:,} for larger ones]."), show_default=False)]
BatchOption = Annotated[int, typer.Option("--batch", min=2, help="Images per step.")]
LrOption = Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine schedule).")]
WeightDecayOption = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay; 0 measured best with adam (the reference's SGD used 5e-4).")]
OptimizerOption = Annotated[Optimizer, typer.Option("--optimizer", help="adam (measured best here) or sgd (the reference: momentum 0.9).")]
LossOption = Annotated[Distance, typer.Option("--loss", help="Feature distance: l1 (the reference, measured best); mse and smoothl1 are "
    "[experimental: measured no better, docs/finetune.md].")]
TapWeightsOption = Annotated[TapWeighting, typer.Option("--tap-weights", help="Weights over the feature taps: linear (rising with depth); uniform and "
    "last (final output only) are [experimental: measured no better].")]
BatchNormOption = Annotated[BatchNormMode, typer.Option("--bn", help="Student BatchNorm: train (batch statistics on synthetic images, measured best) "
    "or frozen [experimental: needs a 10x smaller --lr, ends lower].")]
AllowMismatchOption = Annotated[bool, typer.Option("--allow-teacher-mismatch", help="Use a --data dataset synthesised from another model than --teacher.")]
RenewOption = Annotated[int, typer.Option("--renew", min=0, help="[experimental: measured no better, docs/finetune.md] Renew this many of the "
    "synthetic images each epoch: cut-mixed, then "
    "--renew-steps inversion steps towards the teacher's BatchNorm statistics (a fresh stream at a fraction of the cost of new images; 0: the "
    "fixed set).")]
RenewStepsOption = Annotated[int, typer.Option("--renew-steps", min=1, help="Inversion steps per renewed image.")]
AdversarialOption = Annotated[float, typer.Option("--adversarial", min=0.0, help="[experimental] Renewed images also move away from what the student already "
    "reproduces, with this weight on the student-teacher feature distance (ADI-style; 0: off).")]
CutmixOption = Annotated[bool, typer.Option("--cutmix/--no-cutmix", help="Paste a box of another synthetic image into each (measured +1.3 top-1 on CIFAR).")]


def finetune_command(
    pruned: Annotated[str, typer.Argument(help=f"The pruned model (from 'dfbf prune'). {TRUST_NOTE}", show_default=False)],
    teacher: Annotated[str, typer.Option("--teacher", help="The original, unpruned model.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="Synthetic dataset directory (from 'dfbf synthesize' on the teacher).", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="Output model file, in the input's format \\[default: NAME-finetuned.EXT "
        "here].", show_default=False)] = None,
    epochs: EpochsOption = None,
    batch: BatchOption = FinetuneSettings.batch,
    lr: LrOption = FinetuneSettings.lr,
    weight_decay: WeightDecayOption = FinetuneSettings.weight_decay,
    optimizer: OptimizerOption = FinetuneSettings.optimizer,
    loss: LossOption = FinetuneSettings.loss,
    tap_weights: TapWeightsOption = FinetuneSettings.tap_weights,
    bn: BatchNormOption = FinetuneSettings.bn,
    cutmix: CutmixOption = FinetuneSettings.cutmix,
    renew: RenewOption = FinetuneSettings.renew,
    renew_steps: RenewStepsOption = FinetuneSettings.renew_steps,
    adversarial: AdversarialOption = FinetuneSettings.adversarial,
    scope: Annotated[Scope | None, typer.Option("--scope", help="Where the student was pruned (its taps are supervised) \\[default: found from the "
        "two models].", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished epoch.")] = False,
    allow_teacher_mismatch: AllowMismatchOption = False,
    weights: WeightsOption = None,
    teacher_weights: TeacherWeightsOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.AUTO,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Train the pruned part to reproduce the original's features; reattach the original head.

    A checkpoint is written after every epoch (NAME.finetune-state.pt beside --out); after an
    interruption, run the same command with --resume.

    Example:

      dfbf finetune yolo11n-pose-pruned30.pt --teacher yolo11n-pose.pt --data synth/ --out yolo11n-pose-ft.pt
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        from dfbf_cli.api import finetune

        with ctx.progress() as show:
            done = finetune(pruned, teacher, data, out=out, weights=weights, teacher_weights=teacher_weights, scope=scope, resume=resume,
                            allow_teacher_mismatch=allow_teacher_mismatch, device=ctx.device, precision=precision, seed=seed, on_progress=show,
                            epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay, optimizer=optimizer, loss=loss, tap_weights=tap_weights,
                            bn=bn, cutmix=cutmix, renew=renew, renew_steps=renew_steps, adversarial=adversarial)
        ctx.say(f"Fine-tuned model written to {done.path} (final feature loss {done.history[-1].loss:.4f}).")
        ctx.emit({"command": "finetune", "out": str(done.path), "scope": str(done.scope), "settings": done.settings.to_dict(),
                  "history": [vars(r) for r in done.history]})

"""``dfbf compress``: synthesize, prune, fine-tune and evaluate in one resumable run."""

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
    PrecisionOption,
    PresetOption,
    QuietOption,
    RatioOption,
    ScheduleOption,
    ScopeOption,
    SeedOption,
    StrategyOption,
    WeightsOption,
    session,
)
from dfbf_cli.settings import DEFAULT_PRESET, DEFAULT_SCOPE, Allocation, ExportFormat, Precision, Schedule, Strategy


def compress_command(
    model: Annotated[str, typer.Argument(help=f"The trained model to compress. {MODEL_HELP}", show_default=False)],
    ratio: RatioOption = None,
    flops: FlopsOption = None,
    scope: ScopeOption = DEFAULT_SCOPE,
    allocation: AllocationOption = Allocation.UNIFORM,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Prune and distil in this many steps towards the target (the fine-tuning budget is "
        "shared among them).")] = 1,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Refit the pruned layers in closed form (ridge least squares to the "
        "original's outputs on synthetic images, about a minute) before distillation: a far better start, measured no better an end "
        "(docs/reconstruct.md).")] = False,
    data: Annotated[str | None, typer.Option("--data", help="Labelled data to score the models on (with a YOLO model, also the original at the "
        "input size of equal GFLOPs); or a folder of real photos (agreement with the original).")] = None,
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="Reuse this synthetic dataset (from 'dfbf synthesize') instead of making one "
        "in the run directory.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory; re-running the same command there resumes it \\[default: "
        "NAME-compressed/].", show_default=False)] = None,
    preset: PresetOption = DEFAULT_PRESET,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Exit 1 if the task metric drops by more than this (in its own units: mAP "
        "0-1, top-1 percent); needs --data.")] = None,
    criterion: CriterionOption = None,
    schedule: ScheduleOption = Schedule.UNIFORM,
    strategy: StrategyOption = Strategy.ONESHOT,
    num_images: Annotated[int | None, typer.Option("--num-images", min=2, help="Synthetic images to make \\[default: the "
        "preset's].", show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Fine-tuning epochs \\[default: the preset's optimiser steps over the "
        "synthetic set].")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Synthesis and fine-tuning image size, a multiple of the model's stride "
        "\\[default: the model's, capped by the preset].")] = None,
    export: Annotated[ExportFormat | None, typer.Option("--export", help="Last stage: export the compressed model to openvino or onnx "
                                                         "(needs the export extra), scored beside the others.", show_default=False)] = None,
    int8: Annotated[bool, typer.Option("--int8", help="With --export: INT8, calibrated on synthetic images at the export's size "
        "(the run's, or 32 made for it), the recipe chosen as 'dfbf export' chooses it.")] = False,
    allow_teacher_mismatch: Annotated[bool, typer.Option("--allow-teacher-mismatch", help="Use a --synthetic dataset made from another model than "
        "MODEL.")] = False,
    weights: WeightsOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.AUTO,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Make MODEL smaller and faster without its training data: synthesize → prune → fine-tune → evaluate.

    Give --ratio (that fraction of every prunable group's channels goes) or --flops (the GFLOPs to keep).
    Writes a run directory with the compressed model, the pruned-only model, report.json, report.md
    and report.png. Interrupted? Run the same command again: finished stages are kept. Every argument
    and input is checked before the first stage starts.

    Examples:

      dfbf compress yolov8n-pose.pt --ratio 0.3 --data coco8-pose/data.yaml

      dfbf compress yolo11n-pose.pt --flops 0.7 --scope trunk

      dfbf compress cifar-resnet56 --weights r56.th --ratio 0.5 --data test.npz --max-drop 1.5
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        from dfbf_cli.api import compress
        from dfbf_cli.cli.tables import report_table
        from dfbf_cli.errors import QualityGateFailed

        with ctx.progress() as show:
            run = compress(model, ratio=ratio, flops=flops, weights=weights, data=data, out=out, scope=scope, allocation=allocation, rounds=rounds,
                           reconstruct=reconstruct, synthetic=synthetic, preset=preset, max_drop=max_drop, criterion=criterion, schedule=schedule,
                           strategy=strategy, num_images=num_images, epochs=epochs, imgsz=imgsz, export=export, int8=int8,
                           allow_teacher_mismatch=allow_teacher_mismatch, device=ctx.device, precision=precision, seed=seed, on_progress=show)
        result = run.result
        target = f"ratio {ratio}" if ratio is not None else f"GFLOPs kept {flops}"
        ctx.results.print(report_table(result.reports, f"dfbf compress · {model} · {target} · scope {scope}", result.watched))
        if result.verdict is not None:
            ctx.results.print(result.verdict.sentence(), highlight=False, soft_wrap=True, markup=False)
        ctx.say(f"Run directory: {result.run.root} (compressed model: {result.run.compressed})")
        ctx.emit({"command": "compress", "run_dir": str(result.run.root), **result.summary})
        if result.gate_failure:
            raise QualityGateFailed(result.gate_failure)

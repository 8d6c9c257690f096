"""``dfbf eval``: how good, how big and how fast one or more models are, beside the free alternative."""

from __future__ import annotations

from typing import Annotated

import typer

from dfbf_cli.cli.common import (
    MODEL_HELP,
    DeviceOption,
    JsonOption,
    QuietOption,
    TeacherWeightsOption,
    WeightsOption,
    session,
)
from dfbf_cli.settings import EVAL_BATCH


def eval_command(
    models: Annotated[list[str], typer.Argument(help=f"Models to evaluate; with several, the first is the original. {MODEL_HELP}", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Labelled data (Ultralytics dataset YAML, .npz with x/y, class-per-folder tree) or a folder of "
        "unlabelled images (with --teacher).", show_default=False)],
    teacher: Annotated[str | None, typer.Option("--teacher", help="Measure agreement with this model on the unlabelled images in --data.")] = None,
    weights: WeightsOption = None,
    teacher_weights: TeacherWeightsOption = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Evaluation image size \\[default: the model's own].")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per batch.")] = EVAL_BATCH,
    latency_runs: Annotated[int, typer.Option("--latency-runs", min=1, help="Timed forward passes per latency figure (median reported).")] = 10,
    robustness: Annotated[bool, typer.Option("--robustness", help="Also the metric under FGSM (ε 0.01, 0.05; classifiers) and Gaussian noise (σ "
        "0.05).")] = False,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="With labelled data and a model that runs at any input size (YOLO): "
        "also score the first model at the input size where it costs what each later, cheaper one costs (the free alternative).")] = True,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Report task metric, parameters, GFLOPs, latency and file size, one column per model.

    Examples:

      dfbf eval yolo11n-pose.pt compressed.pt --data coco8-pose/data.yaml

      dfbf eval cifar-resnet56 --weights resnet56.th --data cifar10-test.npz

      dfbf eval small.pt --teacher big.pt --data photos/
    """
    with session(device=device, seed=0, quiet=quiet, json_mode=json_output) as ctx:  # nothing random: the noise of --robustness is fixed
        from dfbf_cli.api import evaluate
        from dfbf_cli.cli.tables import report_table

        with ctx.progress() as show:
            done = evaluate(models, data, weights=weights, teacher=teacher, teacher_weights=teacher_weights, imgsz=imgsz, batch=batch,
                            latency_runs=latency_runs, robustness=robustness, baseline=baseline, device=ctx.device, on_progress=show)
        ctx.results.print(report_table(done.reports, f"dfbf eval · {data}", done.metric))
        for label, verdict in done.verdicts:
            ctx.results.print(f"{label}: {verdict.sentence()}", highlight=False, soft_wrap=True, markup=False)
        ctx.emit({"command": "eval", "data": data, "device": str(ctx.device), "models": [r.to_dict() for r in done.reports],
                  "free_alternative": [{"model": label, **v.to_dict()} for label, v in done.verdicts]})

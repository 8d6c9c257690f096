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
from dfbf_cli.errors import DfbfError, refuse_unused
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
        from dfbf_cli.adapters import load_data, load_model
        from dfbf_cli.cli.tables import report_table
        from dfbf_cli.contract import ImageFolder
        from dfbf_cli.engine.efficiency import check_imgsz
        from dfbf_cli.engine.evaluate import Candidate, Verdict, check_evaluation, evaluate_models, free_alternative, watched_metric

        if weights and len(models) > 1:
            raise DfbfError("--weights applies to a single MODEL; evaluate models with different weights one by one.")
        refuse_unused(teacher_weights=(teacher_weights is not None and teacher is None, "applies to a --teacher."))
        eval_data = load_data(data)
        refuse_unused(robustness=(robustness and isinstance(eval_data, ImageFolder), "needs labelled --data (unlabelled photos measure agreement only)."))
        teacher_model = load_model(teacher, teacher_weights, "--teacher-weights") if teacher else None
        adapters = [load_model(spec, weights) for spec in models]
        if len({a.input_spec.imgsz for a in adapters}) > 1 and imgsz is None:
            raise DfbfError("These models have different input sizes; pass --imgsz to compare them at one size.")
        for adapter in adapters:
            check_evaluation(adapter, eval_data, teacher_model)
            check_imgsz(adapter, imgsz or adapter.input_spec.imgsz, batch, ctx.device, training=False)
        candidates = [Candidate(a.name, a, imgsz or a.input_spec.imgsz) for a in adapters]
        comparisons = []  # (later model's index, its free alternative's index)
        if baseline and not isinstance(eval_data, ImageFolder):
            for index, candidate in enumerate(candidates[1:len(adapters)], 1):
                alternative = free_alternative(adapters[0], candidate.adapter, candidates[0].imgsz, adapters[0].name)
                if alternative is not None:
                    candidates.append(alternative)
                    comparisons.append((index, len(candidates) - 1))
        ctx.say(f"Evaluating {', '.join(c.label for c in candidates)} on {data} ({ctx.device}) ...")
        with ctx.progress() as show:
            reports = evaluate_models(candidates, eval_data, teacher=teacher_model, batch=batch, device=ctx.device,
                                      latency_runs=latency_runs, robustness=robustness, on_progress=show)
        metric = watched_metric(adapters[0], eval_data)
        verdicts = [Verdict.of(metric, reports[i], reports[b]) for i, b in comparisons]
        ctx.results.print(report_table(reports, f"dfbf eval · {data}", metric))
        for (index, _), verdict in zip(comparisons, verdicts):
            ctx.results.print(f"{candidates[index].label}: {verdict.sentence()}", highlight=False, soft_wrap=True, markup=False)
        ctx.emit({"command": "eval", "data": data, "device": str(ctx.device), "models": [r.to_dict() for r in reports],
                  "free_alternative": [{"model": candidates[i].label, **v.to_dict()} for (i, _), v in zip(comparisons, verdicts)]})

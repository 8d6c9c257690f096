"""``dfbf eval``: how good, how big and how fast one or more models are."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dfbf_cli.adapters import load_model
from dfbf_cli.cli.common import DeviceOption, JsonOption, QuietOption, SeedOption, TeacherWeightsOption, WeightsOption, session
from dfbf_cli.engine.data import load_eval_data
from dfbf_cli.engine.evaluate import ModelReport, evaluate_models
from dfbf_cli.errors import DfbfError

EFFICIENCY_ROWS = [
    ("params (M)", lambda e: f"{e.params / 1e6:.3f}"),
    ("backbone params (M)", lambda e: f"{e.backbone_params / 1e6:.3f}"),
    ("GFLOPs", lambda e: f"{e.gflops:.2f}"),
    ("CPU latency (ms)", lambda e: f"{e.latency_cpu_ms:.1f}"),
    ("device latency (ms)", lambda e: "-" if e.latency_device_ms is None else f"{e.latency_device_ms:.2f}"),
    ("file (MB)", lambda e: f"{e.file_mb:.2f}"),
]


def report_table(reports: list[ModelReport], title: str) -> Table:
    """One column per model, one row per quantity: every metric any model has, then efficiency."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for report in reports:
        table.add_column(f"{report.name}\n({report.task})", justify="right")
    for name in dict.fromkeys(name for report in reports for name in report.metrics):
        table.add_row(name, *[_format_metric(name, report.metrics.get(name)) for report in reports])
    table.add_section()
    for label, fmt in EFFICIENCY_ROWS:
        table.add_row(label, *[fmt(report.efficiency) for report in reports])
    return table


def _format_metric(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if name.startswith(("top", "agreement_top")) else f"{value:.4f}"


def eval_command(
    models: Annotated[list[str], typer.Argument(help="Models to evaluate: a YOLO .pt/.yaml, torchvision:NAME, cifar-resnetN, or a dfbf .safetensors.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Labelled data (Ultralytics dataset YAML, .npz with x/y, class-per-folder tree) or a folder of unlabelled images (with --teacher).", show_default=False)],
    teacher: Annotated[str | None, typer.Option("--teacher", help="Measure agreement with this model on the unlabelled images in --data.")] = None,
    weights: WeightsOption = None,
    teacher_weights: TeacherWeightsOption = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Evaluation image size \\[default: the model's own].")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per batch.")] = 16,
    latency_runs: Annotated[int, typer.Option("--latency-runs", min=1, help="Timed forward passes per latency figure (median reported).")] = 10,
    robustness: Annotated[bool, typer.Option("--robustness", help="Also the metric under FGSM (ε 0.01, 0.05; classifiers) and Gaussian noise (σ 0.05).")] = False,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Report task metric, parameters, GFLOPs, latency and file size, one table row per model.

    Examples:

      dfbf eval yolo11n-pose.pt --data coco8-pose/data.yaml

      dfbf eval cifar-resnet56 --weights resnet56.th --data cifar10-test.npz

      dfbf eval small.pt --teacher big.pt --data photos/
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        if weights and len(models) > 1:
            raise DfbfError("--weights applies to a single MODEL; evaluate models with different weights one by one.")
        eval_data = load_eval_data(data)
        teacher_model = load_model(teacher, teacher_weights) if teacher else None
        adapters = [load_model(spec, weights) for spec in models]
        if len({a.input_spec.imgsz for a in adapters}) > 1 and imgsz is None:
            raise DfbfError("These models have different input sizes; pass --imgsz to compare them at one size.")
        if not quiet:
            ctx.console.print(f"Evaluating {', '.join(a.describe() for a in adapters)} on {data} ({ctx.device}) ...", highlight=False)
        reports = evaluate_models(adapters, eval_data, teacher=teacher_model, imgsz=imgsz, batch=batch,
                                  device=ctx.device, latency_runs=latency_runs, robustness=robustness)
        ctx.console.print(report_table(reports, f"dfbf eval · {data}"))
        ctx.emit({"command": "eval", "data": data, "device": str(ctx.device), "models": [r.to_dict() for r in reports]})

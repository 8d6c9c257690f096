"""The tables commands print (rich), built from the engine's results."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from dfbf_cli.contract import Metric
    from dfbf_cli.engine.efficiency import Efficiency
    from dfbf_cli.engine.evaluate import ModelReport
    from dfbf_cli.engine.pruning import GroupOutcome
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset


def report_table(reports: list[ModelReport], title: str, metric: Metric | None) -> Table:
    """One column per model, one row per quantity: every metric any model has, then efficiency."""
    from dfbf_cli.engine.report import EFFICIENCY_ROWS, efficiency_cells

    table = Table(title=title, title_justify="left")
    table.add_column("")
    for report in reports:
        table.add_column(f"{report.name}\n({report.task})", justify="right")
    for name in dict.fromkeys(name for report in reports for name in report.metrics):
        shown = f"[bold]{name}[/]" if metric is not None and name == metric.name else name
        table.add_row(shown, *[metric.format(r.metrics.get(name)) if metric else f"{r.metrics[name]:.4g}" for r in reports])  # a task's metrics share a unit
    table.add_section()
    cells = [efficiency_cells(r) for r in reports]
    for row, (label, *_rest) in enumerate(EFFICIENCY_ROWS):
        table.add_row(label, *[c[row] for c in cells])
    return table


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


def manifest_table(dataset: SyntheticDataset) -> Table:
    m = dataset.manifest
    table = Table(title=f"synthetic dataset {dataset.root}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("images", f"{dataset.num_images} in {len(m['shards'])} shard(s), {m['imgsz']}×{m['imgsz']} px (verified)"),
        ("teacher", f"{m['teacher'].get('name')} ({m['teacher'].get('family')} {m['teacher'].get('task')})"),
        ("fingerprint", m["teacher"]["fingerprint"]),
        ("generation", ", ".join(f"{k}={v}" for k, v in m["generation"].items())),
        ("made by", f"dfbf {m.get('dfbf_version')} (format v{m['format_version']})"),
    ]
    if m["shards"]:
        last = m["shards"][-1]
        if {"bn_loss_start", "bn_loss_end", "seconds"} <= last.keys():
            rows.append(("last shard", f"BN loss {last['bn_loss_start']:.1f} → {last['bn_loss_end']:.1f} in {last['seconds']:.0f} s"))
    for row in rows:
        table.add_row(*row)
    return table

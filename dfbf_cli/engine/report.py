"""``dfbf compress``'s reports: report.json (everything), report.md (a person's summary), report.png."""

from __future__ import annotations

from pathlib import Path

from dfbf_cli import __version__
from dfbf_cli.engine.evaluate import ModelReport, Verdict
from dfbf_cli.engine.finetune import EpochRecord
from dfbf_cli.files import atomic_path, write_json

EFFICIENCY_ROWS = (  # label, Efficiency field, scale, format
    ("input size (px)", "imgsz", 1, "{:.0f}"),
    ("params (M)", "params", 1e-6, "{:.3f}"),
    ("backbone params (M)", "backbone_params", 1e-6, "{:.3f}"),
    ("GFLOPs", "gflops", 1, "{:.2f}"),
    ("CPU latency (ms)", "latency_cpu_ms", 1, "{:.1f}"),
    ("device latency (ms)", "latency_device_ms", 1, "{:.2f}"),
    ("file (MB)", "file_mb", 1, "{:.2f}"),
)


def efficiency_cells(report: ModelReport) -> list[str]:
    values = report.efficiency.to_dict()
    return ["-" if values[key] is None else fmt.format(values[key] * scale) for _, key, scale, fmt in EFFICIENCY_ROWS]


def write_report(root: Path, request: dict, reports: list[ModelReport], history: list[EpochRecord], *, metric: str | None,
                 drop: float | None, fidelity: dict[str, float], baseline: ModelReport | None, verdict: Verdict | None, precision: str,
                 files: dict[str, Path]) -> dict:
    """Write the three reports; return what report.json holds. ``reports``: original, pruned, compressed (and its export);
    ``metric``: the one watched (None without data) and ``drop`` its fall from original to compressed;
    ``fidelity``: feature distance to the original on fresh synthetic images, per stage; ``baseline``
    and ``verdict``: the original at the input size of equal GFLOPs and how the compressed model compares;
    ``precision``: the arithmetic fine-tuning used."""
    shown = reports + ([baseline] if baseline else [])
    summary = {
        "dfbf_version": __version__, "request": request, "precision": str(precision),
        "models": {r.name: r.to_dict() for r in reports},
        "metric_drop": None if metric is None else {"metric": metric, "drop": drop},
        "fidelity": {"feature_distance_on_fresh_synthetic_images": fidelity},
        "free_alternative": None if verdict is None else {**verdict.to_dict(), "model": baseline.to_dict()},
        "files": {stage: str(path) for stage, path in files.items()},
        "finetune_history": [vars(r) for r in history],
    }
    write_json(root / "report.json", summary)
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(_markdown(request, shown, history, fidelity, verdict, str(precision)))
    _plot(root / "report.png", shown, history, metric, fidelity)
    return summary


def _markdown(request: dict, reports: list[ModelReport], history: list[EpochRecord], fidelity: dict[str, float],
              verdict: Verdict | None, precision: str) -> str:
    target = f"ratio {request['ratio']}" if request.get("ratio") is not None else f"GFLOPs kept {request['flops']}"
    lines = [f"# dfbf compress: {request['model']}", "", f"{target}, scope {request['scope']}, preset {request['preset']}", ""]
    lines += ["| | " + " | ".join(r.name for r in reports) + " |", "|---" * (len(reports) + 1) + "|"]
    for metric in dict.fromkeys(m for r in reports for m in r.metrics):
        lines.append(f"| {metric} | " + " | ".join("-" if metric not in r.metrics else f"{r.metrics[metric]:.4g}" for r in reports) + " |")
    for row, (label, *_rest) in enumerate(EFFICIENCY_ROWS):
        lines.append(f"| {label} | " + " | ".join(efficiency_cells(r)[row] for r in reports) + " |")
    lines += ["", "Feature distance to the original on fresh synthetic images (lower is closer): "
              + ", ".join(f"{stage} {value:.4f}" for stage, value in fidelity.items()) + "."]
    if verdict is not None:
        lines += ["", verdict.sentence()]
    if history:
        lines += ["", f"Fine-tuning: {len(history)} epoch{'s' * (len(history) != 1)} in {precision}, "
                  f"feature loss {history[0].loss:.4f} → {history[-1].loss:.4f}."]
    lines += ["", "![metric and loss](report.png)", ""]
    return "\n".join(lines)


def _plot(path: Path, reports: list[ModelReport], history: list[EpochRecord], metric: str | None, fidelity: dict[str, float]) -> None:
    """Left: the watched metric per model (or, without data, the feature distance per stage); right: the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colours = ["#888", "#c55", "#5a5", "#a6c", "#58c"]
    if metric is not None:
        left.bar([r.name for r in reports], [r.metrics.get(metric, 0.0) for r in reports], color=colours[: len(reports)])
        left.set_title(metric)
        left.tick_params(axis="x", labelrotation=20)
    else:
        left.bar(list(fidelity), list(fidelity.values()), color=colours[1 : 1 + len(fidelity)])
        left.set_title("feature distance to the original (fresh synthetic images)")
    right.plot([r.epoch for r in history], [r.loss for r in history], marker="o" if len(history) < 50 else None)
    right.set_xlabel("epoch")
    right.set_ylabel("feature loss")
    right.set_title("fine-tuning")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)

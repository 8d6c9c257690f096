"""``dfbf compress``'s run directory: one folder per run, each stage's result kept so a re-run resumes.

    RUN_DIR/run.json               what was asked (a re-run must ask the same)
    RUN_DIR/synthetic/             the synthetic dataset (unless --synthetic points elsewhere)
    RUN_DIR/pruned<ext>            the pruned model, before fine-tuning
    RUN_DIR/finetune-state.pt      fine-tuning checkpoint (only while unfinished)
    RUN_DIR/compressed<ext>        the final model
    RUN_DIR/report.json|md|png     the comparison original / pruned / compressed, and the loss curve
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dfbf_cli import __version__
from dfbf_cli.engine.evaluate import ModelReport
from dfbf_cli.engine.files import atomic_path
from dfbf_cli.engine.finetune import EpochRecord
from dfbf_cli.errors import DfbfError

STAGES = ("original", "pruned", "compressed")


@dataclass(frozen=True)
class RunDirectory:
    root: Path
    suffix: str

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def pruned(self) -> Path:
        return self.root / f"pruned{self.suffix}"

    @property
    def compressed(self) -> Path:
        return self.root / f"compressed{self.suffix}"

    @property
    def finetune_state(self) -> Path:
        return self.root / "finetune-state.pt"

    @classmethod
    def prepare(cls, root: Path, suffix: str, request: dict) -> RunDirectory:
        """Create the run directory, or accept it for resuming when it was made for the same request."""
        run_file = root / "run.json"
        if run_file.exists():
            previous = json.loads(run_file.read_text())["request"]
            if previous != request:
                changed = sorted(k for k in {*previous, *request} if previous.get(k) != request.get(k))
                raise DfbfError(f"{root} holds a run with other settings ({', '.join(changed)} differ); use another --out.")
        elif root.exists() and any(root.iterdir()):
            raise DfbfError(f"{root} exists and is not a dfbf compress run; choose an empty or new --out.")
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_file) as tmp:
            tmp.write_text(json.dumps({"dfbf_version": __version__, "request": request}, indent=2) + "\n")
        return cls(root, suffix)


def primary_metric(report: ModelReport) -> str:
    """The metric a quality gate watches: the first the adapter reports (pose mAP, box mAP, top-1...)."""
    return next(iter(report.metrics))


def metric_drop(reports: dict[str, ModelReport]) -> tuple[str, float] | None:
    """(metric, original minus compressed) when a metric was measured."""
    if not reports["original"].metrics:
        return None
    name = primary_metric(reports["original"])
    return name, reports["original"].metrics[name] - reports["compressed"].metrics[name]


def write_report(
    run: RunDirectory, request: dict, reports: dict[str, ModelReport] | None, history: list[EpochRecord], *, precision: str
) -> dict:
    """report.json (everything), report.md (a person's summary) and report.png (metric and loss plots).

    ``precision`` is the arithmetic fine-tuning used (bf16 or fp32), where the request may say auto."""
    report = {
        "dfbf_version": __version__, "request": request, "precision": precision,
        "models": {stage: r.to_dict() for stage, r in (reports or {}).items()},
        "files": {stage: str(path) for stage, path in (("pruned", run.pruned), ("compressed", run.compressed))},
        "finetune_history": [vars(r) for r in history],
    }
    if reports:
        drop = metric_drop(reports)
        report["metric_drop"] = None if drop is None else {"metric": drop[0], "drop": drop[1]}
    with atomic_path(run.root / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(run.root / "report.md") as tmp:
        tmp.write_text(_markdown(request, reports, history, precision))
    _plot(run.root / "report.png", reports, history)
    return report


def _markdown(request: dict, reports: dict[str, ModelReport] | None, history: list[EpochRecord], precision: str) -> str:
    lines = [f"# dfbf compress: {request['model']}", "", f"ratio {request['ratio']}, preset {request['preset']}, "
             f"data {request.get('data') or '(none)'}", ""]
    if reports:
        metrics = list(dict.fromkeys(m for r in reports.values() for m in r.metrics))
        lines += ["| | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
        for m in metrics:
            lines.append(f"| {m} | " + " | ".join(f"{reports[s].metrics.get(m, float('nan')):.4g}" for s in STAGES) + " |")
        for label, key, scale in (("params (M)", "params", 1e-6), ("backbone params (M)", "backbone_params", 1e-6),
                                  ("GFLOPs", "gflops", 1), ("CPU latency (ms)", "latency_cpu_ms", 1), ("file (MB)", "file_mb", 1)):
            lines.append(f"| {label} | " + " | ".join(f"{getattr(reports[s].efficiency, key) * scale:.4g}" for s in STAGES) + " |")
    if history:
        lines += ["", f"Fine-tuning: {len(history)} epoch{'s' * (len(history) != 1)} in {precision}, feature loss {history[0].loss:.4f} → {history[-1].loss:.4f}."]
    lines += ["", "![metric and loss](report.png)", ""]
    return "\n".join(lines)


def _plot(path: Path, reports: dict[str, ModelReport] | None, history: list[EpochRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if reports and reports["original"].metrics:
        name = primary_metric(reports["original"])
        left.bar(STAGES, [reports[s].metrics[name] for s in STAGES], color=["#888", "#c55", "#5a5"])
        left.set_title(name)
    else:
        left.set_axis_off()
    if history:
        right.plot([r.epoch for r in history], [r.loss for r in history], marker="o")
        right.set_xlabel("epoch")
        right.set_ylabel("feature loss")
        right.set_title("fine-tuning")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)

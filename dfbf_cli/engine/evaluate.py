"""The task metric, agreement with a teacher, and efficiency, for one or more models, beside the free
alternative: the original run at the input size of equal GFLOPs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from dfbf_cli.contract import EvalData, ImageFolder, Metric, ModelAdapter
from dfbf_cli.engine.efficiency import Efficiency, measure_efficiency, model_gflops
from dfbf_cli.engine.progress import ProgressCallback, ProgressEvent, ignore
from dfbf_cli.errors import DfbfError


@dataclass(frozen=True)
class Candidate:
    """A model to report, at the input size it is to be scored and timed at."""

    label: str
    adapter: ModelAdapter
    imgsz: int


@dataclass(frozen=True)
class ModelReport:
    name: str
    family: str
    task: str
    metrics: dict[str, float]
    efficiency: Efficiency

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "task": self.task, "metrics": self.metrics, "efficiency": self.efficiency.to_dict()}


def watched_metric(adapter: ModelAdapter, data: EvalData) -> Metric:
    """The metric a quality gate watches on ``data``: the task metric, or its agreement form on photos."""
    metric = adapter.primary_metric()
    return metric.agreement() if isinstance(data, ImageFolder) else metric


def check_evaluation(adapter: ModelAdapter, data: EvalData, teacher: ModelAdapter | None) -> None:
    """Refuse an evaluation that cannot run, before any work starts."""
    if isinstance(data, ImageFolder):
        if teacher is None:
            raise DfbfError(f"{data.source} holds unlabelled images: pass --teacher MODEL to measure agreement with it.")
        adapter.check_same_kind(teacher)
    else:
        if teacher is not None:
            raise DfbfError("--teacher needs --data to be a folder of unlabelled images (agreement is measured there).")
        adapter.check_data(data)


def task_metrics(adapter: ModelAdapter, data: EvalData, *, teacher: ModelAdapter | None, imgsz: int, batch: int,
                 device: torch.device, robustness: bool = False) -> dict[str, float]:
    """The task metrics on labelled data (and under perturbations, with ``robustness``), or agreement
    with ``teacher`` on unlabelled images."""
    check_evaluation(adapter, data, teacher)
    if isinstance(data, ImageFolder):
        return adapter.agreement(teacher, data, imgsz=imgsz, batch=batch, device=device)
    metrics = adapter.evaluate(data, imgsz=imgsz, batch=batch, device=device)
    if robustness:
        metrics |= adapter.robustness(data, imgsz=imgsz, batch=batch, device=device)
    return metrics


def equal_cost_imgsz(original: ModelAdapter, original_gflops: float, target_gflops: float | None, imgsz: int) -> int | None:
    """The input size (a multiple of the stride, below ``imgsz``) at which the original costs about
    ``target_gflops`` (convolutions scale with the pixel count); None without a free input size."""
    if not original.free_input_size or not target_gflops or target_gflops >= original_gflops:
        return None
    stride = original.input_spec.stride
    sizes = range(stride, imgsz, stride)
    if not sizes:
        return None
    return min(sizes, key=lambda s: abs(math.log(original_gflops * (s / imgsz) ** 2 / target_gflops)))


def free_alternative(original: ModelAdapter, cheaper: ModelAdapter, imgsz: int, label: str) -> Candidate | None:
    """``original`` at the input size where it costs what ``cheaper`` costs at ``imgsz`` (None where there is
    no such size: no free input size, another family, not cheaper)."""
    if (cheaper.family, cheaper.task) != (original.family, original.task):
        return None
    size = equal_cost_imgsz(original, model_gflops(original, imgsz), model_gflops(cheaper, imgsz), imgsz)
    return None if size is None else Candidate(f"{label} @ {size} px", original, size)


def evaluate_models(
    candidates: list[Candidate], data: EvalData | None, *, teacher: ModelAdapter | None, batch: int, device: torch.device,
    latency_runs: int = 10, robustness: bool = False, on_progress: ProgressCallback = ignore,
) -> list[ModelReport]:
    """Task metrics for each candidate (none without data), then efficiency for all of them together
    (comparable latencies)."""
    metrics = []
    for index, candidate in enumerate(candidates):
        on_progress(ProgressEvent("evaluate", index, len(candidates), {"model": candidate.label}))
        metrics.append({} if data is None else task_metrics(candidate.adapter, data, teacher=teacher, imgsz=candidate.imgsz, batch=batch,
                                                              device=device, robustness=robustness))
    on_progress(ProgressEvent("evaluate", len(candidates), len(candidates), {"model": "latency"}))
    efficiency = measure_efficiency([(c.adapter, c.imgsz) for c in candidates], device=device, runs=latency_runs)
    return [ModelReport(c.label, c.adapter.family, c.adapter.task, m, e) for c, m, e in zip(candidates, metrics, efficiency)]


@dataclass(frozen=True)
class Verdict:
    """Did compression pay? The compressed model against the original at the input size of equal GFLOPs."""

    metric: str
    compressed: float
    baseline: float
    baseline_imgsz: int
    higher_is_better: bool
    compressed_gflops: float
    baseline_gflops: float

    @property
    def pays(self) -> bool:
        return self.compressed > self.baseline if self.higher_is_better else self.compressed < self.baseline

    def sentence(self) -> str:
        word = "beats" if self.pays else "does not beat"
        return (f"The compressed model {word} the free alternative, the original at {self.baseline_imgsz} px: {self.metric} "
                f"{self.compressed:.4g} vs {self.baseline:.4g}, at {self.compressed_gflops:.3g} vs {self.baseline_gflops:.3g} GFLOPs.")

    @classmethod
    def of(cls, metric: Metric, compressed: ModelReport, baseline: ModelReport) -> Verdict:
        return cls(metric.name, compressed.metrics[metric.name], baseline.metrics[metric.name], baseline.efficiency.imgsz,
                   metric.higher_is_better, compressed.efficiency.gflops, baseline.efficiency.gflops)

    def to_dict(self) -> dict:
        return {**asdict(self), "pays": self.pays}

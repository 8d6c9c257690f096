"""``dfbf eval``: the task metric, agreement with a teacher, and efficiency, for one or more models."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfbf_cli.adapters.base import ModelAdapter
from dfbf_cli.engine.data import EvalData, ImageFolder
from dfbf_cli.engine.efficiency import Efficiency, measure_efficiency
from dfbf_cli.errors import DfbfError


@dataclass(frozen=True)
class ModelReport:
    name: str
    family: str
    task: str
    metrics: dict[str, float]
    efficiency: Efficiency

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "task": self.task, "metrics": self.metrics,
                "efficiency": self.efficiency.to_dict()}


def check_same_kind(student: ModelAdapter, teacher: ModelAdapter) -> None:
    """A teacher must be of the same family and task as the model it teaches or judges."""
    if (student.family, student.task) != (teacher.family, teacher.task):
        raise DfbfError(
            f"Teacher {teacher.describe()} does not match {student.describe()}: "
            "they must be the same family and task."
        )


def task_metrics(
    adapter: ModelAdapter, data: EvalData, *, teacher: ModelAdapter | None, imgsz: int, batch: int, device: torch.device,
    robustness: bool = False,
) -> dict[str, float]:
    """The task metric on labelled data (and under perturbations, with ``robustness``), or agreement
    with ``teacher`` on unlabelled images."""
    if isinstance(data, ImageFolder):
        if teacher is None:
            raise DfbfError(f"{data.root} holds unlabelled images: pass --teacher MODEL to measure agreement with it.")
        check_same_kind(adapter, teacher)
        return adapter.agreement(teacher, data, imgsz=imgsz, batch=batch, device=device)
    if teacher is not None:
        raise DfbfError("--teacher needs --data to be a folder of unlabelled images (agreement is measured there).")
    metrics = adapter.evaluate(data, imgsz=imgsz, batch=batch, device=device)
    if robustness:
        metrics |= adapter.robustness(data, imgsz=imgsz, batch=batch, device=device)
    return metrics


def evaluate_models(
    adapters: list[ModelAdapter], data: EvalData, *, teacher: ModelAdapter | None, imgsz: int | None, batch: int,
    device: torch.device, latency_runs: int = 10, robustness: bool = False,
) -> list[ModelReport]:
    """Task metric for each model, then efficiency for all of them together (comparable latencies)."""
    size = imgsz or adapters[0].input_spec.imgsz
    metrics = [task_metrics(a, data, teacher=teacher, imgsz=imgsz or a.input_spec.imgsz, batch=batch, device=device,
                            robustness=robustness) for a in adapters]
    efficiency = measure_efficiency(adapters, imgsz=size, device=device, runs=latency_runs)
    return [ModelReport(a.name, a.family, a.task, m, e) for a, m, e in zip(adapters, metrics, efficiency)]

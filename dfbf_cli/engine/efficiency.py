"""How big and how fast a model is: parameters, FLOPs, latency, file size."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dfbf_cli.adapters.base import ModelAdapter
from dfbf_cli.engine.data import temporary_folder

WARMUP_RUNS = 3


@dataclass(frozen=True)
class Efficiency:
    params: int
    backbone_params: int
    gflops: float
    latency_cpu_ms: float
    latency_device_ms: float | None
    file_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gflops(model: nn.Module, example: torch.Tensor) -> float:
    """Forward-pass GFLOPs (2 per multiply-accumulate), counted by torch's own FLOP counter."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(example)
    return counter.get_total_flops() / 1e9


def median_latencies_ms(models: list[nn.Module], example: torch.Tensor, runs: int) -> list[float]:
    """Median wall time of one forward pass per model, after warm-up.

    Models are timed round-robin, one pass each in turn, so that warm-up effects and background load
    fall on all of them alike: comparing a pruned model with its original is then fair.
    """
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(WARMUP_RUNS + runs):
            for model, record in zip(models, times):
                sync()
                start = time.perf_counter()
                model(example)
                sync()
                if i >= WARMUP_RUNS:
                    record.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(record) for record in times]


def file_size_mb(adapter: ModelAdapter) -> float:
    """Size of the model file as the user has it (or as dfbf would save it, for built-in weights)."""
    if adapter.source is not None and adapter.source.is_file():
        return adapter.source.stat().st_size / 2**20
    with temporary_folder() as tmp:
        return adapter.save(Path(tmp) / f"model{adapter.default_suffix}").stat().st_size / 2**20


def measure_efficiency(adapters: list[ModelAdapter], *, imgsz: int, device: torch.device, runs: int = 10) -> list[Efficiency]:
    """Efficiency of several models measured together (latencies interleaved, see above)."""
    models = [adapter.model.eval().cpu() for adapter in adapters]
    example = torch.rand(1, adapters[0].input_spec.channels, imgsz, imgsz)
    device_ms: list[float | None] = [None] * len(models)
    if device.type != "cpu":
        device_ms = median_latencies_ms([m.to(device) for m in models], example.to(device), runs)
        models = [m.cpu() for m in models]
    cpu_ms = median_latencies_ms(models, example, runs)
    return [
        Efficiency(
            params=count_params(model),
            backbone_params=count_params(adapter.split().backbone),
            gflops=gflops(model, example),
            latency_cpu_ms=cpu,
            latency_device_ms=dev,
            file_mb=file_size_mb(adapter),
        )
        for adapter, model, cpu, dev in zip(adapters, models, cpu_ms, device_ms)
    ]

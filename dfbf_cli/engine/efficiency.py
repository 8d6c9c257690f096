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


def median_latency_ms(model: nn.Module, example: torch.Tensor, runs: int) -> float:
    """Median wall time of one forward pass, after warm-up; CUDA work is synchronised."""
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(WARMUP_RUNS + runs):
            sync()
            start = time.perf_counter()
            model(example)
            sync()
            if i >= WARMUP_RUNS:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def file_size_mb(adapter: ModelAdapter) -> float:
    """Size of the model file as the user has it (or as dfbf would save it, for built-in weights)."""
    if adapter.source is not None and adapter.source.is_file():
        return adapter.source.stat().st_size / 2**20
    with temporary_folder() as tmp:
        return adapter.save(Path(tmp) / f"model{adapter.default_suffix}").stat().st_size / 2**20


def measure_efficiency(adapter: ModelAdapter, *, imgsz: int, device: torch.device, runs: int = 10) -> Efficiency:
    model = adapter.model.eval().cpu()
    example = torch.rand(1, adapter.input_spec.channels, imgsz, imgsz)
    device_ms = None
    if device.type != "cpu":
        device_ms = median_latency_ms(model.to(device), example.to(device), runs)
        model.cpu()
    return Efficiency(
        params=count_params(model),
        backbone_params=count_params(adapter.split().backbone),
        gflops=gflops(model, example),
        latency_cpu_ms=median_latency_ms(model, example, runs),
        latency_device_ms=device_ms,
        file_mb=file_size_mb(adapter),
    )

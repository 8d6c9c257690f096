"""How big and how fast a model is: parameters, FLOPs, latency, file size."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dfbf_cli.contract import Exported, ModelAdapter
from dfbf_cli.engine.runtime import free_memory_bytes
from dfbf_cli.errors import DfbfError
from dfbf_cli.files import temporary_folder
from dfbf_cli.settings import Scope

WARMUP_RUNS = 3
RUNTIME_PAUSE_S = 0.5  # between runtimes: long enough for a finished runtime's spinning threads to go idle


@dataclass(frozen=True)
class Efficiency:
    imgsz: int
    params: int | None  # None: unknown (an export that does not record its source)
    backbone_params: int | None
    gflops: float | None
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


def example_input(imgsz: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One seeded RGB image of ``imgsz`` (FLOP counts, latency, shape probes)."""
    return torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0)).to(device)


def model_gflops(adapter: ModelAdapter, imgsz: int) -> float | None:
    """GFLOPs at ``imgsz``: counted, or as an export records them."""
    cost = adapter.static_cost()
    return cost[2] if cost is not None else gflops(adapter.model.eval().cpu(), example_input(imgsz))


def median_latencies_ms(models: list[nn.Module], examples: list[torch.Tensor], runs: int) -> list[float]:
    """Median wall time of one forward pass per model, after warm-up.

    Models are timed round-robin, one pass each in turn, so that warm-up effects and background load
    fall on all of them alike: comparing a pruned model with its original is then fair.
    """
    sync = torch.cuda.synchronize if examples[0].is_cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(WARMUP_RUNS + runs):
            for model, example, record in zip(models, examples, times):
                sync()
                start = time.perf_counter()
                model(example)
                sync()
                if i >= WARMUP_RUNS:
                    record.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(record) for record in times]


def file_size_mb(adapter: ModelAdapter) -> float:
    """Size of the model file (or exported folder) as the user has it (or as dfbf would save it, for built-in weights)."""
    if adapter.source is not None and adapter.source.is_dir():
        return sum(p.stat().st_size for p in adapter.source.rglob("*") if p.is_file()) / 2**20
    if adapter.source is not None and adapter.source.is_file():
        return adapter.source.stat().st_size / 2**20
    with temporary_folder() as tmp:
        return adapter.save(Path(tmp) / f"model{adapter.default_suffix}").stat().st_size / 2**20


def _by_runtime(models: list[nn.Module], examples: list[torch.Tensor], runtimes: list[str], runs: int) -> list[float]:
    """:func:`median_latencies_ms` within each runtime, one runtime's block after another: a runtime's idle
    threads (PyTorch's OpenMP pool spins after each pass) would otherwise slow the next runtime's pass."""
    latencies = [0.0] * len(models)
    for block, runtime in enumerate(dict.fromkeys(runtimes)):
        chosen = [i for i, r in enumerate(runtimes) if r == runtime]
        if block:
            time.sleep(RUNTIME_PAUSE_S)
        for i, ms in zip(chosen, median_latencies_ms([models[i] for i in chosen], [examples[i] for i in chosen], runs)):
            latencies[i] = ms
    return latencies


def measure_efficiency(entries: list[tuple[ModelAdapter, int]], *, device: torch.device, runs: int = 10) -> list[Efficiency]:
    """Efficiency of several (model, input size) pairs measured together (latencies interleaved within each runtime, see above)."""
    models = [adapter.model.eval().cpu() for adapter, _ in entries]
    examples = [example_input(imgsz) for _, imgsz in entries]
    runtimes = ["exported" if isinstance(adapter, Exported) else "torch" for adapter, _ in entries]
    device_ms: list[float | None] = [None] * len(models)
    if device.type != "cpu":
        device_ms = _by_runtime([m.to(device) for m in models], [e.to(device) for e in examples], runtimes, runs)
        models = [m.cpu() for m in models]
    cpu_ms = _by_runtime(models, examples, runtimes, runs)
    reports = []
    for (adapter, imgsz), model, example, cpu, dev in zip(entries, models, examples, cpu_ms, device_ms):
        params, backbone, cost = adapter.static_cost() or (count_params(model), count_params(adapter.split(Scope.BACKBONE).backbone), gflops(model, example))
        reports.append(Efficiency(imgsz, params, backbone, cost, cpu, dev, file_size_mb(adapter)))
    return reports


def activation_bytes(adapter: ModelAdapter, imgsz: int, batch: int) -> int:
    """A forward pass's activation memory for ``batch`` images of ``imgsz`` (fp32), from one small pass:
    what a size must be checked against before a long job starts."""
    probe = max(adapter.input_spec.stride * 2, 32)
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel()

    hooks = [m.register_forward_hook(count) for m in adapter.model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            adapter.model.eval().cpu()(example_input(probe))
    finally:
        for hook in hooks:
            hook.remove()
    return int(total * 4 * batch * (imgsz / probe) ** 2)


def check_imgsz(adapter: ModelAdapter, imgsz: int, batch: int, device: torch.device, *, training: bool) -> None:
    """An input size the model accepts (a multiple of its stride) and that fits in memory."""
    stride = adapter.input_spec.stride
    if imgsz < stride or imgsz % stride:
        near = max(stride, round(imgsz / stride) * stride)
        raise DfbfError(f"--imgsz {imgsz} is not a multiple of {adapter.name}'s stride {stride}; use {near}.")
    if adapter.static_cost() is not None:
        return  # an export runs at its own size only, and holds no activations to count here
    needed = activation_bytes(adapter, imgsz, batch) * (3 if training else 1)  # saved activations, their gradients, the teacher
    available = free_memory_bytes(device)
    if needed > available:
        raise DfbfError(f"{batch} image(s) of {imgsz} px need about {needed / 2**30:.1f} GiB on {device}, more than the "
                        f"{available / 2**30:.1f} GiB free; use a smaller --imgsz or --batch.")

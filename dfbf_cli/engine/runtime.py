"""Conventions every command shares: which device, which number format, which seed, how much memory."""

from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import Precision


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a device that is absent is a user error."""
    spec = spec.strip().lower()
    local = int(os.environ.get("LOCAL_RANK", 0))  # torchrun: one GPU per process on each machine
    if spec == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise DfbfError(f"Unknown device '{spec}'; use auto, cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        raise DfbfError(f"Device '{spec}' was asked for but no CUDA GPU is available here; use --device cpu.")
    index = int(match.group(1) or local)
    if index >= torch.cuda.device_count():
        raise DfbfError(f"Device '{spec}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    return torch.device("cuda", index)


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``bf16`` or ``fp32``. ``auto`` takes bfloat16 where the hardware computes it natively (CUDA with
    bf16, CPUs with AVX512-BF16 or AMX): two thirds of the time or less on this project's CPU, same
    recovery (docs/finetune.md, "Precision")."""
    precision = Precision(precision)
    if precision != Precision.AUTO:
        return precision
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:  # private probes (torch >= 2.2); absent ones count as "no"
        native = any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return Precision.BF16 if native else Precision.FP32


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes' context: bfloat16 autocast, or nothing (fp32). Reusable; weights stay fp32."""
    if resolve_precision(precision, device) == Precision.BF16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def free_memory_bytes(device: torch.device) -> int:
    """Memory a job may use on ``device``: free GPU memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

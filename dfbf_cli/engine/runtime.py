"""Conventions every command shares: which device, which number format, which seed."""

from __future__ import annotations

import contextlib
import random
import re

import numpy as np
import torch

from dfbf_cli.errors import DfbfError


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a device that is absent is a user error."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise DfbfError(f"Unknown device '{spec}'; use auto, cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        raise DfbfError(f"Device '{spec}' was asked for but no CUDA GPU is available here; use --device cpu.")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DfbfError(f"Device '{spec}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    return torch.device("cuda", index)


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``. ``auto`` takes bfloat16 where the hardware computes it natively (CUDA with
    bf16, CPUs with AVX512-BF16 or AMX): two thirds of the time or less on this project's CPU, same
    recovery (docs/finetune.md, "Precision")."""
    if precision not in PRECISIONS:
        raise DfbfError(f"Unknown --precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:  # private probes (torch >= 2.2); absent ones count as "no"
        native = any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if native else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes' context: bfloat16 autocast, or nothing (fp32). Reusable; weights stay fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

"""Conventions every command shares: which device, which seed."""

from __future__ import annotations

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

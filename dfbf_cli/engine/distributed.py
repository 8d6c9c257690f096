"""Running under ``torchrun``: dfbf reads the launcher's environment itself (no flag), uses NCCL on CUDA
and gloo on CPU, and keeps to three rules: every rank computes what is deterministic, rank 0 alone
writes shared files (others wait at a barrier before reading them), and only rank 0 speaks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """The world torchrun describes in the environment (one process without it)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def current() -> World:
    """The world of the process group in use (one process when none is)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block (NCCL on CUDA, gloo on CPU); nothing without torchrun."""
    world = launched()
    if not world.distributed or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (rank 0's files are then complete for the others to read)."""
    if current().distributed:
        dist.barrier()


def mean(value: float) -> float:
    """The mean over ranks of a number each rank measured."""
    if not current().distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor) / current().size

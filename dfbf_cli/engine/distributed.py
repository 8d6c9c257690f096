"""Running under ``torchrun``: dfbf reads the launcher's environment itself (no flag), uses NCCL on CUDA
and gloo on CPU, and keeps to three rules: rank 0 alone writes shared files (the others wait for it,
:func:`main_first`, then read them), a mistake found on rank 0 is raised on every rank, and only rank 0
speaks. Several machines need a shared file system for the run directory and datasets."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from dfbf_cli.errors import DfbfError
from dfbf_cli.files import exclusive

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """The world torchrun describes in the environment (one process without it)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def current() -> World:
    """The world of the process group in use (one process when none is)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block (NCCL on CUDA, gloo on CPU); nothing without torchrun."""
    world = launched()
    if not world.distributed or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this rank's GPU, for NCCL's collectives too
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def check_batch_split(batch: int) -> None:
    """Every rank takes an equal share of each batch: refuse, before any work, a batch that does not split."""
    processes = launched().size
    if batch % processes:
        raise DfbfError(f"A batch of {batch} images does not split evenly over {processes} processes (torchrun --nproc-per-node); "
                        f"use a batch that is a multiple of {processes}, or another number of processes.")


def barrier() -> None:
    """Wait for every rank (rank 0's files are then complete for the others to read)."""
    if current().distributed:
        dist.barrier()


def rank_mean(value: float) -> float:
    """The mean over ranks of a number each rank measured."""
    if not current().distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor) / current().size


def main_first(work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 (it writes what the others then read) while the others wait; a mistake it
    finds is raised on every rank, so none is left waiting. Returns rank 0's result (None elsewhere)."""
    world = current()
    if not world.distributed:
        return work()
    failure, result = None, None
    if world.main:
        try:
            result = work()
        except DfbfError as error:
            failure = str(error)
    outcome = [failure]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise DfbfError(outcome[0])
    return result


@contextlib.contextmanager
def job_exclusive(folder: Path, option: str) -> Iterator[None]:
    """:func:`~dfbf_cli.files.exclusive` for the whole job: rank 0 holds the folder's lock (the ranks of
    one torchrun job share it), and a refusal is raised on every rank."""
    with contextlib.ExitStack() as stack:
        main_first(lambda: stack.enter_context(exclusive(folder, option)))
        yield

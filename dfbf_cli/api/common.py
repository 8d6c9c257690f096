"""What every API function shares: the device, the pruning target validated once, a synthetic set read for a stage."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import Allocation, Criterion, PruneSettings, Schedule, Scope, require_fraction

if TYPE_CHECKING:
    import torch

    from dfbf_cli.contract import ModelAdapter
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

E = TypeVar("E", bound=Enum)


def dfbf_log():
    """dfbf's logger: the CLI shows its INFO lines on stderr (not with --quiet); a script decides for itself."""
    import logging

    return logging.getLogger("dfbf")


def as_device(device: str | torch.device) -> torch.device:
    """A device given as the CLI takes it (auto, cpu, cuda:N) or as a torch.device."""
    from dfbf_cli.engine.runtime import resolve_device

    return resolve_device(device) if isinstance(device, str) else device


def choice(kind: type[E], value: E | str, option: str) -> E:
    """``value`` as the Enum ``kind`` (a script may pass the string the CLI takes); anything else is a user mistake."""
    try:
        return kind(value)
    except ValueError:
        raise DfbfError(f"{option} {value!r} is not one of {', '.join(str(v) for v in kind)}.") from None


def at_least(option: str, value: int | None, low: int) -> None:
    """The numeric floor the CLI's options enforce, for callers from Python."""
    if value is not None and value < low:
        raise DfbfError(f"{option} must be at least {low}, got {value}.")


def pruning_target(ratio: float | None, flops: float | None, *, reconstruct: bool, **options) -> PruneSettings:
    """The pruning target (a ratio or the GFLOPs to keep), validated once, here. Without a criterion, the best
    measured one: energy where a refit follows (docs/reconstruct.md), L1 otherwise."""
    if ratio is not None:
        require_fraction("--ratio", ratio)
    if options.get("criterion") is None:
        options["criterion"] = Criterion.ENERGY if reconstruct else Criterion.L1
    kinds = {"scope": Scope, "allocation": Allocation, "criterion": Criterion, "schedule": Schedule}
    options = {name: choice(kinds[name], value, f"--{name}") if name in kinds else value for name, value in options.items()}
    return PruneSettings(ratio, flops, **options)  # which validates itself


def read_synthetic_set(path: str | Path, teacher: ModelAdapter, *, minimum: int, what: str, allow_mismatch: bool = False,
                       override: str | None = "--allow-teacher-mismatch", lineage: bool = False) -> SyntheticDataset:
    """A synthetic dataset read for ``what``: verified, made from ``teacher`` (with ``lineage``, also from the original it
    was pruned from), at least ``minimum`` images."""
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

    dataset = SyntheticDataset.open(Path(path))
    dataset.verify()
    dataset.check_teacher(teacher.fingerprint(), allow_mismatch=allow_mismatch, override=override,
                          lineage=teacher.lineage() if lineage else None)
    if dataset.num_images < minimum:
        raise DfbfError(f"{path} holds {dataset.num_images} image(s); {what} needs at least {minimum}.")
    return dataset

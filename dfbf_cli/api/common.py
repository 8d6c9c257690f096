"""What every API function shares: the device, the pruning target validated once, a synthetic set read for a stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import PruneSettings, require_fraction

if TYPE_CHECKING:
    import torch

    from dfbf_cli.contract import ModelAdapter
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset


def dfbf_log():
    """dfbf's logger: the CLI shows its INFO lines on stderr (not with --quiet); a script decides for itself."""
    import logging

    return logging.getLogger("dfbf")


def as_device(device: str | torch.device) -> torch.device:
    """A device given as the CLI takes it (auto, cpu, cuda:N) or as a torch.device."""
    from dfbf_cli.engine.runtime import resolve_device

    return resolve_device(device) if isinstance(device, str) else device


def pruning_target(ratio: float | None, flops: float | None, **options) -> PruneSettings:
    """The pruning target (a ratio or the GFLOPs to keep), validated once, here."""
    if ratio is not None:
        require_fraction("--ratio", ratio)
    settings = PruneSettings(ratio, flops, **options)
    settings.validate()
    return settings


def read_synthetic_set(path: str | Path, teacher: ModelAdapter, *, minimum: int, what: str, allow_mismatch: bool = False,
                       override: str | None = "--allow-teacher-mismatch") -> SyntheticDataset:
    """A synthetic dataset read for ``what``: verified, made from ``teacher`` (or what it was pruned from), at least ``minimum`` images."""
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

    dataset = SyntheticDataset.open(Path(path))
    dataset.verify()
    dataset.check_teacher(teacher.fingerprint(), allow_mismatch=allow_mismatch, override=override, lineage=teacher.lineage())
    if dataset.num_images < minimum:
        raise DfbfError(f"{path} holds {dataset.num_images} image(s); {what} needs at least {minimum}.")
    return dataset

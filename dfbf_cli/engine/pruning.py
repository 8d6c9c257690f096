"""Structured filter pruning of the backbone that really removes channels (smaller, faster models).

Adapters describe *where* channels may be removed as :class:`ChannelGroup` s: channels that must go
together (a conv's filters, its BatchNorm, the matching input slices of every conv that reads them,
at an offset where the tensor is part of a concatenation). This module decides *how many* channels
each group keeps (the schedule), *which* (an importance criterion), and cuts them out of the stock
modules in place, so the result still loads wherever the original did.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dfbf_cli.adapters.base import ModelAdapter
from dfbf_cli.errors import DfbfError


@dataclass(frozen=True)
class ChannelSlice:
    """``size`` channels of a module's output (producer) or input (consumer), starting at ``offset``."""

    module: str
    offset: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels pruned together. Producers: Conv2d filters (depthwise convs pass channels through) and
    BatchNorm2d features; consumers: the input channels of the Conv2d / Linear layers that read them."""

    name: str
    stage: str
    size: int
    producers: tuple[ChannelSlice, ...]
    consumers: tuple[ChannelSlice, ...]


def channel_group(name: str, stage: str, size: int, producers: list[str | ChannelSlice], consumers: list[str | ChannelSlice]) -> ChannelGroup:
    """Shorthand: plain module names mean offset 0."""
    as_slices = lambda items: tuple(s if isinstance(s, ChannelSlice) else ChannelSlice(s) for s in items)  # noqa: E731
    return ChannelGroup(name, stage, size, as_slices(producers), as_slices(consumers))


# -- importance criteria: a score per channel, higher means more important ---------------------------

def _first_producer(model: nn.Module, group: ChannelGroup, kind: type[nn.Module]) -> tuple[nn.Module, int]:
    for piece in group.producers:
        module = model.get_submodule(piece.module)
        if isinstance(module, kind):
            return module, piece.offset
    raise ValueError(f"group {group.name} has no {kind.__name__} producer")


def l1_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of each filter of the group's first convolution."""
    conv, offset = _first_producer(model, group, nn.Conv2d)
    return conv.weight.detach()[offset : offset + group.size].abs().flatten(1).sum(1)


def bn_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """|gamma| of the group's first BatchNorm (network slimming's scaling factor)."""
    bn, offset = _first_producer(model, group, nn.BatchNorm2d)
    return bn.weight.detach()[offset : offset + group.size].abs()


CRITERIA: dict[str, Callable[[nn.Module, ChannelGroup], torch.Tensor]] = {"l1": l1_importance, "bn": bn_importance}


# -- schedule: how many channels each group keeps -------------------------------------------------

def reference_layer_factor(width: int) -> float:
    """DFBF's reference rule for ``layer-dependent``: prune wide layers more (×1.3 from 500 channels,
    ×1 above 200, ×0.4 below)."""
    return 1.3 if width >= 500 else 1.0 if width > 200 else 0.4


def require_ratio(ratio: float) -> None:
    """What a user may ask for: 0 < R < 1 (the engine itself also accepts 0, meaning no change)."""
    if not (0.0 < ratio < 1.0):  # also refuses NaN
        raise DfbfError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}.")


@dataclass(frozen=True)
class PruneSettings:
    ratio: float
    criterion: str = "l1"
    schedule: str = "uniform"
    min_channels: int = 8
    round_to: int = 1

    def validate(self) -> None:
        if not (0.0 <= self.ratio < 1.0):  # also refuses NaN
            raise DfbfError(f"Pruning ratio must be at least 0 and below 1, got {self.ratio}.")
        if self.criterion not in CRITERIA:
            raise DfbfError(f"Unknown criterion '{self.criterion}'; choose one of {', '.join(CRITERIA)}.")
        if self.schedule not in {"uniform", "layer-dependent"}:
            raise DfbfError(f"Unknown schedule '{self.schedule}'; choose uniform or layer-dependent.")
        if self.min_channels < 1 or self.round_to < 1:
            raise DfbfError("--min-channels and --round-to must be at least 1.")

    def keep_count(self, size: int) -> int:
        """Channels a group of ``size`` keeps: the ratio removed, rounded, never below the floor."""
        ratio = self.ratio * (reference_layer_factor(size) if self.schedule == "layer-dependent" else 1.0)
        keep = size - math.floor(size * min(ratio, 0.95))
        if keep < size and self.round_to > 1:
            keep = max(self.round_to, round(keep / self.round_to) * self.round_to)
        return min(size, max(keep, self.min_channels))


# -- the pruner ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupOutcome:
    name: str
    stage: str
    before: int
    after: int


def select_channels(model: nn.Module, group: ChannelGroup, settings: PruneSettings) -> torch.Tensor:
    """Indices (sorted) of the channels the group keeps: the most important, ties to the lower index."""
    keep = settings.keep_count(group.size)
    try:
        scores = CRITERIA[settings.criterion](model, group).float().cpu()
    except ValueError as error:
        raise DfbfError(f"Criterion '{settings.criterion}' does not apply to this model ({error}); try --criterion l1.") from error
    order = torch.argsort(-scores, stable=True)
    return order[:keep].sort().values


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels if side == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    raise TypeError(f"cannot prune {type(module).__name__}")


def _take(tensor: torch.Tensor | None, dim: int, index: torch.Tensor, parameter: bool):
    if tensor is None:
        return None
    taken = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    return nn.Parameter(taken, requires_grad=tensor.requires_grad) if parameter else taken


def slice_module(module: nn.Module, side: str, index: torch.Tensor) -> None:
    """Keep only ``index`` of a module's output (``side='out'``) or input (``'in'``) channels."""
    n = len(index)
    if isinstance(module, nn.BatchNorm2d):
        module.weight, module.bias = _take(module.weight, 0, index, True), _take(module.bias, 0, index, True)
        module.running_mean = _take(module.running_mean, 0, index, False)
        module.running_var = _take(module.running_var, 0, index, False)
        module.num_features = n
    elif isinstance(module, nn.Conv2d) and side == "out":
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.weight, module.bias = _take(module.weight, 0, index, True), _take(module.bias, 0, index, True)
        module.out_channels = n
        if depthwise:
            module.in_channels = module.groups = n
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError("input channels of a grouped convolution cannot be sliced independently")
        module.weight, module.in_channels = _take(module.weight, 1, index, True), n
    elif isinstance(module, nn.Linear):
        dim = 0 if side == "out" else 1
        module.weight = _take(module.weight, dim, index, True)
        if side == "out":
            module.bias, module.out_features = _take(module.bias, 0, index, True), n
        else:
            module.in_features = n
    else:
        raise TypeError(f"cannot prune {type(module).__name__}")


def apply_pruning(model: nn.Module, groups: list[ChannelGroup], kept: dict[str, torch.Tensor]) -> None:
    """Cut every module once, combining all groups that touch it (concatenations hold several)."""
    cuts: dict[tuple[str, str], list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
    for group in groups:
        if len(kept[group.name]) == group.size:
            continue
        for side, pieces in (("out", group.producers), ("in", group.consumers)):
            for piece in pieces:
                cuts[(piece.module, side)].append((piece.offset, group.size, kept[group.name]))
    for (name, side), entries in cuts.items():
        module = model.get_submodule(name)
        mask = torch.ones(_width(module, side), dtype=torch.bool)
        for offset, size, keep in entries:
            segment = torch.zeros(size, dtype=torch.bool)
            segment[keep] = True
            mask[offset : offset + size] &= segment
        slice_module(module, side, mask.nonzero().squeeze(1))


def prune(adapter: ModelAdapter, settings: PruneSettings) -> tuple[ModelAdapter, list[GroupOutcome]]:
    """A pruned copy of the model (the original is untouched) and what happened to each group."""
    settings.validate()
    pruned = adapter.with_model(copy.deepcopy(adapter.model))
    groups = pruned.channel_groups()
    head = tuple(pruned.split().head_modules)
    for group in groups:
        for piece in group.producers + group.consumers:
            if piece.module == "" or any(piece.module == h or piece.module.startswith(h + ".") for h in head):
                raise RuntimeError(f"channel group {group.name} reaches into the head ({piece.module})")
    kept = {g.name: select_channels(pruned.model, g, settings) for g in groups}
    apply_pruning(pruned.model, groups, kept)
    return pruned, [GroupOutcome(g.name, g.stage, g.size, len(kept[g.name])) for g in groups]

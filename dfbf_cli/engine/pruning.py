"""Structured filter pruning that really removes channels (smaller, faster models).

Adapters say *where* channels may go, as :class:`ChannelGroup` s. This module decides *how many*
each group keeps (a uniform ratio, or a GFLOPs target shared among the groups by an
:class:`Allocation`), *which* (an importance criterion, kept separate from the pruner), and cuts them
out of the stock modules in place, so the result still loads wherever the original did.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dfbf_cli.contract import ChannelGroup, ModelAdapter
from dfbf_cli.engine.features import feature_gap
from dfbf_cli.engine.progress import ProgressCallback, ProgressEvent, ignore
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import MAX_GROUP_RATIO, Allocation, Criterion, PruneSettings, Scope

SENSITIVITY_RATIO = 0.5  # each group is measured pruned alone at this ratio
WEIGHT_RANGE = (0.25, 4.0)  # a group is pruned between a quarter and four times the common ratio
ENERGY_IMAGES = 128  # synthetic images --criterion energy scores channels on, at most (as measured: docs/reconstruct.md)

# -- importance criteria: a score per channel, higher means more important ---------------------------


def _first_producer(model: nn.Module, group: ChannelGroup, kind: type[nn.Module]) -> tuple[nn.Module, int]:
    for piece in group.producers:
        module = model.get_submodule(piece.module)
        if isinstance(module, kind):
            return module, piece.offset
    raise DfbfError(f"Channel group {group.name} has no {kind.__name__} to score, as --criterion {'bn' if kind is nn.BatchNorm2d else 'l1'} needs; "
                    "try the other criterion.")


def l1_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of each filter of the group's first convolution."""
    conv, offset = _first_producer(model, group, nn.Conv2d)
    return conv.weight.detach()[offset : offset + group.size].abs().flatten(1).sum(1)


def bn_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """|gamma| of the group's first BatchNorm (network slimming's scaling factor)."""
    bn, offset = _first_producer(model, group, nn.BatchNorm2d)
    return bn.weight.detach()[offset : offset + group.size].abs()


@torch.no_grad()
def energy_importance(adapter: ModelAdapter, groups: list[ChannelGroup], images: torch.Tensor, batch: int = 16) -> dict[str, torch.Tensor]:
    """Per group, the energy each channel sends its consumers on ``images`` (floats in [0, 1]): E[a²]·‖W[:, c]‖²
    summed over the consumers, one forward pass (a first-order ThiNet: what the layer after would lose)."""
    model = adapter.model.eval()
    device = next(model.parameters()).device
    energy: dict[str, torch.Tensor] = {}

    def recorder(group: ChannelGroup, offset: int):
        def record(module: nn.Module, inputs: tuple) -> None:
            if getattr(module, "groups", 1) != 1:
                raise DfbfError(f"Channel group {group.name} feeds a grouped convolution, which --criterion energy cannot score; try l1.")
            columns, x, w = slice(offset, offset + group.size), inputs[0].double(), module.weight.double()
            if isinstance(module, nn.Linear):
                found = x[..., columns].square().reshape(-1, group.size).mean(0) * w[:, columns].square().sum(0)
            else:
                found = x[:, columns].square().mean((0, 2, 3)) * w[:, columns].square().sum((0, 2, 3))
            energy[group.name] = energy.get(group.name, 0) + found.cpu()

        return record

    handles = [model.get_submodule(piece.module).register_forward_pre_hook(recorder(group, piece.offset))
               for group in groups for piece in group.consumers]
    try:
        for start in range(0, len(images), batch):
            model(adapter.input_spec.normalize(images[start : start + batch].to(device)))
    finally:
        for handle in handles:
            handle.remove()
    unseen = [g.name for g in groups if g.name not in energy]
    if unseen:
        raise DfbfError(f"No consumer of channel group(s) {', '.join(unseen)} ran on the images, so --criterion energy cannot score them; try l1.")
    return energy


def scoring_images(criterion: Criterion, probe: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
    """The synthetic images ``criterion`` scores channels on (``probe(n)``: a dataset's first ``n`` as floats), if it needs any.
    Pruning and the reconstruction that follows it must select on the same ones."""
    return probe(ENERGY_IMAGES) if criterion == Criterion.ENERGY else None


WEIGHT_CRITERIA: dict[Criterion, Callable[[nn.Module, ChannelGroup], torch.Tensor]] = {Criterion.L1: l1_importance, Criterion.BN: bn_importance}


def channel_scores(adapter: ModelAdapter, groups: list[ChannelGroup], criterion: Criterion, images: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each group's channel importances (higher: more important). The weight criteria read the model alone;
    ``energy`` also needs synthetic ``images`` (floats in [0, 1])."""
    if criterion != Criterion.ENERGY:
        return {g.name: WEIGHT_CRITERIA[criterion](adapter.model, g) for g in groups}
    if images is None:
        raise DfbfError("--criterion energy scores channels on synthetic images: pass --synthetic DIR (from 'dfbf synthesize').")
    return energy_importance(adapter, groups, images)


def select_channels(scores: dict[str, torch.Tensor], keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per group, the indices (sorted) of its ``keep`` most important channels, ties to the lower index."""
    return {name: torch.argsort(-scores[name].float().cpu(), stable=True)[:count].sort().values for name, count in keep.items()}


# -- how many channels each group keeps ------------------------------------------------------------


class FlopModel:
    """GFLOPs of the model as a function of how many channels each group keeps, without cutting anything:
    every convolution and linear layer's cost from its widths and (measured once) output size, plus the
    rest of the model, which pruning does not change. Agrees with torch's FLOP counter (tested)."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor):
        from dfbf_cli.engine.efficiency import gflops

        self.groups = {g.name: g for g in groups}
        self.layers: dict[str, tuple[nn.Module, int]] = {}
        hooks = [m.register_forward_hook(self._recorder(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            total = gflops(model, example)
        finally:
            for hook in hooks:
                hook.remove()
        self.fixed = total - self._layer_gflops({})

    def _recorder(self, name: str):
        def record(module, _inputs, output) -> None:
            self.layers[name] = (module, output[0, 0].numel() if isinstance(module, nn.Conv2d) else output.numel() // output.shape[-1])

        return record

    def _layer_gflops(self, keep: dict[str, int]) -> float:
        removed: dict[tuple[str, str], int] = defaultdict(int)
        for name, kept in keep.items():
            group = self.groups[name]
            for side, pieces in (("out", group.producers), ("in", group.consumers)):
                for piece in pieces:
                    removed[(piece.module, side)] += group.size - kept
        flops = 0.0
        for name, (module, positions) in self.layers.items():
            if isinstance(module, nn.Linear):
                flops += 2 * (module.in_features - removed[(name, "in")]) * (module.out_features - removed[(name, "out")]) * positions
                continue
            out_channels = module.out_channels - removed[(name, "out")]
            per_group_in = module.in_channels // module.groups
            if module.groups > 1:  # depthwise: its channels go with its output
                in_channels = per_group_in
            else:
                in_channels = module.in_channels - removed[(name, "in")]
            flops += 2 * out_channels * in_channels * math.prod(module.kernel_size) * positions
        return flops / 1e9

    def gflops(self, keep: dict[str, int]) -> float:
        return self.fixed + self._layer_gflops(keep)


def _floor(group: ChannelGroup, settings: PruneSettings) -> int:
    """The fewest channels a group may keep."""
    floor = max(settings.min_channels, math.ceil(group.size * (1 - MAX_GROUP_RATIO)))
    return min(group.size, -(-floor // settings.round_to) * settings.round_to)


def weighted_keep(groups: list[ChannelGroup], ratio: float, settings: PruneSettings, weights: dict[str, float]) -> dict[str, int]:
    """Each group pruned at ``ratio`` times its weight (1 for all: a uniform ratio)."""
    return {g.name: settings.keep_count(g.size, min(ratio * weights.get(g.name, 1.0), MAX_GROUP_RATIO)) for g in groups}


def solve_ratio(groups: list[ChannelGroup], flops: FlopModel, budget: float, settings: PruneSettings, weights: dict[str, float]) -> dict[str, int]:
    """The smallest scale of the (weighted) ratio whose model fits ``budget`` GFLOPs (bisection: keep counts
    only fall as it rises); where that last step cuts several groups at once, only as many as the budget needs."""
    top = MAX_GROUP_RATIO / min(w for w in weights.values() if w > 0)
    if flops.gflops(weighted_keep(groups, top, settings, weights)) > budget:
        raise _unreachable(flops.gflops(weighted_keep(groups, top, settings, weights)), flops.gflops({}), budget)
    low, high = 0.0, top
    for _ in range(50):
        middle = (low + high) / 2
        if flops.gflops(weighted_keep(groups, middle, settings, weights)) > budget:
            low = middle
        else:
            high = middle
    keep, enough = weighted_keep(groups, low, settings, weights), weighted_keep(groups, high, settings, weights)
    for name in (n for n in enough if enough[n] != keep[n]):
        if flops.gflops(keep) <= budget:
            break
        keep[name] = enough[name]
    return keep


def _unreachable(smallest: float, original: float, budget: float) -> DfbfError:
    return DfbfError(
        f"--flops {budget / original:.3g} cannot be reached in this scope: the most that can be pruned leaves "
        f"{smallest / original:.1%} of the GFLOPs; ask for {math.ceil(smallest / original * 100) / 100:.2f} or more, or --scope trunk."
    )


def group_costs(
    adapter: ModelAdapter, groups: list[ChannelGroup], probe: torch.Tensor, flops: FlopModel, settings: PruneSettings, *,
    device: torch.device, images: torch.Tensor | None = None, on_progress: ProgressCallback = ignore,
) -> dict[str, float]:
    """What each group costs, measured data-free: the group alone at half its channels, its feature distance
    to the original on synthetic images, per GFLOP saved (groups that cannot shrink are left out). ``images``:
    what ``--criterion energy`` scores channels on."""
    costs = {}
    scores = channel_scores(adapter, groups, settings.criterion, images)
    for index, group in enumerate(groups):
        keep = max(_floor(group, settings), settings.keep_count(group.size, SENSITIVITY_RATIO))
        saved = flops.gflops({}) - flops.gflops({group.name: keep})
        if keep < group.size and saved > 0:
            alone = cut(adapter, groups, select_channels(scores, {group.name: keep}))
            costs[group.name] = feature_gap(alone, adapter, probe, scope=settings.scope, device=device) / saved
        on_progress(ProgressEvent("sensitivity", index + 1, len(groups), {"group": group.name}))
    return costs


def sensitivity_weights(costs: dict[str, float]) -> dict[str, float]:
    """How much more (or less) than the rest each group is pruned: (median cost / own cost)^½, within [¼, 4]."""
    if not costs:
        raise DfbfError("No channel group can shrink under these settings (--min-channels, --round-to); nothing to allocate.")
    median = statistics.median(costs.values())
    return {name: min(WEIGHT_RANGE[1], max(WEIGHT_RANGE[0], math.sqrt(median / max(cost, 1e-12)))) for name, cost in costs.items()}


def plan_keep(
    adapter: ModelAdapter, settings: PruneSettings, *, imgsz: int, probe: torch.Tensor | None, device: torch.device,
    images: torch.Tensor | None = None, on_progress: ProgressCallback = ignore,
) -> dict[str, int]:
    """How many channels each group of ``settings.scope`` keeps, for a ratio or a GFLOPs target (``probe``: the
    sensitivity allocation's images; ``images``: what ``--criterion energy`` scores channels on)."""
    groups = adapter.channel_groups(settings.scope)
    if settings.ratio is not None:
        return {g.name: settings.keep_count(g.size) for g in groups}
    if not groups:
        raise DfbfError(f"{adapter.describe()} has no channel group that scope '{settings.scope}' may prune.")
    flops = FlopModel(adapter.model.eval().cpu(), groups, torch.zeros(1, 3, imgsz, imgsz))
    budget = settings.flops * flops.gflops({})
    weights = {g.name: 1.0 for g in groups}
    if settings.allocation == Allocation.SENSITIVITY:
        if probe is None:
            raise DfbfError("--allocation sensitivity measures each group on synthetic images: pass --synthetic DIR (from 'dfbf synthesize').")
        costs = group_costs(adapter, groups, probe, flops, settings, device=device, images=images, on_progress=on_progress)
        weights = {g.name: 0.0 for g in groups} | sensitivity_weights(costs)
    return solve_ratio(groups, flops, budget, settings, weights)


# -- the cutter ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupOutcome:
    name: str
    stage: str
    before: int
    after: int


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


def cut_indices(model: nn.Module, groups: list[ChannelGroup], kept: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """The channels each (module, side) keeps, combining all groups that touch it (concatenations hold several)."""
    cuts: dict[tuple[str, str], list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
    for group in groups:
        if group.name not in kept or len(kept[group.name]) == group.size:
            continue
        for side, pieces in (("out", group.producers), ("in", group.consumers)):
            for piece in pieces:
                cuts[(piece.module, side)].append((piece.offset, group.size, kept[group.name]))
    indices = {}
    for (name, side), entries in cuts.items():
        mask = torch.ones(_width(model.get_submodule(name), side), dtype=torch.bool)
        for offset, size, keep in entries:
            segment = torch.zeros(size, dtype=torch.bool)
            segment[keep] = True
            mask[offset : offset + size] &= segment
        indices[(name, side)] = mask.nonzero().squeeze(1)
    return indices


def apply_pruning(model: nn.Module, groups: list[ChannelGroup], kept: dict[str, torch.Tensor]) -> None:
    """Cut every module once, to the channels :func:`cut_indices` keeps."""
    for (name, side), index in cut_indices(model, groups, kept).items():
        slice_module(model.get_submodule(name), side, index)


def check_head_untouched(groups: list[ChannelGroup], head_modules: list[str]) -> None:
    for group in groups:
        for piece in group.producers + group.consumers:
            if piece.module == "" or any(piece.module == h or piece.module.startswith(h + ".") for h in head_modules):
                raise RuntimeError(f"channel group {group.name} reaches into the untouched part ({piece.module})")


def cut(adapter: ModelAdapter, groups: list[ChannelGroup], chosen: dict[str, torch.Tensor]) -> ModelAdapter:
    """A copy of the model with each named group cut to its ``chosen`` channels (others untouched)."""
    pruned = adapter.with_model(copy.deepcopy(adapter.model))
    apply_pruning(pruned.model, groups, chosen)
    return pruned


def choose(adapter: ModelAdapter, settings: PruneSettings, keep: dict[str, int] | None = None,
           images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Which channels each group of ``settings.scope`` keeps (sorted indices): its ``keep`` most important by
    ``settings.criterion`` (``images``, floats in [0, 1]: what ``energy`` scores on). ``keep`` comes from
    :func:`plan_keep`; without it, ``settings.ratio`` decides. Chosen once, then cut (:func:`prune`) and refit to."""
    groups = adapter.channel_groups(settings.scope)
    if keep is None:
        if settings.ratio is None:
            raise ValueError("a GFLOPs target needs plan_keep() to share it among the groups")
        keep = {g.name: settings.keep_count(g.size) for g in groups}
    return select_channels(channel_scores(adapter, groups, settings.criterion, images), keep)


def kept_outputs(adapter: ModelAdapter, scope: Scope, chosen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The output channels of ``adapter``'s layers that cutting its groups to ``chosen`` leaves (indices into the
    original's; layers absent keep all): what reconstruction fits each pruned layer to."""
    return kept_output_indices(adapter.model, adapter.channel_groups(scope), chosen)


def kept_output_indices(model: nn.Module, groups: list[ChannelGroup], chosen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`kept_outputs` for a bare model and its groups (what progressive pruning's cutter sees)."""
    return {name: index for (name, side), index in cut_indices(model, groups, chosen).items() if side == "out"}


def prune(adapter: ModelAdapter, settings: PruneSettings, chosen: dict[str, torch.Tensor] | None = None) -> tuple[ModelAdapter, list[GroupOutcome]]:
    """A pruned copy of the model (the original is untouched) and what happened to each group: cut to ``chosen``
    (from :func:`choose`; without it, by ``settings.ratio`` and a weight criterion)."""
    groups = adapter.channel_groups(settings.scope)
    chosen = choose(adapter, settings) if chosen is None else chosen
    check_head_untouched(groups, adapter.split(settings.scope).head_modules)
    return cut(adapter, groups, chosen), [GroupOutcome(g.name, g.stage, g.size, len(chosen[g.name])) for g in groups]

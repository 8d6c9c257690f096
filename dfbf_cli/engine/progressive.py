"""Progressive, robustness-guided pruning (after Paoding: Meng, Bai, Teo, Dong 2022), on channels.

Instead of cutting each layer's quota at once, channels go a few at a time over ``steps`` rounds.
A pruned channel is **merged** into its most similar surviving channel of the same group (Srinivas &
Babu's saliency: distance between the two channels' post-BatchNorm affine maps times the norm of the
pruned channel's outgoing weights); its outgoing weights are added to the survivor's, so its
contribution is approximated rather than dropped. Candidates are scored by their measured effect on
the backbone's outputs (what the head reads) for a probe batch of synthetic images and for perturbed
copies of it, α·clean + (1−α)·perturbed, and accepted by simulated annealing: below the layer's
current target always, above it with probability exp(−Δ/T), T falling as the layer nears its quota.

While searching, a merge only edits weights (the pruned channel's outgoing weights become zero);
the channels are cut out once at the end with the one-shot pruner's :func:`apply_pruning`, which is
then exact. Every group ends at exactly the one-shot quota, so both strategies reach the same size.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import torch
from torch import nn

from dfbf_cli.contract import BackboneSplit, ChannelGroup, ModelAdapter
from dfbf_cli.engine.progress import ProgressCallback, ProgressEvent, ignore
from dfbf_cli.engine.pruning import GroupOutcome, apply_pruning, check_head_untouched
from dfbf_cli.settings import ProgressiveSettings, PruneSettings

CANDIDATES_PER_CHANNEL = 2  # channels scored per channel to remove in a step
PROBE_MAX_IMGSZ = 160  # px: the probe is downscaled to this (the backbone is convolutional): scoring speed


def _conv_and_norm(model: nn.Module, group: ChannelGroup) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, int]:
    conv = next(model.get_submodule(p.module) for p in group.producers if isinstance(model.get_submodule(p.module), nn.Conv2d))
    norm = next((model.get_submodule(p.module) for p in group.producers if isinstance(model.get_submodule(p.module), nn.BatchNorm2d)), None)
    return conv, norm, group.producers[0].offset


def affine_maps(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Each channel as the affine map conv→BN computes: (γ/σ · filter, β − γμ/σ + γ/σ · bias)."""
    conv, norm, offset = _conv_and_norm(model, group)
    w = conv.weight.detach()[offset : offset + group.size].flatten(1)
    b = conv.bias.detach()[offset : offset + group.size] if conv.bias is not None else torch.zeros(group.size)
    if norm is not None:
        scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        w, b = w * scale[:, None], norm.bias.detach() + scale * (b - norm.running_mean)
    return torch.cat([w, b[:, None]], dim=1)


def outgoing_weights(model: nn.Module, group: ChannelGroup, channel: int) -> list[torch.Tensor]:
    """Views of every consumer's input weights for ``channel`` (one per consumer slice)."""
    views = []
    for piece in group.consumers:
        weight = model.get_submodule(piece.module).weight
        views.append(weight[:, piece.offset + channel])
    return views


def merge_channel(model: nn.Module, group: ChannelGroup, removed: int, survivor: int | None) -> None:
    """Fold ``removed`` into ``survivor`` (its outgoing weights are added to the survivor's), then zero
    them; with no survivor the channel is simply dropped."""
    with torch.no_grad():
        sources = outgoing_weights(model, group, removed)
        targets = outgoing_weights(model, group, survivor) if survivor is not None else [None] * len(sources)
        for source, target in zip(sources, targets):
            if target is not None:
                target += source
            source.zero_()


def candidates(model: nn.Module, group: ChannelGroup, alive: list[int], count: int) -> list[tuple[int, int]]:
    """(channel, nearest partner) pairs worth trying: the ``count`` lowest Srinivas & Babu saliencies
    (distance² × ‖outgoing weights‖²), then the ``count`` smallest filters (L1), without repeats."""
    maps = affine_maps(model, group)[alive]
    distance = torch.cdist(maps, maps)
    distance.fill_diagonal_(math.inf)
    nearest = distance.argmin(dim=1)
    out_norm = torch.tensor([sum(float(v.detach().pow(2).sum()) for v in outgoing_weights(model, group, c)) for c in alive])
    saliency = distance.gather(1, nearest[:, None]).squeeze(1) ** 2 * out_norm
    l1 = maps[:, :-1].abs().sum(1)
    order = [int(k) for k in torch.argsort(saliency, stable=True)[:count]] + [int(k) for k in torch.argsort(l1, stable=True)[:count]]
    return [(alive[k], alive[int(nearest[k])]) for k in dict.fromkeys(order)]


class OutputImpact:
    """How much an edit of the backbone moves its outputs on a clean and a noisy probe batch."""

    def __init__(self, split: BackboneSplit, probe: torch.Tensor, settings: ProgressiveSettings, normalize: Callable, seed: int):
        self.split, self.alpha = split, settings.alpha
        noise = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed)) * settings.epsilon
        self.inputs = torch.cat([normalize(probe), normalize((probe + noise).clamp(0, 1))])
        self.half = len(probe)
        self.reference = self._outputs()

    @torch.no_grad()
    def _outputs(self) -> list[torch.Tensor]:
        return [o.detach().clone() for o in self.split.backbone(self.inputs)]

    @torch.no_grad()
    def score(self, backbone: nn.Module | None = None) -> float:
        """α · relative change of the clean outputs + (1 − α) · that of the perturbed outputs, for the
        backbone being edited or another of the same output shapes (a pruned copy)."""
        clean = perturbed = 0.0
        for now, before in zip((backbone or self.split.backbone)(self.inputs), self.reference):
            scale = before.abs().mean() + 1e-8
            clean += float((now[: self.half] - before[: self.half]).abs().mean() / scale)
            perturbed += float((now[self.half :] - before[self.half :]).abs().mean() / scale)
        return self.alpha * clean + (1 - self.alpha) * perturbed


def _best_edit(model: nn.Module, group: ChannelGroup, channel: int, partner: int, impact: OutputImpact) -> tuple[float, int | None]:
    """Score merging ``channel`` into ``partner`` and dropping it outright; return the better (weights restored)."""
    saved = [v.detach().clone() for v in outgoing_weights(model, group, channel) + outgoing_weights(model, group, partner)]
    scores = {}
    for survivor in (partner, None):
        merge_channel(model, group, channel, survivor)
        scores[survivor] = impact.score()
        with torch.no_grad():
            for view, value in zip(outgoing_weights(model, group, channel) + outgoing_weights(model, group, partner), saved):
                view.copy_(value)
    survivor = min(scores, key=lambda k: scores[k])
    return scores[survivor], survivor


def progressive_prune(
    adapter: ModelAdapter, settings: PruneSettings, keep: dict[str, int], progressive: ProgressiveSettings, probe: torch.Tensor, *,
    seed: int, on_progress: ProgressCallback = ignore,
) -> tuple[ModelAdapter, list[GroupOutcome]]:
    """A copy of the model pruned to the per-group counts ``keep`` (as one-shot pruning would), progressively.

    ``probe`` holds synthetic images in [0, 1] (N×3×H×W); the same seed gives the same model.
    """
    progressive.validate()
    pruned = adapter.with_model(copy.deepcopy(adapter.model).eval().cpu())
    model, groups = pruned.model, pruned.channel_groups(settings.scope)
    split = pruned.split(settings.scope)
    check_head_untouched(groups, split.head_modules)
    rng = random.Random(seed)
    probe = probe[: progressive.probe_images].float().cpu()
    if probe.shape[-1] > PROBE_MAX_IMGSZ:
        probe = torch.nn.functional.interpolate(probe, size=(PROBE_MAX_IMGSZ, PROBE_MAX_IMGSZ), mode="bilinear", antialias=True)
    impact = OutputImpact(split, probe, progressive, pruned.input_spec.normalize, seed)
    quota = {g.name: g.size - keep[g.name] for g in groups}
    alive = {g.name: list(range(g.size)) for g in groups}
    target: dict[str, float | None] = {g.name: None for g in groups}
    total, removed = sum(quota.values()), 0
    for step in range(progressive.steps):
        for group in groups:
            done = group.size - len(alive[group.name])
            wanted = min(quota[group.name] - done, math.ceil(quota[group.name] * (step + 1) / progressive.steps) - done)
            accepted = 0
            pool = candidates(model, group, alive[group.name], max(wanted * CANDIDATES_PER_CHANNEL, 1)) if wanted > 0 else []
            scored = sorted(((*_best_edit(model, group, c, p, impact), c) for c, p in pool), key=lambda e: (e[0], e[2]))  # best first
            for score, survivor, channel in scored:
                if accepted == wanted:
                    break
                if survivor is not None and survivor not in alive[group.name]:
                    continue  # merged away earlier in this step
                reference = target[group.name] if target[group.name] is not None else score
                temperature = max(reference, 1e-6) * (quota[group.name] - done - accepted) / quota[group.name]
                forced = step == progressive.steps - 1  # the last step must reach the quota exactly
                if forced or score <= reference or rng.random() < math.exp(-(score - reference) / max(temperature, 1e-9)):
                    merge_channel(model, group, channel, survivor)
                    alive[group.name].remove(channel)
                    accepted += 1
                    target[group.name] = score if target[group.name] is None else 0.5 * (target[group.name] + score)
            removed += accepted
            on_progress(ProgressEvent("prune", removed, total, {"step": f"{step + 1}/{progressive.steps}", "layer score": target[group.name] or 0.0}))
    leftovers = {g.name: quota[g.name] - (g.size - len(alive[g.name])) for g in groups}
    for group in groups:  # rare: not enough acceptable pairs in the final step; merge the most similar rest
        while leftovers[group.name] > 0:
            channel, partner = candidates(model, group, alive[group.name], 1)[0]
            merge_channel(model, group, channel, _best_edit(model, group, channel, partner, impact)[1])
            alive[group.name].remove(channel)
            leftovers[group.name] -= 1
    kept = {g.name: torch.tensor(alive[g.name]) for g in groups}
    apply_pruning(model, groups, kept)
    return pruned, [GroupOutcome(g.name, g.stage, g.size, len(alive[g.name])) for g in groups]

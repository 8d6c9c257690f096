"""Closed-form reconstruction: refit the pruned scope layer by layer, so that it starts near the original.

Each convolution (and linear layer) of the scope, in execution order, gets the weights that best map
the *student's own* inputs (upstream layers already refit) to the *teacher's* outputs of that layer
on the same synthetic images, for the output channels the student kept: a ridge least-squares fit
(He et al.'s channel pruning and ThiNet do this on real data). Every output position of every image is
one equation, so a few dozen images pin down even the widest layer. Statistics stream through Gram
matrices (memory bounded by the widest layer, not the image count); the solve is fp64. A layer whose
fit would not lower its own error keeps its weights. A fitted bias goes into the layer's bias, or
into the running mean of the BatchNorm that reads it. The engine sees layers and the adapter's
split, never a task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.progress import ProgressCallback, ProgressEvent, ignore
from dfbf_cli.settings import ReconstructSettings, Scope

FITTED = (nn.Conv2d, nn.Linear)


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer of interest has run."""


@dataclass(frozen=True)
class LayerFit:
    """One layer's mean squared error per output value, before and after (``refit``: whether the fit won and was kept)."""

    name: str
    before: float
    after: float
    refit: bool


def _in_head(name: str, head_modules: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head_modules)


@torch.no_grad()
def fitted_layers(adapter: ModelAdapter, scope: Scope, example: torch.Tensor) -> list[tuple[str, str | None]]:
    """The scope's convolutions and linear layers in the order they run, each with the BatchNorm that reads
    its output directly (where a fitted bias can go when the layer has none), or None."""
    split = adapter.split(scope)
    order: list[str] = []
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are held, so no id is reused during the pass
    follower: dict[str, str] = {}
    handles = []
    for name, module in adapter.model.named_modules():
        if _in_head(name, split.head_modules):
            continue
        if isinstance(module, FITTED):
            def record(_m, _i, output, name=name) -> None:
                if name not in order:
                    order.append(name)
                    outputs[id(output)] = (name, output)
            handles.append(module.register_forward_hook(record))
        elif isinstance(module, nn.BatchNorm2d):
            def read(_m, inputs, name=name) -> None:
                source = outputs.get(id(inputs[0]))
                if source is not None:
                    follower.setdefault(source[0], name)
            handles.append(module.register_forward_pre_hook(read))
    try:
        split.backbone.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(name, follower.get(name)) for name in order]


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as equations: groups × rows × (inputs per group), for a convolution the im2col patches."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).unsqueeze(0)
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)  # N × C·k² × L
    n, _, positions = patches.shape
    return patches.view(n, layer.groups, -1, positions).permute(1, 0, 3, 2).reshape(layer.groups, n * positions, -1)


def _targets(layer: nn.Module, y: torch.Tensor, groups: int) -> torch.Tensor:
    """The teacher's outputs as right-hand sides: groups × rows × (outputs per group)."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1]).unsqueeze(0)
    n, c = y.shape[:2]
    return y.reshape(n, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)


def _capture(model: nn.Module, backbone: nn.Module, name: str, x: torch.Tensor, side: str) -> torch.Tensor:
    """The input (``side='in'``) or output of layer ``name`` on ``x``, running the backbone only that far."""
    seen: list[torch.Tensor] = []

    def hook(_m, inputs, output) -> None:
        seen.append(inputs[0] if side == "in" else output)
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        backbone(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def _weights(layer: nn.Module) -> torch.Tensor:
    """The layer's weights as groups × (inputs per group) × (outputs per group)."""
    w = layer.weight.detach().double()
    groups = getattr(layer, "groups", 1)
    return w.reshape(groups, w.shape[0] // groups, -1).transpose(1, 2)


@torch.no_grad()
def reconstruct(
    student: ModelAdapter, teacher: ModelAdapter, images: torch.Tensor, *, kept: dict[str, torch.Tensor], scope: Scope, damping: float,
    device: torch.device, batch: int = 16, on_progress: ProgressCallback = ignore,
) -> list[LayerFit]:
    """Refit ``student``'s scope in place (``images``: uint8 N×3×H×W synthetic images; ``kept``: the output
    channels each pruned layer kept, as indices into the teacher's, layers absent keeping all)."""
    student.model.to(device).eval()
    teacher.model.to(device).eval()
    passes = _Passes(student.model, student.split(scope).backbone, teacher.model, teacher.split(scope).backbone,
                     [student.input_spec.normalize(images[i : i + batch].float().div(255)).to(device) for i in range(0, len(images), batch)])
    layers = fitted_layers(student, scope, passes.inputs[0][:1])
    fits = []
    for index, (name, bn_name) in enumerate(layers):
        layer = student.model.get_submodule(name)
        if not (isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros"):
            fits.append(_refit(layer, name, bn_name, student.model, passes, kept.get(name), damping))
        on_progress(ProgressEvent("reconstruct", index + 1, len(layers), {"layer": name}))
    student.weights_changed()
    return fits


def refit_pruned(student: ModelAdapter, original: ModelAdapter, scope: Scope, chosen: dict[str, torch.Tensor], images: torch.Tensor,
                 settings: ReconstructSettings, *, device: torch.device, on_progress: ProgressCallback = ignore) -> list[LayerFit]:
    """:func:`reconstruct` a model that pruning cut from ``original`` to the ``chosen`` channels (:func:`~dfbf_cli.engine.pruning.choose`)."""
    from dfbf_cli.engine.pruning import kept_outputs

    return reconstruct(student, original, images, kept=kept_outputs(original, scope, chosen), scope=scope, damping=settings.damping,
                       device=device, on_progress=on_progress)


@dataclass(frozen=True)
class _Passes:
    """Student and teacher, their scopes, and the batches of model inputs they are run on."""

    student: nn.Module
    student_scope: nn.Module
    teacher: nn.Module
    teacher_scope: nn.Module
    inputs: list[torch.Tensor]


def _refit(layer: nn.Module, name: str, bn_name: str | None, model: nn.Module, passes: _Passes, kept: torch.Tensor | None,
           damping: float) -> LayerFit:
    """Solve the layer's ridge problem from streamed statistics and keep the answer if it lowers the error."""
    bias = layer.bias is not None or bn_name is not None
    gram = rhs = None
    energy, values = 0.0, 0
    for x in passes.inputs:
        rows = _rows(layer, _capture(passes.student, passes.student_scope, name, x, "in").float())
        target = _capture(passes.teacher, passes.teacher_scope, name, x, "out").float()
        if kept is not None:
            target = target.index_select(1 if isinstance(layer, nn.Conv2d) else -1, kept.to(target.device))
        target = _targets(layer, target, getattr(layer, "groups", 1))
        if bias:
            rows = torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1)
        update = (rows.transpose(1, 2) @ rows).double(), (rows.transpose(1, 2) @ target).double()
        gram, rhs = update if gram is None else (gram + update[0], rhs + update[1])
        energy += float(target.double().square().sum())
        values += target.numel()
    current = _weights(layer)
    if bias:
        current = torch.cat([current, _bias(layer).view(current.shape[0], 1, -1)], dim=1)
    ridge = damping * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    solved = torch.linalg.solve(gram + ridge.view(-1, 1, 1) * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device), rhs)
    before, after = (_error(w, gram, rhs, energy) for w in (current, solved))
    if after < before:
        _assign(layer, solved, bias, model.get_submodule(bn_name) if bn_name and layer.bias is None else None)
    return LayerFit(name, before / values, min(before, after) / values, after < before)


def _bias(layer: nn.Module) -> torch.Tensor:
    """The bias the layer applies now: its own, or (when a BatchNorm carries it) zero."""
    if layer.bias is not None:
        return layer.bias.detach().double()
    return torch.zeros(layer.weight.shape[0], dtype=torch.float64, device=layer.weight.device)


def _error(weights: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor, energy: float) -> float:
    """Σ‖rows·W − targets‖², from the Gram statistics: tr(WᵀGW) − 2·tr(WᵀR) + ‖targets‖²."""
    return float((weights * (gram @ weights)).sum() - 2 * (weights * rhs).sum()) + energy


def _assign(layer: nn.Module, solved: torch.Tensor, bias: bool, bn: nn.BatchNorm2d | None) -> None:
    """Write the fitted weights (and bias) back into the layer, in its own shape and dtype."""
    weights = solved[:, :-1] if bias else solved
    shape = layer.weight.shape
    layer.weight.copy_(weights.transpose(1, 2).reshape(shape[0], *shape[1:]).to(layer.weight.dtype))
    if not bias:
        return
    fitted = solved[:, -1].reshape(-1)
    if layer.bias is not None:
        layer.bias.copy_(fitted.to(layer.bias.dtype))
    else:  # BatchNorm(y + b) with running mean m is BatchNorm(y) with running mean m − b
        bn.running_mean.sub_(fitted.to(bn.running_mean.dtype))

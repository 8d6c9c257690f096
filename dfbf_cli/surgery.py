"""Structural edits of a module tree that keep stock module classes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _resized(module: nn.Module, weight_shape: torch.Size) -> nn.Module | None:
    """A fresh module like ``module`` whose weight has ``weight_shape``, or None if it already fits."""
    if tuple(module.weight.shape) == tuple(weight_shape) or module.weight.shape[2:] != weight_shape[2:]:
        return None  # fits already, or differs in more than channels (not ours to fix)
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        out_channels = weight_shape[0]
        groups = out_channels if depthwise else module.groups
        return nn.Conv2d(
            weight_shape[1] * groups, out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, groups, module.bias is not None, module.padding_mode,
        )
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(weight_shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
    if isinstance(module, nn.Linear):
        return nn.Linear(weight_shape[1], weight_shape[0], module.bias is not None)
    raise ValueError(f"cannot resize {type(module).__name__}")


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Replace every Conv2d / BatchNorm2d / Linear whose weight shape differs from ``state_dict``.

    This is how a structurally pruned model is rebuilt from its stock architecture plus its
    weights: the shapes in the state_dict are the whole description of what was pruned.
    """
    for name, module in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and key in state_dict:
            replacement = _resized(module, state_dict[key].shape)
            if replacement is not None:
                replace_module(model, name, replacement)
    return model


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` where ``model.get_submodule(name)`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, replacement)

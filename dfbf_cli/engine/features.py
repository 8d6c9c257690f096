"""Feature taps and the distance between two models' features: what fine-tuning minimises, what the
sensitivity allocation and the label-free fidelity report measure."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from dfbf_cli.contract import ModelAdapter
from dfbf_cli.settings import Distance, Scope, TapWeighting

DISTANCES = {Distance.L1: F.l1_loss, Distance.MSE: F.mse_loss, Distance.SMOOTH_L1: F.smooth_l1_loss}
_WEIGHTS = {
    TapWeighting.UNIFORM: lambda n: [1.0] * n,
    TapWeighting.LINEAR: lambda n: [float(i + 1) for i in range(n)],
    TapWeighting.LAST: lambda n: [0.0] * (n - 1) + [1.0],
}


def tap_weights(scheme: TapWeighting, n: int) -> list[float]:
    """The ``n`` taps' weights under ``scheme``, summing to 1 (the loss scale does not depend on the number of taps)."""
    weights = torch.tensor(_WEIGHTS[TapWeighting(scheme)](n))
    return (weights / weights.sum()).tolist()


class FeatureTaps(contextlib.AbstractContextManager):
    """Records the outputs of named submodules during a forward pass, in tap order."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.names = names
        self.handles = [model.get_submodule(n).register_forward_hook(self._recorder(n)) for n in names]

    def _recorder(self, name: str):
        def record(_module, _inputs, output) -> None:
            self.outputs[name] = output

        return record

    def take(self) -> list[torch.Tensor]:
        taken = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return taken

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def weighted_distance(student: list[torch.Tensor], teacher: list[torch.Tensor], weights: list[float], distance: Distance) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ wᵢ·d(sᵢ, tᵢ), the per-tap distances), computed in fp32."""
    losses = torch.stack([DISTANCES[distance](s.float(), t.float()) for s, t in zip(student, teacher)])
    return (torch.tensor(weights, device=losses.device) * losses).sum(), losses


@torch.no_grad()
def feature_gap(student: ModelAdapter, teacher: ModelAdapter, images: torch.Tensor, *, scope: Scope, device: torch.device,
                batch: int = 16, weighting: TapWeighting = TapWeighting.LINEAR, distance: Distance = Distance.L1) -> float:
    """Fine-tuning's objective (eval mode, no augmentation) of ``student`` against ``teacher`` on float
    images in [0, 1]: how far the student's features are from the original's."""
    s_split, t_split = student.split(scope), teacher.split(scope)
    taps = s_split.feature_taps
    weights = tap_weights(weighting, len(taps))
    student.model.to(device).eval()
    teacher.model.to(device).eval()
    total = 0.0
    with FeatureTaps(student.model, taps) as s_taps, FeatureTaps(teacher.model, taps) as t_taps:
        for start in range(0, len(images), batch):
            x = student.input_spec.normalize(images[start : start + batch].to(device))
            s_split.backbone(x)
            t_split.backbone(x)
            total += float(weighted_distance(s_taps.take(), t_taps.take(), weights, distance)[0]) * len(x)
    return total / len(images)

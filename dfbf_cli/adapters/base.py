"""The one interface every engine stage uses to talk to a model, whatever its task.

An adapter wraps a loaded ``nn.Module`` and knows the few things that differ between model
families: how images are fed to it (:class:`InputSpec`), where its backbone ends
(:class:`BackboneSplit`), how it is saved in the format it came in, and how it is scored on
labelled data. The engine (synthesis, pruning, fine-tuning, evaluation) asks only these questions.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from dfbf_cli.engine.data import EvalData, ImageFolder
    from dfbf_cli.engine.pruning import ChannelGroup


@dataclass(frozen=True)
class InputSpec:
    """How a batch of RGB images in [0, 1] becomes the model's input: ``(x - mean) / std``."""

    imgsz: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: int = 3

    def moments(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as 1×C×1×1 tensors on ``like``'s device and dtype."""
        as_tensor = lambda v: torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)  # noqa: E731
        return as_tensor(self.mean), as_tensor(self.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] (N×3×H×W) to model inputs."""
        mean, std = self.moments(images)
        return (images - mean) / std

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map model inputs back to images in [0, 1] (unclamped)."""
        mean, std = self.moments(inputs)
        return inputs * std + mean

    def to_dict(self) -> dict:
        return {"imgsz": self.imgsz, "mean": list(self.mean), "std": list(self.std), "channels": self.channels}


IMAGENET = InputSpec(imgsz=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # torchvision's normalisation


@dataclass
class BackboneSplit:
    """A model cut in two, sharing the original parameters (no copies).

    ``backbone`` maps model inputs to the tuple of tensors the head reads; ``head`` maps that tuple
    to the model's output, so ``head(backbone(x)) == model(x)``. ``feature_taps`` names (as in
    ``model.named_modules()``) the backbone blocks whose outputs fine-tuning supervises: block
    outputs that pruning keeps at their original shape, the backbone's final outputs included.
    ``head_modules`` names the modules whose weights pruning must leave bit-identical.
    """

    backbone: nn.Module
    head: nn.Module
    feature_taps: list[str]
    head_modules: list[str] = field(default_factory=list)


class ModelAdapter(ABC):
    """A loaded model plus what dfbf needs to know about its family."""

    family: ClassVar[str]
    save_suffixes: ClassVar[tuple[str, ...]]  # file formats :meth:`save` writes

    def __init__(self, model: nn.Module, *, task: str, name: str, input_spec: InputSpec, source: Path | None):
        self.model = model
        self.task = task
        self.name = name
        self.input_spec = input_spec
        self.source = source

    def with_model(self, model: nn.Module) -> ModelAdapter:
        """The same adapter around another module (a pruned or fine-tuned copy)."""
        clone = copy.copy(self)
        clone.model = model
        clone.source = None
        return clone

    @abstractmethod
    def reload(self, path: Path) -> ModelAdapter:
        """Load a file that :meth:`save` wrote for this kind of model (pruned shapes included)."""

    @abstractmethod
    def split(self) -> BackboneSplit:
        """Cut the model into backbone and head."""

    @abstractmethod
    def channel_groups(self) -> list[ChannelGroup]:
        """The backbone's prunable channel groups: every tensor the head reads keeps its shape."""

    @abstractmethod
    def save(self, path: Path) -> Path:
        """Write the model in the format it came in; return the path written."""

    @property
    @abstractmethod
    def default_suffix(self) -> str:
        """The file suffix :meth:`save` writes by default (``.pt``, ``.safetensors``...)."""

    def output_path(self, out: Path | None, tag: str) -> Path:
        """Where to save a derived model: ``out`` if given (checked), else ``<name>-<tag><suffix>`` here."""
        from dfbf_cli.errors import DfbfError

        stem = Path(self.name.split(":")[-1]).stem
        path = Path(out) if out is not None else Path(f"{stem}-{tag}{self.default_suffix}")
        if path.suffix not in self.save_suffixes:
            raise DfbfError(f"{self.name} is saved as {' or '.join(self.save_suffixes)}; '{path}' has another suffix.")
        if self.source is not None and path.resolve() == self.source.resolve():
            raise DfbfError(f"--out {path} is the input model itself; choose another file so the original stays intact.")
        return path

    @abstractmethod
    def evaluate(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """The task metric on labelled data (accuracy, mAP...), keyed by metric name."""

    @abstractmethod
    def agreement(
        self, teacher: ModelAdapter, images: ImageFolder, *, imgsz: int, batch: int, device: torch.device
    ) -> dict[str, float]:
        """How closely this model follows ``teacher`` on unlabelled images."""

    @abstractmethod
    def robustness(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """The task metric under perturbed inputs (FGSM, Gaussian noise), keyed by metric and perturbation."""

    def synthesis_classes(self) -> int | None:
        """Number of classes for class-conditional synthesis, or None where the task has no such target."""
        return None

    def fingerprint(self) -> str:
        """sha256 of the weights (names, shapes and values): identifies the teacher of a dataset."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        return f"{self.name} ({self.family} {self.task})"

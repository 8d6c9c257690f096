"""The adapter contract: the one interface every engine stage uses to talk to a model, whatever its task.

Both the engine and the adapters import this module, and it imports neither, so dependencies point
one way: ``cli → engine → contract ← adapters``. An adapter wraps a loaded ``nn.Module`` and knows
the few things that differ between model families: how images are fed to it (:class:`InputSpec`),
where the part that pruning may touch ends (:class:`BackboneSplit`), which channels can be removed
together (:class:`ChannelGroup`), how it is saved in the format it came in, how it reads and scores
labelled data (:class:`Metric`). Nothing in the engine asks which task a model serves.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from dfbf_cli.errors import DfbfError
from dfbf_cli.images import read_image, square_batch
from dfbf_cli.settings import ExportFormat, Int8Recipe, Scope

# -- how images enter a model ------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """How a batch of RGB images in [0, 1] becomes the model's input: ``(x - mean) / std``.

    ``stride``: input sizes must be a multiple of it (the deepest downsampling factor)."""

    imgsz: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stride: int = 1

    def moments(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as 1×C×1×1 tensors on ``like``'s device and dtype."""
        def as_tensor(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

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
        return {"imgsz": self.imgsz, "mean": list(self.mean), "std": list(self.std)}


IMAGENET = InputSpec(imgsz=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # torchvision's normalisation


# -- where a model is cut, and which channels go together --------------------------------------------


@dataclass
class BackboneSplit:
    """A model cut in two, sharing the original parameters (no copies): ``backbone`` is the part a scope may
    prune (DFBF's backbone, or the whole trunk before the task module), ``head`` the untouched rest.

    ``backbone`` maps model inputs to the tuple of tensors the head reads; ``head`` maps that tuple
    to the model's output, so ``head(backbone(x)) == model(x)``. ``feature_taps`` names (as in
    ``model.named_modules()``) the blocks whose outputs fine-tuning supervises: outputs that pruning
    keeps at their original shape, the backbone's final outputs included. ``head_modules`` names the
    modules whose weights pruning must leave bit-identical.
    """

    backbone: nn.Module
    head: nn.Module
    feature_taps: list[str]
    head_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChannelSlice:
    """A module's output (producer) or input (consumer) channels, starting at ``offset``."""

    module: str
    offset: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels pruned together (Torch-Pruning's dependency group). Producers: Conv2d filters (depthwise
    convs pass channels through) and BatchNorm2d features; consumers: the input channels of the Conv2d /
    Linear layers that read them, at an offset where the tensor is part of a concatenation."""

    name: str
    stage: str
    size: int
    producers: tuple[ChannelSlice, ...]
    consumers: tuple[ChannelSlice, ...]


def channel_group(name: str, stage: str, size: int, producers: list[str | ChannelSlice], consumers: list[str | ChannelSlice]) -> ChannelGroup:
    """Shorthand: plain module names mean offset 0."""
    def as_slices(items: list[str | ChannelSlice]) -> tuple[ChannelSlice, ...]:
        return tuple(s if isinstance(s, ChannelSlice) else ChannelSlice(s) for s in items)

    return ChannelGroup(name, stage, size, as_slices(producers), as_slices(consumers))


# -- how a model is scored ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """The number a quality gate watches for a task: its key in the metrics dict and how to show it."""

    name: str
    higher_is_better: bool = True
    percent: bool = False  # top-1 in percent, shown with 2 decimals; mAP in 0-1, shown with 4

    def format(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" if self.percent else f"{value:.4f}"

    def agreement(self) -> Metric:
        """The same metric measured against a teacher's predictions instead of labels."""
        return Metric(f"agreement_{self.name}", self.higher_is_better, self.percent)


# -- the data an adapter accepts ----------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImages:
    """Labelled classification images held in memory as uint8 N×H×W×3 (``arrays``), or as files."""

    source: Path
    labels: np.ndarray
    arrays: np.ndarray | None = None
    files: tuple[Path, ...] = ()
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names) or int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, imgsz: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Float images in [0, 1] (N×3×imgsz×imgsz) with their integer labels."""
        for start in range(0, len(self), batch):
            stop = min(start + batch, len(self))
            if self.arrays is not None:
                images = list(torch.from_numpy(self.arrays[start:stop]).permute(0, 3, 1, 2))
            else:
                images = [read_image(p) for p in self.files[start:stop]]
            yield square_batch(images, imgsz), torch.from_numpy(self.labels[start:stop].astype(np.int64))


@dataclass(frozen=True)
class ImageFolder:
    """Unlabelled images (real photos): used to measure agreement with a teacher."""

    source: Path
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, imgsz: int, batch: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.files), batch):
            yield square_batch([read_image(p) for p in self.files[start : start + batch]], imgsz)


@dataclass(frozen=True)
class DatasetFile:
    """A labelled dataset in a model family's own format (an Ultralytics dataset YAML, say): only its
    family's adapter reads it."""

    source: Path


EvalData = LabelledImages | ImageFolder | DatasetFile


@dataclass(frozen=True)
class Artefact:
    """An export as written: its folder or file, and the operations an INT8 export kept in floating point."""

    path: Path
    kept_fp: tuple[str, ...] = ()


# -- the adapter ------------------------------------------------------------------------------------


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
        self.origin: str | None = None  # fingerprint of the model this one was derived from, as its file records
        self._original: ModelAdapter | None = None  # that model, when derived in this process
        self._fingerprint: str | None = None

    def with_model(self, model: nn.Module) -> ModelAdapter:
        """The same adapter around another module (a pruned or fine-tuned copy)."""
        clone = copy.copy(self)
        clone.model = model
        clone.source = None
        clone._original = self._original or (None if self.origin else self)
        clone._fingerprint = None
        return clone

    def weights_changed(self) -> None:
        """Forget the cached fingerprint: the weights were trained in place."""
        self._fingerprint = None

    def check_same_kind(self, teacher: ModelAdapter) -> None:
        """A teacher must be of the same family and task as the model it teaches or judges."""
        if (self.family, self.task) != (teacher.family, teacher.task):
            raise DfbfError(f"Teacher {teacher.describe()} does not match {self.describe()}: they must be the same family and task.")

    def lineage(self) -> str | None:
        """The fingerprint of the original this model was pruned from (None for an original): saved with it,
        so that the original's synthetic images are recognised as this model's own."""
        return self._original.fingerprint() if self._original is not None else self.origin

    @property
    def free_input_size(self) -> bool:
        """Whether the model runs at any multiple of its stride, so that a smaller input is a free alternative to compression."""
        return False

    @property
    @abstractmethod
    def default_suffix(self) -> str:
        """The file suffix :meth:`save` writes by default (``.pt``, ``.safetensors``...)."""

    @abstractmethod
    def reload(self, path: Path) -> ModelAdapter:
        """Load a file that :meth:`save` wrote for this kind of model (pruned shapes included)."""

    @abstractmethod
    def save(self, path: Path) -> Path:
        """Write the model in the format it came in, atomically; return the path written."""

    @abstractmethod
    def split(self, scope: Scope = Scope.BACKBONE) -> BackboneSplit:
        """Cut the model into the part ``scope`` may prune and the untouched rest."""

    @abstractmethod
    def channel_groups(self, scope: Scope = Scope.BACKBONE) -> list[ChannelGroup]:
        """The prunable channel groups inside ``scope``: every tensor the untouched part reads keeps its shape."""

    @abstractmethod
    def primary_metric(self) -> Metric:
        """The task metric a quality gate watches (pose mAP, box mAP, top-1...)."""

    @abstractmethod
    def check_data(self, data: EvalData) -> None:
        """Refuse (with one sentence) data this model cannot be scored on: before any work starts."""

    @abstractmethod
    def evaluate(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """The task metrics on labelled data, keyed by name, the primary metric among them."""

    @abstractmethod
    def agreement(self, teacher: ModelAdapter, images: ImageFolder, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """How closely this model follows ``teacher`` (same family and task) on unlabelled images."""

    @abstractmethod
    def robustness(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """The task metrics under perturbed inputs, keyed by metric and perturbation."""

    def export(self, folder: Path, fmt: ExportFormat, *, imgsz: int, calibration: torch.Tensor | None,
               recipe: Int8Recipe = Int8Recipe.MIXED) -> Artefact:
        """Write the model in ``fmt`` into ``folder`` (INT8 by ``recipe`` when ``calibration`` images, uint8
        N×3×H×W, are given); return what was written."""
        raise DfbfError(f"{self.describe()} cannot be exported.")

    def check_export_path(self, path: Path, fmt: ExportFormat) -> None:
        """Refuse (one sentence) an export path under which the runtime that will read it would not recognise the format."""
        if fmt == ExportFormat.ONNX and path.suffix != ".onnx":
            raise DfbfError(f"--out {path}: an ONNX export is a file whose name ends in .onnx (runtimes recognise it by that).")

    def load_export(self, path: Path) -> ModelAdapter:
        """Read back what :meth:`export` wrote (to score it)."""
        raise DfbfError(f"{self.describe()} has no exported form.")

    def static_cost(self) -> tuple[int | None, int | None, float | None] | None:
        """(parameters, backbone parameters, GFLOPs) where they cannot be counted from ``self.model`` (an
        exported artefact records its source's, or None where unknown); None: count them."""
        return None

    def synthesis_classes(self) -> int | None:
        """Number of classes for class-conditional synthesis, or None where the task has no such target."""
        return None

    def fingerprint(self) -> str:
        """sha256 of the weights (names, shapes and values): identifies the teacher of a dataset (computed once)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def describe(self) -> str:
        return f"{self.name} ({self.family} {self.task})"

    def output_path(self, out: Path | None, tag: str) -> Path:
        """Where to save a derived model: ``out`` if given (in a format :meth:`save` writes), else ``<stem>-<tag><suffix>`` here."""
        path = Path(out) if out is not None else Path(f"{self.stem}-{tag}{self.default_suffix}")
        if path.is_dir():
            raise DfbfError(f"--out {path} is an existing directory; give a file name.")
        if path.suffix not in self.save_suffixes:
            raise DfbfError(f"{self.name} is saved as {' or '.join(self.save_suffixes)}; '{path}' has another suffix.")
        return path

    @property
    def stem(self) -> str:
        """A file-name stem for derived outputs: the model file's (``yolo11n-pose``, ``r56-p50``), else the name's (``resnet18``)."""
        return self.source.stem if self.source is not None else Path(self.name.split(":")[-1]).stem


class Exported:
    """Mixin for an adapter around an exported artefact (an inference runtime's model): it is scored and
    timed, never pruned, trained or exported again; its costs are its source's, as its record says."""

    record: dict | None
    name: str
    source: Path

    def _refuse(self, *_args, **_kwargs):
        raise DfbfError(f"{self.name} is an exported model: it can be evaluated, not pruned, fine-tuned or exported again.")

    split = channel_groups = save = export = reload = _refuse

    def fingerprint(self) -> str:
        return f"exported:{self.source}"

    def static_cost(self) -> tuple[int | None, int | None, float | None]:
        source = (self.record or {}).get("source", {})
        return source.get("params"), source.get("backbone_params"), source.get("gflops")

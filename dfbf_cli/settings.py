"""Every choice and default of dfbf in one torch-free module: the CLI builds its options from it
(Typer lists the Enums in ``--help`` and refuses other values), the engine validates against it.

Importing this module must stay cheap: ``dfbf --help`` reads it and nothing heavier.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum

from dfbf_cli.errors import DfbfError


class Choice(str, Enum):
    """A named option value; compares equal to (and serialises as) its string."""

    def __str__(self) -> str:
        return self.value


class Precision(Choice):
    AUTO = "auto"  # bf16 where the hardware computes it natively, else fp32
    BF16 = "bf16"
    FP32 = "fp32"


class PresetName(Choice):
    QUICK = "quick"
    BALANCED = "balanced"
    PAPER = "paper"


class Scope(Choice):
    """What pruning may touch. DFBF's rule is the backbone; every layer before the task module (the neck
    too, for YOLO) is as task-independent, so the trunk can be pruned with the task module untouched."""

    BACKBONE = "backbone"
    TRUNK = "trunk"


class Criterion(Choice):
    L1 = "l1"  # filter L1 norm
    BN = "bn"  # BatchNorm |gamma|
    ENERGY = "energy"  # the signal a channel sends its consumers on synthetic images (docs/reconstruct.md)


class Schedule(Choice):
    UNIFORM = "uniform"
    LAYER_DEPENDENT = "layer-dependent"  # DFBF's reference rule: prune wide layers more


class Allocation(Choice):
    """How a GFLOPs target is shared among channel groups."""

    UNIFORM = "uniform"  # one ratio for every group, solved to meet the target
    SENSITIVITY = "sensitivity"  # cheapest groups first, by their measured effect on synthetic images


class Strategy(Choice):
    ONESHOT = "oneshot"
    PROGRESSIVE = "progressive"  # Paoding-style: small steps, channels merged, scored on synthetic images


class Optimizer(Choice):
    ADAM = "adam"
    SGD = "sgd"  # the reference's (momentum 0.9)


class Distance(Choice):
    L1 = "l1"
    MSE = "mse"
    SMOOTH_L1 = "smoothl1"


class TapWeighting(Choice):
    LINEAR = "linear"  # rising with depth, as the reference does
    UNIFORM = "uniform"
    LAST = "last"  # only the final output


class ExportFormat(Choice):
    OPENVINO = "openvino"
    ONNX = "onnx"


EXPORT_PACKAGES = {ExportFormat.OPENVINO: ("openvino", "nncf"), ExportFormat.ONNX: ("onnx", "onnxruntime", "onnxslim")}
EXPORT_EXTRA = 'pip install "dfbf[export]"'
CALIBRATION_IMAGES = 300  # at most; Ultralytics advises 300-1,000 representative images
CALIBRATION_SET_IMAGES = 32  # what `dfbf export --int8` synthesises itself, at the export's size, when no --synthetic is given
CALIBRATION_SET_BATCH = 16
HELD_OUT_SHARE = 0.25  # of the calibration images, kept aside to score INT8 recipes by agreement with FP32
MIN_HELD_OUT = 2  # fewer held-out images than this: no comparison, the first recipe is used


class Int8Recipe(Choice):
    """How NNCF quantises an OpenVINO export. AUTO quantises with each of the others and keeps the one
    whose outputs agree best with the FP32 model on held-out synthetic images."""

    AUTO = "auto"
    MIXED = "mixed"  # NNCF's mixed preset, fast bias correction: Ultralytics' own INT8
    OUTPUTS_FP = "outputs-fp"  # the same, with the layers that write the model's outputs kept in FP
    BIAS_CORRECTION = "bias-correction"  # full bias correction instead of the fast one


INT8_CANDIDATES = (Int8Recipe.MIXED, Int8Recipe.OUTPUTS_FP, Int8Recipe.BIAS_CORRECTION)


class BatchNormMode(Choice):
    TRAIN = "train"  # batch statistics on synthetic images, running statistics updated
    FROZEN = "frozen"  # the original's statistics


def _positive(name: str, value: float, *, zero_allowed: bool = False) -> None:
    if not ((value >= 0 if zero_allowed else value > 0) and math.isfinite(value)):
        raise DfbfError(f"{name} must be {'at least' if zero_allowed else 'above'} 0, got {value}.")


@dataclass(frozen=True)
class SynthesisSettings:
    """Everything that decides which images come out (recorded in the dataset's manifest)."""

    low_res_iterations: int = 200
    iterations: int = 200
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    bn_weight: float = 0.01
    first_bn_multiplier: float = 10.0
    tv_l2: float = 1e-4
    l2: float = 1e-5
    jitter: int = 30  # pixels at 224 px, scaled with the image size
    flip: bool = True
    class_weight: float = 1.0  # cross-entropy towards target labels (classifiers only; 0 disables)

    def validate(self) -> None:
        if self.iterations < 1 or self.low_res_iterations < 0:
            raise DfbfError("--iterations must be at least 1 and --low-res-iterations at least 0.")

    def to_dict(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}


MAX_GROUP_RATIO = 0.95  # no group loses more than this share of its channels


def reference_layer_factor(width: int) -> float:
    """DFBF's reference rule for ``layer-dependent``: prune wide layers more (×1.3 from 500 channels,
    ×1 above 200, ×0.4 below)."""
    return 1.3 if width >= 500 else 1.0 if width > 200 else 0.4


def require_fraction(name: str, value: float) -> None:
    """0 < value < 1 (NaN refused)."""
    if not 0.0 < value < 1.0:
        raise DfbfError(f"{name} must be between 0 and 1 (exclusive), got {value}.")


@dataclass(frozen=True)
class PruneSettings:
    """What to remove. Give ``ratio`` (the same fraction of every group's channels) or ``flops`` (the
    GFLOPs to keep, as a fraction of the original's), not both."""

    ratio: float | None = None
    flops: float | None = None
    scope: Scope = Scope.BACKBONE
    allocation: Allocation = Allocation.UNIFORM
    criterion: Criterion = Criterion.L1
    schedule: Schedule = Schedule.UNIFORM
    min_channels: int = 8
    round_to: int = 1

    def keep_count(self, size: int, ratio: float | None = None) -> int:
        """Channels a group of ``size`` keeps when ``ratio`` of them go (default: the target's ``ratio``; a GFLOPs
        target passes the ratio it solved for): rounded, never below the floor."""
        ratio = (self.ratio if ratio is None else ratio) * (reference_layer_factor(size) if self.schedule == Schedule.LAYER_DEPENDENT else 1.0)
        keep = size - math.floor(size * min(ratio, MAX_GROUP_RATIO))
        if keep < size and self.round_to > 1:
            keep = max(self.round_to, round(keep / self.round_to) * self.round_to)
        return min(size, max(keep, self.min_channels))

    def __post_init__(self) -> None:  # a target is checked where it is made, once: every holder of one may trust it
        self.validate()

    def validate(self) -> None:
        if (self.ratio is None) == (self.flops is None):
            raise DfbfError("Give --ratio (fraction of channels removed) or --flops (fraction of GFLOPs kept), one of them.")
        if self.ratio is not None:
            if not 0.0 <= self.ratio < 1.0:  # the engine accepts 0 (no change); the CLI asks for more
                raise DfbfError(f"--ratio must be between 0 and 1 (exclusive), got {self.ratio}.")
            if self.allocation != Allocation.UNIFORM:
                raise DfbfError("--allocation applies to a --flops target; --ratio prunes every group alike.")
        else:
            require_fraction("--flops", self.flops)
            if self.schedule != Schedule.UNIFORM:
                raise DfbfError("--schedule applies to --ratio; a --flops target is shared by --allocation.")
        if self.min_channels < 1 or self.round_to < 1:
            raise DfbfError("--min-channels and --round-to must be at least 1.")


@dataclass(frozen=True)
class ProgressiveSettings:
    steps: int = 8
    alpha: float = 0.5  # weight of the clean-output impact against the noisy-output impact
    epsilon: float = 0.03  # Gaussian noise σ in [0, 1] pixel units
    probe_images: int = 8

    def validate(self) -> None:
        if self.steps < 1 or not 0.0 <= self.alpha <= 1.0 or self.probe_images < 2:
            raise DfbfError("--steps must be ≥ 1, alpha within [0, 1], and at least 2 probe images.")


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 20
    batch: int = 32
    lr: float = 1e-3
    optimizer: Optimizer = Optimizer.ADAM  # measured better than the reference's SGD (docs/finetune.md)
    weight_decay: float = 0.0  # the reference's 5e-4 cost points with Adam (docs/finetune.md)
    loss: Distance = Distance.L1
    tap_weights: TapWeighting = TapWeighting.LINEAR
    bn: BatchNormMode = BatchNormMode.TRAIN
    cutmix: bool = True  # +1.3 top-1 on CIFAR (docs/finetune.md)
    precision: Precision = Precision.AUTO
    renew: int = 0  # synthetic images renewed each epoch by a few warm-started inversion steps (0: a fixed set)
    renew_steps: int = 20
    adversarial: float = 0.0  # weight of the student-teacher feature distance that renewed images maximise

    def validate(self) -> None:
        if self.epochs < 1 or self.batch < 2:
            raise DfbfError("--epochs must be at least 1 and --batch at least 2.")
        _positive("--lr", self.lr)
        _positive("--weight-decay", self.weight_decay, zero_allowed=True)
        _positive("--adversarial", self.adversarial, zero_allowed=True)
        if self.renew < 0 or self.renew_steps < 1:
            raise DfbfError("--renew must be at least 0 and --renew-steps at least 1.")

    def to_dict(self) -> dict:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Choice) else v) for f in fields(self)}


@dataclass(frozen=True)
class ReconstructSettings:
    """Closed-form reconstruction after pruning (docs/reconstruct.md): each pruned-scope layer refit by ridge
    least squares to the original's outputs on synthetic images."""

    images: int = 128  # at most, from the synthetic set (the balanced preset's whole YOLO set)
    damping: float = 1e-3  # ridge, relative to the mean diagonal of each layer's Gram matrix

    def validate(self) -> None:
        if self.images < 1:
            raise DfbfError(f"Reconstruction needs at least 1 image, got {self.images}.")
        _positive("--damping", self.damping)

    def to_dict(self) -> dict:
        return asdict(self)


SMALL_INPUT = 64  # px: at most this is a "small" input (presets give it more images and fewer steps)


@dataclass(frozen=True)
class Preset:
    """A named budget. Small inputs (CIFAR's 32 px) are cheap to synthesise, so they get many more images
    than large ones; the split is by input size alone, never by task. Fine-tuning is budgeted in optimiser
    steps, not epochs (docs/finetune.md, "How long")."""

    images_small: int
    images_large: int
    max_imgsz: int | None  # synthesis and fine-tuning size cap for large inputs (None: the model's own)
    synthesis: SynthesisSettings
    finetune_steps_small: int
    finetune_steps_large: int

    def epochs(self, num_images: int, batch: int, imgsz: int) -> int:
        """Epochs that give this input size's optimiser steps over ``num_images`` images (full batches)."""
        steps = self.finetune_steps_small if imgsz <= SMALL_INPUT else self.finetune_steps_large
        return math.ceil(steps / max(1, num_images // batch))

    def num_images(self, imgsz: int) -> int:
        return self.images_small if imgsz <= SMALL_INPUT else self.images_large

    def imgsz(self, model_imgsz: int) -> int:
        return min(model_imgsz, self.max_imgsz or model_imgsz)


CALIBRATION_SYNTHESIS = SynthesisSettings(low_res_iterations=60, iterations=15)  # measured in docs/export.md: ≤ 10 min with the export

PRESETS = {
    PresetName.QUICK: Preset(256, 16, 256, SynthesisSettings(low_res_iterations=50, iterations=50), 40, 40),
    PresetName.BALANCED: Preset(1024, 128, 320, SynthesisSettings(low_res_iterations=100, iterations=100), 960, 3200),
    PresetName.PAPER: Preset(4096, 512, None, SynthesisSettings(low_res_iterations=2000, iterations=1000), 12800, 12800),
}
DEFAULT_PRESET = PresetName.BALANCED
DEFAULT_SCOPE = Scope.BACKBONE
SYNTHESIS_BATCH = 32  # images optimised together: one shard each
EVAL_BATCH = 16
MAX_SEED = 2**63 - 1

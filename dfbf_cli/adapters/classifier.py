"""Image classifiers: torchvision models (``torchvision:resnet18``) and CIFAR ResNets (``cifar-resnet56``).

Both are plain ``nn.Module`` classifiers saved as state_dicts, so one adapter serves them; what
differs per architecture is only where the backbone ends (:data:`LAYOUTS`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dfbf_cli.adapters.cifar_resnet import DEPTHS, CifarResNet
from dfbf_cli.adapters.scoring import TOP1, Scorer, check_classes, classification_accuracy, classification_robustness, require_labelled, top1_agreement
from dfbf_cli.contract import (
    IMAGENET,
    Artefact,
    BackboneSplit,
    ChannelGroup,
    EvalData,
    Exported,
    ImageFolder,
    InputSpec,
    Metric,
    ModelAdapter,
    channel_group,
)
from dfbf_cli.errors import DfbfError
from dfbf_cli.files import atomic_path
from dfbf_cli.settings import ExportFormat, Int8Recipe, Scope
from dfbf_cli.surgery import resize_to_state_dict

log = logging.getLogger("dfbf")

ARCH_METADATA_KEY = "dfbf.arch"  # written into .safetensors so a saved model is self-describing
ORIGIN_METADATA_KEY = "dfbf.original"  # the fingerprint of the model this one was pruned from
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".th")


@dataclass(frozen=True)
class Layout:
    """Where an architecture's backbone ends: its children in order, then the head's pieces."""

    backbone: tuple[str, ...]
    head: tuple[str, ...]  # child names; "flatten" stands for torch.flatten(x, 1)
    taps: str  # "blocks": every residual block output; "last": only the backbone output


LAYOUTS = {
    "resnet": Layout(("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
                     ("avgpool", "flatten", "fc"), "blocks"),
    "cifar-resnet": Layout(("conv1", "bn1", "relu", "layer1", "layer2", "layer3"),
                           ("avgpool", "flatten", "linear"), "blocks"),
    "vgg": Layout(("features",), ("avgpool", "flatten", "classifier"), "last"),
    "mobilenet_v2": Layout(("features",), ("pool", "flatten", "classifier"), "blocks"),
}


def layout_of(arch: str) -> Layout | None:
    if arch.startswith("cifar-resnet"):
        return LAYOUTS["cifar-resnet"]
    for prefix in ("resnet", "vgg", "mobilenet_v2"):
        if arch.startswith(prefix) and not arch.startswith("resnext"):
            return LAYOUTS[prefix]
    return None


class Chain(nn.Module):
    """Run modules in order; the backbone returns a 1-tuple, the head accepts one."""

    def __init__(self, modules: list[nn.Module], *, returns_tuple: bool, takes_tuple: bool):
        super().__init__()
        self.steps = nn.ModuleList(modules)
        self.returns_tuple, self.takes_tuple = returns_tuple, takes_tuple

    def forward(self, x):
        x = x[0] if self.takes_tuple else x
        for step in self.steps:
            x = step(x)
        return (x,) if self.returns_tuple else x


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors or a torch pickle (plain, or under 'state_dict' / 'model')."""
    if not path.is_file():
        raise DfbfError(f"Weights file '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the user's input problem, not a dfbf bug
        raise DfbfError(f"Cannot read weights '{path}': {str(error).splitlines()[0]}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DfbfError(f"Weights '{path}' do not hold a state_dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def weights_record(path: Path) -> dict[str, str]:
    """What a weights file records beside its tensors (dfbf writes the architecture and the original)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return handle.metadata() or {}
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if isinstance(v, str)} if isinstance(state, dict) else {}
    except Exception:  # unreadable: the caller reports what to do instead
        return {}


def _build(arch: str, weights_enum: str | None) -> nn.Module:
    if arch.startswith("cifar-resnet"):
        depth = int(arch.removeprefix("cifar-resnet"))
        return CifarResNet(depth)
    import torchvision

    name = arch.removeprefix("torchvision:")
    try:
        return torchvision.models.get_model(name, weights=weights_enum)
    except (ValueError, KeyError) as error:
        raise DfbfError(f"torchvision has no weights '{weights_enum}' for {name}: {error}.") from error
    except OSError as error:  # URLError and friends: no network, no cached file
        raise DfbfError(
            f"Could not download torchvision weights {name}/{weights_enum} ({error}); "
            "download them where you are online, or pass a local file with --weights FILE."
        ) from error


def _weights_enum(name: str, weights: str) -> str:
    """A torchvision weights name this model knows (DEFAULT, IMAGENET1K_V1...), or a clear refusal."""
    import torchvision

    known = ["DEFAULT", *torchvision.models.get_model_weights(name).__members__]
    if weights not in known:
        raise DfbfError(f"--weights {weights} is neither a file nor a weights name of {name} (known: {', '.join(known)}).")
    return weights


def load_classifier(arch: str, weights: str | None) -> ClassifierAdapter:
    """``arch`` is ``torchvision:NAME`` or ``cifar-resnetN``; ``weights`` a file or (torchvision) a weights name."""
    name = arch.removeprefix("torchvision:")
    if arch.startswith("cifar-resnet"):
        if arch.removeprefix("cifar-resnet") not in {str(d) for d in DEPTHS}:
            raise DfbfError(f"Unknown CIFAR ResNet '{arch}'; choose one of {', '.join(f'cifar-resnet{d}' for d in DEPTHS)}.")
    else:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models) or layout_of(name) is None:
            raise DfbfError(f"Unsupported torchvision model '{name}'; supported: resnet*, vgg*, mobilenet_v2.")
    weights_file = None
    if weights is not None:
        candidate = Path(weights).expanduser()
        if candidate.exists() or candidate.suffix in WEIGHT_FILE_SUFFIXES or "/" in weights:
            weights_file = candidate
        elif arch.startswith("cifar-resnet"):
            raise DfbfError(f"--weights {weights} is not a file; {arch} takes a state_dict file (.th, .pth, .safetensors).")
        else:
            weights = _weights_enum(name, weights)
    model = _build(arch, None if weights_file else weights)
    if weights_file is not None:
        state = read_state_dict(weights_file)
        resize_to_state_dict(model, state)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise DfbfError(f"Weights '{weights_file}' do not fit {arch}: {str(error).splitlines()[-1].strip()}") from error
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise DfbfError(
                f"Weights '{weights_file}' do not fit {arch}: "
                f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})."
            )
    elif weights is None:
        log.warning("%s has no --weights: randomly initialised (useful only for structural checks).", arch)
    imgsz = 32 if arch.startswith("cifar-resnet") else 224
    suffix = weights_file.suffix if weights_file and weights_file.suffix in {".pth", ".pt", ".th"} else ".safetensors"
    adapter = ClassifierAdapter(model.eval(), task="classify", name=arch, source=weights_file, suffix=suffix, input_spec=replace(IMAGENET, imgsz=imgsz))
    if weights_file is not None:
        adapter.origin = weights_record(weights_file).get(ORIGIN_METADATA_KEY)
    return adapter


class ClassifierAdapter(ModelAdapter):
    """torchvision and CIFAR classifiers: the backbone ends at global pooling, so backbone and trunk are one."""

    family = "classifier"
    save_suffixes = WEIGHT_FILE_SUFFIXES

    def __init__(self, model: nn.Module, *, suffix: str, **kwargs):
        super().__init__(model, **kwargs)
        self.suffix = suffix

    @property
    def default_suffix(self) -> str:
        return self.suffix

    @property
    def layout(self) -> Layout:
        return layout_of(self.name.removeprefix("torchvision:"))

    def split(self, scope: Scope = Scope.BACKBONE) -> BackboneSplit:
        layout = self.layout
        backbone = [self.model.get_submodule(n) for n in layout.backbone]
        head_names = [n for n in layout.head if n not in {"flatten", "pool"}]
        head = [
            nn.Flatten(1) if n == "flatten" else nn.AdaptiveAvgPool2d(1) if n == "pool" else self.model.get_submodule(n)
            for n in layout.head
        ]
        if layout.taps == "blocks":
            stages = [n for n in layout.backbone if n.startswith(("layer", "features"))]
            taps = [f"{s}.{i}" for s in stages for i in range(len(self.model.get_submodule(s)))]
        else:
            taps = [layout.backbone[-1]]
        return BackboneSplit(
            backbone=Chain(backbone, returns_tuple=True, takes_tuple=False),
            head=Chain(head, returns_tuple=False, takes_tuple=True),
            feature_taps=taps,
            head_modules=head_names,
        )

    def reload(self, path: Path) -> ClassifierAdapter:
        return load_classifier(self.name, str(path))

    def channel_groups(self, scope: Scope = Scope.BACKBONE) -> list[ChannelGroup]:
        """Block-internal channels of residual blocks (the residual stream keeps its width); for VGG,
        every conv output but the last (which the classifier reads)."""
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.models.resnet import BasicBlock as TorchvisionBasic
        from torchvision.models.resnet import Bottleneck

        from dfbf_cli.adapters.cifar_resnet import BasicBlock as CifarBasic

        groups = []
        for name, module in self.model.named_modules():
            stage = name.split(".")[0]
            if isinstance(module, (CifarBasic, TorchvisionBasic)):
                groups.append(channel_group(f"{name}.conv1", stage, module.conv1.out_channels,
                                            [f"{name}.conv1", f"{name}.bn1"], [f"{name}.conv2"]))
            elif isinstance(module, Bottleneck):
                for a, b in (("1", "2"), ("2", "3")):
                    groups.append(channel_group(f"{name}.conv{a}", stage, getattr(module, f"conv{a}").out_channels,
                                                [f"{name}.conv{a}", f"{name}.bn{a}"], [f"{name}.conv{b}"]))
            elif isinstance(module, InvertedResidual) and len(module.conv) == 4:  # expand, depthwise, project, bn
                c = f"{name}.conv"
                groups.append(channel_group(f"{name}.expand", f"{stage}.{name.split('.')[1]}", module.conv[0][0].out_channels,
                                            [f"{c}.0.0", f"{c}.0.1", f"{c}.1.0", f"{c}.1.1"], [f"{c}.2"]))
        if self.layout is LAYOUTS["vgg"]:
            convs = [(n, m) for n, m in self.model.features.named_children() if isinstance(m, nn.Conv2d)]
            for (index, conv), (next_index, _) in zip(convs, convs[1:]):
                norm = f"features.{int(index) + 1}"
                producers = [f"features.{index}"] + ([norm] if isinstance(self.model.get_submodule(norm), nn.BatchNorm2d) else [])
                groups.append(channel_group(f"features.{index}", f"features.{index}", conv.out_channels, producers, [f"features.{next_index}"]))
        return groups

    def save(self, path: Path) -> Path:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(path) as tmp:
            record = {ARCH_METADATA_KEY: self.name} | ({ORIGIN_METADATA_KEY: self.lineage()} if self.lineage() else {})
            if path.suffix == ".safetensors":
                save_file(state, str(tmp), metadata=record)
            else:  # the layout of the common CIFAR checkpoints, which read_state_dict (and most loaders) accept
                torch.save({"state_dict": state, **record}, tmp)
        return path

    def export(self, folder: Path, fmt: ExportFormat, *, imgsz: int, calibration: torch.Tensor | None,
               recipe: Int8Recipe = Int8Recipe.MIXED) -> Artefact:
        from dfbf_cli.adapters.classifier_export import export_classifier

        return export_classifier(self, folder, fmt, imgsz=imgsz, calibration=calibration, recipe=recipe)

    def load_export(self, path: Path) -> ClassifierAdapter:
        from dfbf_cli.export_record import read_record

        return ExportedClassifier(path, read_record(path))

    def num_outputs(self) -> int:
        last_linear = [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1]
        return last_linear.out_features

    def synthesis_classes(self) -> int | None:
        return self.num_outputs()

    def primary_metric(self) -> Metric:
        return TOP1

    def check_data(self, data: EvalData) -> None:
        check_classes(require_labelled(data, self.name), self.num_outputs())

    def scorer(self, device: torch.device) -> Scorer:
        model = self.model.to(device).eval()
        return lambda images: model(self.input_spec.normalize(images.to(device)))

    def evaluate(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        return classification_accuracy(self.scorer(device), require_labelled(data, self.name), imgsz=imgsz, batch=batch, num_outputs=self.num_outputs())

    def agreement(self, teacher: ModelAdapter, images: ImageFolder, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        self.check_same_kind(teacher)  # so the teacher is a classifier too, with a scorer
        return top1_agreement(self.scorer(device), teacher.scorer(device), images, imgsz=imgsz, batch=batch)

    def robustness(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        return classification_robustness(self.scorer(device), require_labelled(data, self.name), imgsz=imgsz, batch=batch)


class RuntimeModel(nn.Module):
    """An exported classifier behind the ``nn.Module`` call the engine times and scores: normalised N×3×H×W in, logits out."""

    def __init__(self, path: Path):
        super().__init__()
        if path.is_dir():
            import openvino as ov

            compiled = ov.Core().compile_model(str(path / "model.xml"), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
            self.run = lambda x: compiled(x)[0]
        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()  # idle threads sleep: spinning ones slow whatever runs next (a PyTorch model timed beside it)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.run = lambda x: session.run(None, {"images": x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x.detach().cpu().float().numpy())))


class ExportedClassifier(Exported, ClassifierAdapter):
    """A classifier dfbf exported (its record says what it was): scored and timed in its runtime."""

    def __init__(self, path: Path, record: dict):
        spec = record["input_spec"]
        super().__init__(RuntimeModel(path), task="classify", name=path.name, source=path, suffix=path.suffix,
                         input_spec=InputSpec(record["imgsz"], tuple(spec["mean"]), tuple(spec["std"])))
        self.record, self.outputs = record, record["classes"]

    def num_outputs(self) -> int:
        return self.outputs

    def robustness(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        raise DfbfError(f"--robustness needs gradients, which the exported {self.name} does not give; evaluate the PyTorch model.")

"""Ultralytics YOLO models (v8, 11...) for detection, keypoint pose and classification.

The model graph is Ultralytics' own: a list of layers, each reading the previous output or earlier
saved outputs (``layer.f``). The backbone is the YAML's ``backbone`` section; the head (neck
included) reads a few of its outputs. Scoring goes through Ultralytics' validators, so numbers
match ``YOLO(path).val()``; saving writes a stock checkpoint that ``YOLO(path)`` loads without dfbf.
"""

from __future__ import annotations

import copy
import logging
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dfbf_cli import __version__
from dfbf_cli.adapters.base import BackboneSplit, InputSpec, ModelAdapter
from dfbf_cli.adapters.classifier import (
    NOISE_SIGMA,
    Scorer,
    classification_accuracy,
    classification_robustness,
    require_labelled,
    top1_agreement,
)
from dfbf_cli.engine.data import IMAGE_SUFFIXES, EvalData, ImageFolder, YoloDataset, read_image, temporary_folder
from dfbf_cli.engine.files import atomic_path
from dfbf_cli.engine.pruning import ChannelGroup, ChannelSlice, channel_group
from dfbf_cli.errors import DfbfError

log = logging.getLogger("dfbf")

SUPPORTED_TASKS = ("detect", "pose", "classify")
KEYPOINT_VISIBLE = 0.5  # teacher keypoint confidence above which a pseudo-label marks it visible


def _sources(layer: nn.Module) -> list[int]:
    """Absolute indices of the layers whose outputs ``layer`` reads."""
    froms = layer.f if isinstance(layer.f, list) else [layer.f]
    return [layer.i + f if f < 0 else f for f in froms]


def _run_layers(layers: nn.ModuleList, saved: dict[int, torch.Tensor]) -> torch.Tensor:
    """Ultralytics' forward loop over a slice of layers; ``saved`` maps layer index to output (-1: input)."""
    for layer in layers:
        sources = _sources(layer)
        x = layer(saved[sources[0]] if isinstance(layer.f, int) else [saved[j] for j in sources])
        saved[layer.i] = x
    return x


class YoloBackbone(nn.Module):
    def __init__(self, layers: list[nn.Module], outputs: tuple[int, ...]):
        super().__init__()
        self.layers, self.outputs = nn.ModuleList(layers), outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        saved = {-1: x}
        _run_layers(self.layers, saved)
        return tuple(saved[i] for i in self.outputs)


class YoloHead(nn.Module):
    def __init__(self, layers: list[nn.Module], inputs: tuple[int, ...]):
        super().__init__()
        self.layers, self.inputs = nn.ModuleList(layers), inputs

    def forward(self, features: tuple[torch.Tensor, ...]):
        return _run_layers(self.layers, dict(zip(self.inputs, features)))


def _plain_conv(module: nn.Module) -> bool:
    """An Ultralytics ``Conv`` (conv + BN + activation) whose channels can be cut independently."""
    from ultralytics.nn.modules import Conv

    return type(module) is Conv and module.conv.groups == 1


def _output_conv(layer: nn.Module) -> str | None:
    """Relative name of the Conv that produces a backbone layer's output ('' for a Conv layer), if cuttable."""
    from ultralytics.nn.modules import C3, SPPF, C2f

    if _plain_conv(layer):
        return ""
    for kind, name in ((C2f, "cv2"), (C3, "cv3"), (SPPF, "cv2")):
        if isinstance(layer, kind) and not getattr(layer, "add", False) and _plain_conv(getattr(layer, name)):
            return name
    return None


def _input_convs(layer: nn.Module) -> list[str]:
    """Names (relative, ending in ``.conv``) of the convs that read a backbone layer's input; [] if not cuttable."""
    from ultralytics.nn.modules import C2PSA, C3, SPPF, C2f

    if _plain_conv(layer):
        return ["conv"]
    if isinstance(layer, C3) and _plain_conv(layer.cv1) and _plain_conv(layer.cv2):
        return ["cv1.conv", "cv2.conv"]
    if isinstance(layer, (C2f, C2PSA)) or (isinstance(layer, SPPF) and not getattr(layer, "add", False)):
        return ["cv1.conv"] if _plain_conv(layer.cv1) else []
    return []


def _hidden_groups(prefix: str, layer: nn.Module) -> list[ChannelGroup]:
    """Channels that live and die inside a block: Bottleneck and PSA feed-forward hidden widths,
    C3's second branch (read by cv3 after the first branch's channels), SPPF's pooled copies."""
    from ultralytics.nn.modules.block import C3, SPPF, Bottleneck, PSABlock

    groups = []
    for rel, module in layer.named_modules():
        name = f"{prefix}.{rel}" if rel else prefix
        pair = None
        if isinstance(module, Bottleneck):
            pair = (module.cv1, f"{name}.cv1", [f"{name}.cv2.conv"], module.cv2)
        elif isinstance(module, PSABlock) and len(module.ffn) == 2:
            pair = (module.ffn[0], f"{name}.ffn.0", [f"{name}.ffn.1.conv"], module.ffn[1])
        elif isinstance(module, C3) and _plain_conv(module.cv3):
            hidden = module.cv1.conv.out_channels
            pair = (module.cv2, f"{name}.cv2", [ChannelSlice(f"{name}.cv3.conv", hidden)], module.cv3)
        elif isinstance(module, SPPF) and _plain_conv(module.cv2):
            width, copies = module.cv1.conv.out_channels, getattr(module, "n", 3) + 1
            pair = (module.cv1, f"{name}.cv1", [ChannelSlice(f"{name}.cv2.conv", k * width) for k in range(copies)], module.cv2)
        if pair and _plain_conv(pair[0]) and _plain_conv(pair[3]):
            producer, produced, consumers, _ = pair
            groups.append(channel_group(produced, prefix, producer.conv.out_channels,
                                        [f"{produced}.conv", f"{produced}.bn"], consumers))
    return groups


def _noisy_copy(data: YoloDataset, folder: Path, sigma: float, seed: int = 0) -> Path:
    """The validation split with Gaussian noise (σ in [0, 1] pixel units) added, as PNGs, labels alongside."""
    generator = np.random.default_rng(seed)
    val = data.config["val"] if isinstance(data.config["val"], str) else data.config["val"][0]
    source = Path(data.config["path"]) / val
    images, labels = folder / "images" / "val", folder / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for path in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        pixels = read_image(path).permute(1, 2, 0).numpy().astype(np.float32) / 255
        noisy = np.clip(pixels + generator.normal(0, sigma, pixels.shape), 0, 1)
        Image.fromarray((noisy * 255).round().astype(np.uint8)).save(images / f"{path.stem}.png")
        label = Path(str(path.parent).replace(f"{os.sep}images", f"{os.sep}labels", 1)) / f"{path.stem}.txt"
        if label.exists():
            (labels / label.name).write_text(label.read_text())
    return YoloDataset(folder / "noisy.yaml", {**data.config, "path": str(folder), "train": "images/val", "val": "images/val"}).resolved_yaml(folder)


def _task_of(model: nn.Module) -> str:
    from ultralytics.nn.tasks import guess_model_task

    return guess_model_task(model)


def load_yolo(spec: str) -> YoloAdapter:
    """A checkpoint path, an Ultralytics model name (downloaded when online), or a model YAML."""
    from ultralytics import YOLO

    path = Path(spec).expanduser()
    is_yaml = path.suffix in {".yaml", ".yml"}
    try:
        yolo = YOLO(str(path) if path.exists() else spec)
    except FileNotFoundError as error:
        if is_yaml:
            raise DfbfError(f"Model YAML '{spec}' does not exist (nor is it one of Ultralytics' built-in YAMLs).") from error
        raise DfbfError(
            f"Model '{spec}' is not a local file and could not be downloaded ({str(error).splitlines()[0]}); "
            f"download it where you are online, or pass the path of a local checkpoint."
        ) from error
    except Exception as error:  # a corrupt or foreign file: Ultralytics raises many types
        if not path.exists() and not is_yaml:
            raise DfbfError(
                f"Model '{spec}' is not a local file and could not be downloaded "
                f"({str(error).splitlines()[0]}); pass the path of a local checkpoint."
            ) from error
        raise DfbfError(f"Cannot load '{spec}' as an Ultralytics YOLO model: {str(error).splitlines()[0]}") from error
    model = yolo.model
    task = _task_of(model)
    if task not in SUPPORTED_TASKS:
        raise DfbfError(f"'{spec}' is a YOLO {task} model; dfbf supports {', '.join(SUPPORTED_TASKS)}.")
    if is_yaml:
        log.warning("%s is a model YAML: randomly initialised (useful only for structural checks).", spec)
    train_args = dict(getattr(model, "args", {}) or {})
    imgsz = int(train_args["imgsz"]) if train_args.get("imgsz") and not is_yaml else 224 if task == "classify" else 640
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return YoloAdapter(
        model.eval(), task=task, name=Path(spec).name, input_spec=InputSpec(imgsz),
        source=path if path.exists() and not is_yaml else None, train_args=train_args,
    )


class YoloAdapter(ModelAdapter):
    family = "yolo"
    default_suffix = ".pt"
    save_suffixes = (".pt",)

    def __init__(self, model: nn.Module, *, train_args: dict, **kwargs):
        super().__init__(model, **kwargs)
        self.train_args = train_args

    @property
    def backbone_length(self) -> int:
        return len(self.model.yaml["backbone"])

    def split(self) -> BackboneSplit:
        layers, n = list(self.model.model), self.backbone_length
        head_inputs = sorted({j for layer in layers[n:] for j in _sources(layer) if j < n} | {n - 1})
        return BackboneSplit(
            backbone=YoloBackbone(layers[:n], tuple(head_inputs)),
            head=YoloHead(layers[n:], tuple(head_inputs)),
            feature_taps=[f"model.{i}" for i in head_inputs],
            head_modules=[f"model.{i}" for i in range(n, len(layers))],
        )

    def reload(self, path: Path) -> YoloAdapter:
        return load_yolo(str(path))

    def channel_groups(self) -> list[ChannelGroup]:
        """Block-internal hidden channels, plus the interface between two backbone layers wherever the
        first layer's output is read only by the next (never the tensors the neck/head reads)."""
        n, layers = self.backbone_length, list(self.model.model)
        head_inputs = set(self.split().backbone.outputs)
        readers: dict[int, set[int]] = {}
        for layer in layers:
            for source in _sources(layer):
                readers.setdefault(source, set()).add(layer.i)
        groups = []
        for i in range(n):
            groups += _hidden_groups(f"model.{i}", layers[i])
            if i + 1 < n and i not in head_inputs and readers.get(i) == {i + 1}:
                produced, consumers = _output_conv(layers[i]), _input_convs(layers[i + 1])
                if produced is not None and consumers:
                    name = f"model.{i}" + (f".{produced}" if produced else "")
                    conv = self.model.get_submodule(f"{name}.conv")
                    groups.append(channel_group(f"model.{i}→{i + 1}", f"model.{i}", conv.out_channels,
                                                [f"{name}.conv", f"{name}.bn"], [f"model.{i + 1}.{c}" for c in consumers]))
        return groups

    def save(self, path: Path) -> Path:
        """A checkpoint in Ultralytics' own layout (fp16 model, train_args), loadable by stock ``YOLO(path)``."""
        from ultralytics import __version__ as ultralytics_version

        model = copy.deepcopy(self.model).cpu().half()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        checkpoint = {
            "date": datetime.now().astimezone().isoformat(),
            "version": ultralytics_version,
            "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com",
            "epoch": -1,
            "best_fitness": None,
            "model": model,
            "ema": None,
            "updates": None,
            "optimizer": None,
            "train_args": {**self.train_args, "task": self.task},
            "dfbf": {"version": __version__},
        }
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        return path

    def stock_yolo(self, folder: Path, role: str = "model"):
        """This model as a stock ``ultralytics.YOLO`` (saved and reloaded, so it never aliases ``self.model``)."""
        from ultralytics import YOLO

        return YOLO(str(self.save(folder / f"{role}.pt")))

    def scorer(self, device: torch.device) -> Scorer:
        model = self.model.to(device).eval()

        def scores(images: torch.Tensor) -> torch.Tensor:
            out = model(images.to(device))
            probabilities = out[0] if isinstance(out, (tuple, list)) else out
            return probabilities.clamp_min(1e-12).log()  # Classify ends in softmax: log-probabilities act as logits

        return scores

    def evaluate(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        if self.task == "classify":
            return classification_accuracy(self.scorer(device), require_labelled(data, self.name), imgsz=imgsz, batch=batch, num_outputs=len(self.model.names))
        if not isinstance(data, YoloDataset):
            raise DfbfError(f"{self.name} is a YOLO {self.task} model: evaluate it on an Ultralytics dataset YAML.")
        self._check_compatible(data)
        with temporary_folder() as tmp:
            return self._validate(Path(tmp), data.resolved_yaml(Path(tmp)), imgsz=imgsz, batch=batch, device=device)

    def robustness(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """Classify: FGSM and noise as for any classifier. Detect/pose: the metric on a copy of the validation
        images with Gaussian noise added (FGSM on the detection loss is not implemented)."""
        if self.task == "classify":
            return classification_robustness(self.scorer(device), require_labelled(data, self.name), imgsz=imgsz, batch=batch)
        if not isinstance(data, YoloDataset):
            raise DfbfError(f"--robustness for a YOLO {self.task} model needs an Ultralytics dataset YAML.")
        self._check_compatible(data)
        with temporary_folder() as tmp:
            noisy = _noisy_copy(data, Path(tmp), NOISE_SIGMA)
            metrics = self._validate(Path(tmp), noisy, imgsz=imgsz, batch=batch, device=device)
        return {f"{name}_noise_{NOISE_SIGMA:g}": value for name, value in metrics.items()}

    def _check_compatible(self, data: YoloDataset) -> None:
        model_nc, data_nc = len(self.model.names), len(data.names)
        if model_nc != data_nc:
            raise DfbfError(
                f"{self.name} predicts {model_nc} class(es) but {data.yaml_path} has {data_nc}; "
                "evaluate it on a dataset with the same classes."
            )
        if self.task == "pose" and list(data.config.get("kpt_shape") or []) != list(self.model.kpt_shape):
            raise DfbfError(
                f"{self.name} predicts keypoints of shape {list(self.model.kpt_shape)} but {data.yaml_path} "
                f"has kpt_shape {data.config.get('kpt_shape')}."
            )

    def _validate(self, folder: Path, data_yaml: Path, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        results = self.stock_yolo(folder).val(
            data=str(data_yaml), imgsz=imgsz, batch=batch, device=str(device), plots=False,
            verbose=False, save_json=False, project=str(folder), name="val", workers=0,
        )
        metrics = results.results_dict
        out = {"box_map50_95": metrics["metrics/mAP50-95(B)"], "box_map50": metrics["metrics/mAP50(B)"]}
        if self.task == "pose":
            out = {"pose_map50_95": metrics["metrics/mAP50-95(P)"], "pose_map50": metrics["metrics/mAP50(P)"], **out}
        return out

    def agreement(self, teacher: ModelAdapter, images: ImageFolder, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """Classifiers: top-1 agreement. Detect/pose: mAP against the teacher's own predictions."""
        if self.task == "classify":
            return top1_agreement(self.scorer(device), teacher.scorer(device), images, imgsz=imgsz, batch=batch)
        with temporary_folder() as tmp:
            data_yaml = self._teacher_pseudo_labels(teacher, images, Path(tmp), imgsz=imgsz, device=device)
            metrics = self._validate(Path(tmp), data_yaml, imgsz=imgsz, batch=batch, device=device)
        return {f"agreement_{k}": v for k, v in metrics.items()}

    def _teacher_pseudo_labels(self, teacher: ModelAdapter, images: ImageFolder, folder: Path, *, imgsz: int, device: torch.device) -> Path:
        """A YOLO dataset whose labels are the teacher's predictions on ``images``."""
        image_dir, label_dir = folder / "images" / "val", folder / "labels" / "val"
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        predictor = teacher.stock_yolo(folder, "teacher")
        for path in images.files:
            (image_dir / path.name).symlink_to(path.resolve())
        for result in predictor.predict([str(p) for p in images.files], imgsz=imgsz, device=str(device), verbose=False, stream=True):
            lines = []
            for k, (cls, box) in enumerate(zip(result.boxes.cls.tolist(), result.boxes.xywhn.tolist())):
                fields = [int(cls), *box]
                if self.task == "pose":
                    xy, conf = result.keypoints.xyn[k].tolist(), result.keypoints.conf[k].tolist()
                    for (x, y), c in zip(xy, conf):
                        fields += [x, y, 2] if c > KEYPOINT_VISIBLE else [0, 0, 0]
                lines.append(" ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in fields))
            (label_dir / f"{Path(result.path).stem}.txt").write_text("\n".join(lines))
        config = {"path": str(folder), "train": "images/val", "val": "images/val", "names": dict(self.model.names)}
        if self.task == "pose":
            config["kpt_shape"] = list(self.model.kpt_shape)
        return YoloDataset(folder / "agreement.yaml", config).resolved_yaml(folder)

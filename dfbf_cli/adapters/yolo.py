"""Ultralytics YOLO models (v8, 11...): detection, keypoint pose, instance segmentation, oriented boxes
and classification.

The model graph is Ultralytics' own: a list of layers, each reading the previous output or earlier
saved outputs (``layer.f``), ending in one task module (Detect, Pose, Segment, OBB, Classify). The
backbone is the YAML's ``backbone`` section; the trunk is every layer before the task module. What
differs between tasks (metric keys, label lines, dataset checks) is a :class:`YoloTask`; everything
else is one adapter. Scoring goes through Ultralytics' validators, so numbers match
``YOLO(path).val()``; saving writes a stock checkpoint that ``YOLO(path)`` loads without dfbf.
Checkpoints are read with Ultralytics' restricted loader (``weights_only`` plus an allow-list of its
own classes): a file that needs anything else is refused unless the user trusts it explicitly.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from dfbf_cli import __version__
from dfbf_cli.adapters.classifier import (
    NOISE_SIGMA,
    TOP1,
    Scorer,
    classification_accuracy,
    classification_robustness,
    require_labelled,
    top1_agreement,
)
from dfbf_cli.adapters.yolo_data import YoloDataset, noisy_copy, pseudo_labelled
from dfbf_cli.contract import (
    Artefact,
    BackboneSplit,
    ChannelGroup,
    ChannelSlice,
    EvalData,
    ImageFolder,
    InputSpec,
    Metric,
    ModelAdapter,
    channel_group,
)
from dfbf_cli.engine.files import atomic_path, temporary_folder
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import ExportFormat, Int8Recipe, Scope

log = logging.getLogger("dfbf")

TRUST_VARIABLE = "DFBF_TRUST_CHECKPOINTS"  # =1: unpickle YOLO checkpoints without restriction (they can run code)
KEYPOINT_VISIBLE = 0.5  # teacher keypoint confidence above which a pseudo-label marks it visible


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when it writes (commands and tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def ultralytics():
    """Ultralytics, imported with its run-time pip installs switched off (dfbf names what to install
    instead) and its log on stderr, as verbose as dfbf's own."""
    os.environ["YOLO_AUTOINSTALL"] = "false"
    import ultralytics as package
    from ultralytics.utils import LOGGER, checks

    checks.AUTOINSTALL = False
    for index, handler in enumerate(LOGGER.handlers):
        if type(handler) is logging.StreamHandler:
            replacement = _CurrentStderr()
            replacement.setFormatter(handler.formatter)
            replacement.setLevel(handler.level)
            LOGGER.handlers[index] = replacement
    LOGGER.setLevel(logging.getLogger("dfbf").getEffectiveLevel())
    return package


@contextmanager
def keeping_torch_threads() -> Iterator[None]:
    """Ultralytics' device selection sets torch's CPU threads to its own count (cores − 1, at most 8) for
    the rest of the process: on 2 cores, 1 thread. dfbf puts the caller's back, so that fine-tuning and
    timing after an evaluation are not slowed."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- tasks --------------------------------------------------------------------------------------------


def _box(result, k: int) -> list[float]:
    return result.boxes.xywhn[k].tolist()


def _pose(result, k: int) -> list[float]:
    fields = _box(result, k)
    for (x, y), c in zip(result.keypoints.xyn[k].tolist(), result.keypoints.conf[k].tolist()):
        fields += [x, y, 2] if c > KEYPOINT_VISIBLE else [0, 0, 0]
    return fields


def _polygon(result, k: int) -> list[float]:
    return [v for point in result.masks.xyn[k].tolist() for v in point]


def _corners(result, k: int) -> list[float]:
    return [v for point in result.obb.xyxyxyxyn[k].tolist() for v in point]


@dataclass(frozen=True)
class YoloTask:
    """What one Ultralytics task changes: its metrics (primary first), its label lines, its checks."""

    name: str
    metrics: tuple[tuple[str, str], ...]  # (dfbf's name, Ultralytics' results key)
    label_fields: Callable[[object, int], list[float]]  # a teacher's prediction k as label fields after the class
    fields_ok: Callable[[int, list[int]], bool]  # does a label line with this many values fit (kpt_shape given)
    fields_wanted: str

    @property
    def primary(self) -> Metric:
        return Metric(self.metrics[0][0])


BOX = (("box_map50_95", "metrics/mAP50-95(B)"), ("box_map50", "metrics/mAP50(B)"))
TASKS = {
    "detect": YoloTask("detect", BOX, _box, lambda n, _: n == 5, "4 box values"),
    "pose": YoloTask("pose", (("pose_map50_95", "metrics/mAP50-95(P)"), ("pose_map50", "metrics/mAP50(P)"), *BOX), _pose,
                     lambda n, kpt: n == 5 + kpt[0] * kpt[1], "4 box values and the keypoints of kpt_shape"),
    "segment": YoloTask("segment", (("mask_map50_95", "metrics/mAP50-95(M)"), ("mask_map50", "metrics/mAP50(M)"), *BOX), _polygon,
                        lambda n, _: n == 5 or (n >= 7 and n % 2 == 1), "a polygon (x y pairs) or 4 box values"),
    "obb": YoloTask("obb", BOX, _corners, lambda n, _: n == 9, "4 corner points (8 values)"),
}
SUPPORTED_TASKS = (*TASKS, "classify")


# -- the graph ------------------------------------------------------------------------------------------


def _sources(layer: nn.Module) -> list[int]:
    """Absolute indices of the layers whose outputs ``layer`` reads."""
    froms = layer.f if isinstance(layer.f, list) else [layer.f]
    return [layer.i + f if f < 0 else f for f in froms]


def _run_layers(layers: list[nn.Module], saved: dict[int, torch.Tensor]) -> torch.Tensor:
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
        _run_layers(list(self.layers), saved)
        return tuple(saved[i] for i in self.outputs)


class YoloHead(nn.Module):
    def __init__(self, layers: list[nn.Module], inputs: tuple[int, ...]):
        super().__init__()
        self.layers, self.inputs = nn.ModuleList(layers), inputs

    def forward(self, features: tuple[torch.Tensor, ...]):
        return _run_layers(list(self.layers), dict(zip(self.inputs, features)))


def _plain_conv(module: nn.Module) -> bool:
    """An Ultralytics ``Conv`` (conv + BN + activation) whose channels can be cut independently."""
    from ultralytics.nn.modules import Conv

    return type(module) is Conv and module.conv.groups == 1


def _output_conv(layer: nn.Module) -> str | None:
    """Relative name of the Conv that produces a layer's output ('' for a Conv layer), if cuttable."""
    from ultralytics.nn.modules import C2PSA, C3, SPPF, C2f

    if _plain_conv(layer):
        return ""
    for kind, name in ((C2f, "cv2"), (C3, "cv3"), (SPPF, "cv2"), (C2PSA, "cv2")):
        if isinstance(layer, kind) and not getattr(layer, "add", False) and _plain_conv(getattr(layer, name)):
            return name
    return None


def _input_convs(layer: nn.Module) -> list[str]:
    """Names (relative, ending in ``.conv``) of the convs that read a layer's input; [] if not cuttable."""
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
            groups.append(channel_group(produced, prefix, producer.conv.out_channels, [f"{produced}.conv", f"{produced}.bn"], consumers))
    return groups


@torch.no_grad()
def _output_widths(layers: list[nn.Module]) -> dict[int, int]:
    """Channels of every layer's output before the task module, from one small forward pass."""
    saved = {-1: torch.zeros(1, 3, 64, 64, device=next(layers[0].parameters()).device)}
    _run_layers(layers[:-1], saved)
    return {i: x.shape[1] for i, x in saved.items()}


# -- loading ------------------------------------------------------------------------------------------


def _checkpoint(spec: str, path: Path) -> dict:
    """A checkpoint file (downloaded by name where online), unpickled with Ultralytics' restricted loader."""
    ultralytics()
    from ultralytics.nn.tasks import torch_safe_load

    trusted = os.environ.get(TRUST_VARIABLE) == "1"
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DfbfError(f"Cannot load '{spec}' as an Ultralytics YOLO model: it is not a PyTorch checkpoint archive (empty, truncated or another "
            f"kind of file).")
    try:
        checkpoint, _ = torch_safe_load(str(path) if path.exists() else spec, safe_only=not trusted)
    except TypeError as error:
        if "outside the supported" in str(error):
            raise DfbfError(f"'{spec}' holds objects outside Ultralytics' checkpoint format, and unpickling them could run code, so dfbf "
                            f"refuses it; if you trust the file, run again with {TRUST_VARIABLE}=1.") from error
        raise DfbfError(f"Cannot load '{spec}' as an Ultralytics YOLO model: {first_line(error)}") from error
    except (FileNotFoundError, ConnectionError) as error:
        raise DfbfError(f"Model '{spec}' is not a local file and could not be downloaded ({first_line(error)}); "
                        "download it where you are online, or pass the path of a local checkpoint.") from error
    except Exception as error:  # a corrupt or foreign file: the loader raises many types
        raise DfbfError(f"Cannot load '{spec}' as an Ultralytics YOLO model: {first_line(error)}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("ema") or checkpoint.get("model"), nn.Module):
        raise DfbfError(f"'{spec}' is not an Ultralytics checkpoint (no model in it).")
    return checkpoint


def _task_of(model: nn.Module) -> str:
    """The task, from the task module itself (a checkpoint's recorded task can be stale)."""
    from ultralytics.nn.modules import OBB, Classify, Detect, Pose, Segment

    head = model.model[-1]
    for kind, task in ((Pose, "pose"), (Segment, "segment"), (OBB, "obb"), (Classify, "classify"), (Detect, "detect")):
        if isinstance(head, kind):
            return task
    return type(head).__name__


def first_line(error: Exception) -> str:
    return str(error).replace("ERROR ❌️", "").replace("❌", "").strip().splitlines()[0]


def load_yolo(spec: str) -> YoloAdapter:
    """A checkpoint path, an Ultralytics model name (downloaded when online), or a model YAML."""
    path = Path(spec).expanduser()
    if path.suffix in {".yaml", ".yml"}:
        try:
            model = ultralytics().YOLO(str(path) if path.exists() else spec).model
        except Exception as error:  # a missing or malformed YAML
            raise DfbfError(f"Cannot build a YOLO model from '{spec}' (a local YAML or one of Ultralytics' built-in YAMLs): "
                            f"{first_line(error)}") from error
        log.warning("%s is a model YAML: randomly initialised (useful only for structural checks).", spec)
        task, train_args, source = _task_of(model), {}, None
    else:
        checkpoint = _checkpoint(spec, path)
        model = (checkpoint.get("ema") or checkpoint["model"]).float()
        train_args = dict(checkpoint.get("train_args") or {})
        task = _task_of(model)
        source = path if path.exists() else None
    if task not in SUPPORTED_TASKS:
        raise DfbfError(f"'{spec}' is a YOLO {task} model; dfbf supports {', '.join(SUPPORTED_TASKS)}.")
    imgsz = int(train_args["imgsz"]) if isinstance(train_args.get("imgsz"), int) else 224 if task == "classify" else 640
    model.requires_grad_(False)
    stride = int(model.stride.max()) if hasattr(model, "stride") else 32
    adapter = YoloAdapter(model.eval(), task=task, name=path.name, input_spec=InputSpec(imgsz, stride=stride), source=source, train_args=train_args)
    adapter.origin = None if source is None else (checkpoint.get("dfbf") or {}).get("original")
    return adapter


# -- the adapter --------------------------------------------------------------------------------------


OPENVINO_SUFFIX = "_openvino_model"  # how ultralytics.YOLO(path) tells an OpenVINO folder


class YoloAdapter(ModelAdapter):
    family = "yolo"
    default_suffix = ".pt"
    save_suffixes = (".pt",)

    def __init__(self, model: nn.Module, *, train_args: dict, **kwargs):
        super().__init__(model, **kwargs)
        self.train_args = train_args

    @property
    def free_input_size(self) -> bool:  # a detector runs at any multiple of its stride; a classifier is left alone
        return self.task != "classify"

    @property
    def yolo_task(self) -> YoloTask:
        return TASKS[self.task]

    def _scope_end(self, scope: Scope) -> int:
        """Index of the first layer left untouched: the neck for ``backbone``, the task module for ``trunk``."""
        return len(self.model.yaml["backbone"]) if scope == Scope.BACKBONE else len(self.model.model) - 1

    def split(self, scope: Scope = Scope.BACKBONE) -> BackboneSplit:
        layers, n = list(self.model.model), self._scope_end(scope)
        head_inputs = sorted({j for layer in layers[n:] for j in _sources(layer) if j < n} | {n - 1})
        return BackboneSplit(
            backbone=YoloBackbone(layers[:n], tuple(head_inputs)),
            head=YoloHead(layers[n:], tuple(head_inputs)),
            feature_taps=[f"model.{i}" for i in head_inputs],
            head_modules=[f"model.{i}" for i in range(n, len(layers))],
        )

    def channel_groups(self, scope: Scope = Scope.BACKBONE) -> list[ChannelGroup]:
        """Block-internal hidden channels, plus every layer output inside the scope whose readers can all
        take fewer input channels (followed through Upsample and Concat, at the concatenation's offset);
        never a tensor that the untouched part reads."""
        layers, n = list(self.model.model), self._scope_end(scope)
        widths = _output_widths(layers)
        readers: dict[int, list[int]] = {}
        for layer in layers:
            for source in _sources(layer):
                readers.setdefault(source, []).append(layer.i)

        def consumers(i: int, offset: int) -> list[ChannelSlice] | None:
            found = []
            for j in readers.get(i, []):
                layer = layers[j]
                if j >= n:
                    return None
                if isinstance(layer, nn.Upsample):
                    more = consumers(j, offset)
                elif type(layer).__name__ == "Concat":
                    sources = _sources(layer)
                    more = consumers(j, offset + sum(widths[s] for s in sources[: sources.index(i)]))
                else:
                    more = [ChannelSlice(f"model.{j}.{c}", offset) for c in _input_convs(layer)] or None
                if more is None:
                    return None
                found += more
            return found or None

        groups = []
        for i in range(n):
            groups += _hidden_groups(f"model.{i}", layers[i])
            produced = _output_conv(layers[i])
            reading = consumers(i, 0) if produced is not None else None
            if reading:
                name = f"model.{i}" + (f".{produced}" if produced else "")
                groups.append(channel_group(f"model.{i}.out", f"model.{i}", widths[i], [f"{name}.conv", f"{name}.bn"], reading))
        return groups

    def reload(self, path: Path) -> YoloAdapter:
        return load_yolo(str(path))

    def save(self, path: Path) -> Path:
        """A checkpoint in Ultralytics' own layout (fp16 model, train_args), loadable by stock ``YOLO(path)``."""
        model = copy.deepcopy(self.model).cpu().half()
        model.requires_grad_(False)
        checkpoint = {
            "date": datetime.now().astimezone().isoformat(),
            "version": ultralytics().__version__,
            "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com",
            "epoch": -1,
            "best_fitness": None,
            "model": model,
            "ema": None,
            "updates": None,
            "optimizer": None,
            "train_args": {**self.train_args, "task": self.task},
            "dfbf": {"version": __version__, "original": self.lineage()},
        }
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        return path

    def export(self, folder: Path, fmt: ExportFormat, *, imgsz: int, calibration: torch.Tensor | None,
               recipe: Int8Recipe = Int8Recipe.MIXED) -> Artefact:
        from dfbf_cli.adapters.yolo_export import export_yolo

        return export_yolo(self, folder, fmt, imgsz=imgsz, calibration=calibration, recipe=recipe)

    def check_export_path(self, path: Path, fmt: ExportFormat) -> None:
        super().check_export_path(path, fmt)
        if fmt == ExportFormat.OPENVINO and not path.name.endswith(OPENVINO_SUFFIX):
            raise DfbfError(f"--out {path}: Ultralytics recognises an OpenVINO folder by its name's ending; call it {path.name}{OPENVINO_SUFFIX}.")

    def load_export(self, path: Path) -> YoloAdapter:
        from dfbf_cli.adapters.yolo_export import ExportedYolo

        return ExportedYolo(path)

    def _stock(self, folder: Path, role: str = "model"):
        """This model as a stock ``ultralytics.YOLO`` (saved and reloaded, so it never aliases ``self.model``)."""
        return ultralytics().YOLO(str(self.save(folder / f"{role}.pt")))

    def scorer(self, device: torch.device) -> Scorer:
        model = self.model.to(device).eval()

        def scores(images: torch.Tensor) -> torch.Tensor:
            out = model(images.to(device))
            probabilities = out[0] if isinstance(out, (tuple, list)) else out
            return probabilities.clamp_min(1e-12).log()  # Classify ends in softmax: log-probabilities act as logits

        return scores

    def primary_metric(self) -> Metric:
        return TOP1 if self.task == "classify" else self.yolo_task.primary

    def check_data(self, data: EvalData) -> None:
        if self.task == "classify":
            require_labelled(data, self.name)
            return
        if not isinstance(data, YoloDataset):
            raise DfbfError(f"{self.name} is a YOLO {self.task} model: evaluate it on an Ultralytics dataset YAML.")
        model_nc, data_nc = len(self.model.names), len(data.names)
        if model_nc != data_nc:
            raise DfbfError(f"{self.name} predicts {model_nc} class(es) but {data.source} has {data_nc}; evaluate it on a dataset with the same classes.")
        kpt_shape = list(getattr(self.model, "kpt_shape", []) or [])
        if self.task == "pose" and list(data.config.get("kpt_shape") or []) != kpt_shape:
            raise DfbfError(f"{self.name} predicts keypoints of shape {kpt_shape} but {data.source} has kpt_shape {data.config.get('kpt_shape')}.")
        task = self.yolo_task
        data.check(lambda n: task.fields_ok(n, kpt_shape), task.fields_wanted)

    def evaluate(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        self.check_data(data)
        if self.task == "classify":
            return classification_accuracy(self.scorer(device), data, imgsz=imgsz, batch=batch, num_outputs=len(self.model.names))
        with temporary_folder() as tmp:
            return self._validate(Path(tmp), data.resolved_yaml(Path(tmp)), imgsz=imgsz, batch=batch, device=device)

    def robustness(self, data: EvalData, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """Classify: FGSM and noise as for any classifier. Other tasks: the metrics on a copy of the
        validation images with Gaussian noise added (FGSM on a detection loss is not implemented)."""
        self.check_data(data)
        if self.task == "classify":
            return classification_robustness(self.scorer(device), data, imgsz=imgsz, batch=batch)
        with temporary_folder() as tmp:
            metrics = self._validate(Path(tmp), noisy_copy(data, Path(tmp), NOISE_SIGMA), imgsz=imgsz, batch=batch, device=device)
        return {f"{name}_noise_{NOISE_SIGMA:g}": value for name, value in metrics.items()}

    def _validate(self, folder: Path, data_yaml: Path, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        with keeping_torch_threads():
            results = self._stock(folder).val(
                data=str(data_yaml), imgsz=imgsz, batch=batch, device=str(device), plots=False,
                verbose=False, save_json=False, project=str(folder), name="val", workers=0,
            )
        return {name: float(results.results_dict[key]) for name, key in self.yolo_task.metrics}

    def agreement(self, teacher: ModelAdapter, images: ImageFolder, *, imgsz: int, batch: int, device: torch.device) -> dict[str, float]:
        """Classify: top-1 agreement. Other tasks: the metrics against the teacher's own predictions."""
        self.check_same_kind(teacher)
        if self.task == "classify":
            return top1_agreement(self.scorer(device), teacher.scorer(device), images, imgsz=imgsz, batch=batch)
        with temporary_folder() as tmp, keeping_torch_threads():
            task, labels = self.yolo_task, {}
            for result in teacher._stock(Path(tmp), "teacher").predict([str(p) for p in images.files], imgsz=imgsz, device=str(device),
                                                                       verbose=False, stream=True):
                classes = (result.obb if task.name == "obb" else result.boxes).cls.tolist()
                labels[Path(result.path).stem] = [f"{int(c)} " + " ".join(f"{v:.6g}" for v in task.label_fields(result, k))
                                                  for k, c in enumerate(classes)]
            config = {"names": dict(self.model.names)}
            if self.task == "pose":
                config["kpt_shape"] = list(self.model.kpt_shape)
            data_yaml = pseudo_labelled(Path(tmp), list(images.files), labels, config)
            metrics = self._validate(Path(tmp), data_yaml, imgsz=imgsz, batch=batch, device=device)
        return {f"agreement_{k}": v for k, v in metrics.items()}

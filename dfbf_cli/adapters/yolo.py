"""Ultralytics YOLO models (v8, 11...): detection, keypoint pose, instance segmentation, oriented boxes
and classification.

The model graph is Ultralytics' own: a list of layers, each reading the previous output or earlier
saved outputs (``layer.f``), ending in one task module (Detect, Pose, Segment, OBB, Classify). The
backbone is the YAML's ``backbone`` section; the trunk is every layer before the task module. What
differs between tasks (metric keys, label lines, dataset checks) is a :class:`YoloTask`; everything
else is one adapter. Scoring goes through Ultralytics' validators on square inputs, so numbers match
``YOLO(path).val(rect=False)``; saving writes a stock checkpoint that ``YOLO(path)`` loads without dfbf.
Checkpoints are read with Ultralytics' restricted loader (``weights_only`` plus an allow-list of its
own classes): a file that needs anything else is refused unless the user trusts it explicitly.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from dfbf_cli import __version__
from dfbf_cli.adapters.scoring import (
    NOISE_SIGMA,
    TOP1,
    Scorer,
    classification_accuracy,
    classification_robustness,
    require_labelled,
    top1_agreement,
)
from dfbf_cli.adapters.yolo_data import YoloDataset, noisy_copy, pseudo_labelled
from dfbf_cli.adapters.yolo_graph import (
    YoloBackbone,
    YoloHead,
    hidden_groups,
    input_convs,
    layer_sources,
    output_conv,
    output_widths,
)
from dfbf_cli.adapters.yolo_tasks import SUPPORTED_TASKS, TASKS, YoloTask
from dfbf_cli.adapters.yolo_ultralytics import OPENVINO_SUFFIX, first_line, keeping_torch_threads, read_checkpoint, task_of, ultralytics
from dfbf_cli.contract import (
    Artefact,
    BackboneSplit,
    ChannelGroup,
    ChannelSlice,
    EvalData,
    Exported,
    ImageFolder,
    InputSpec,
    Metric,
    ModelAdapter,
    channel_group,
)
from dfbf_cli.errors import DfbfError
from dfbf_cli.export_record import read_record
from dfbf_cli.files import atomic_path, temporary_folder
from dfbf_cli.settings import ExportFormat, Int8Recipe, Scope

log = logging.getLogger("dfbf")



# -- loading ------------------------------------------------------------------------------------------


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
        task, train_args, source = task_of(model), {}, None
    else:
        checkpoint = read_checkpoint(spec, path)
        model = (checkpoint.get("ema") or checkpoint["model"]).float()
        train_args = dict(checkpoint.get("train_args") or {})
        task = task_of(model)
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
        head_inputs = sorted({j for layer in layers[n:] for j in layer_sources(layer) if j < n} | {n - 1})
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
        widths = output_widths(layers)
        readers: dict[int, list[int]] = {}
        for layer in layers:
            for source in layer_sources(layer):
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
                    sources = layer_sources(layer)
                    more = consumers(j, offset + sum(widths[s] for s in sources[: sources.index(i)]))
                else:
                    more = [ChannelSlice(f"model.{j}.{c}", offset) for c in input_convs(layer)] or None
                if more is None:
                    return None
                found += more
            return found or None

        groups = []
        for i in range(n):
            groups += hidden_groups(f"model.{i}", layers[i])
            produced = output_conv(layers[i])
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
        """Ultralytics' validator on square imgsz × imgsz inputs for every model: ``YOLO.val()`` gives a PyTorch model
        rectangular batches (less padding) but a fixed-shape export square ones, which would count a letterboxing
        difference as the export's loss; square is also what GFLOPs and latency are measured at."""
        with keeping_torch_threads():
            results = self._stock(folder).val(
                data=str(data_yaml), imgsz=imgsz, batch=batch, device=str(device), plots=False, rect=False,
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
            for result in teacher._stock(Path(tmp), "teacher").predict([str(p) for p in images.files], imgsz=imgsz, device=str(device), rect=False,
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


class ExportedYolo(Exported, YoloAdapter):
    """A YOLO model exported to an inference runtime (OpenVINO, ONNX): scored and timed through Ultralytics'
    AutoBackend, never pruned or trained."""

    def __init__(self, path: Path):
        from ultralytics.nn.autobackend import AutoBackend

        ultralytics()
        try:
            backend = AutoBackend(str(path), device=torch.device("cpu"), verbose=False)
        except Exception as error:  # a broken or foreign export
            raise DfbfError(f"Cannot load '{path}' as an exported YOLO model: {first_line(error)}") from error
        imgsz = backend.imgsz[0] if isinstance(getattr(backend, "imgsz", None), (list, tuple)) else 640
        super().__init__(backend, task=backend.task, name=path.name, input_spec=InputSpec(imgsz, stride=int(backend.stride)),
                         source=path, train_args={"imgsz": imgsz})
        self.record = read_record(path)  # None for an Ultralytics export dfbf did not make: its costs are then unknown

    def _stock(self, folder: Path, role: str = "model"):
        return ultralytics().YOLO(str(self.source), task=self.task)

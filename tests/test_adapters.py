"""Every family loads, splits into backbone + head that reassemble exactly, and round-trips through save."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from dfbf_cli.adapters import load_model
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import Scope
from tests.conftest import shared_asset

STRUCTURAL = [
    "yolov8n.yaml", "yolov8n-pose.yaml", "yolov8n-cls.yaml", "yolo11n.yaml", "yolo11n-pose.yaml", "yolo11n-cls.yaml",
    "yolo11n-seg.yaml", "yolo11n-obb.yaml",
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:vgg16_bn", "cifar-resnet20",
]
TASKS = {"cls": "classify", "pose": "pose", "seg": "segment", "obb": "obb"}


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _example(adapter, n: int = 2) -> torch.Tensor:
    size = min(adapter.input_spec.imgsz, 160)
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def assert_split_reassembles(adapter, scope: Scope = Scope.BACKBONE) -> None:
    split = adapter.split(scope)
    x = _example(adapter)
    with torch.no_grad():
        expected = _first(adapter.model(x))
        got = _first(split.head(split.backbone(x)))
    torch.testing.assert_close(got, expected)
    names = dict(adapter.model.named_modules())
    assert split.feature_taps and all(tap in names for tap in split.feature_taps)
    assert split.head_modules and all(name in names for name in split.head_modules)
    backbone_ids = {id(p) for p in split.backbone.parameters()}
    head_ids = {id(p) for p in split.head.parameters()}
    assert backbone_ids and head_ids and not backbone_ids & head_ids
    assert backbone_ids | head_ids == {id(p) for p in adapter.model.parameters()}


@pytest.mark.parametrize("spec", STRUCTURAL)
def test_structural_models_split_and_reassemble(spec):
    adapter = load_model(spec)
    kind = next((task for key, task in TASKS.items() if key in spec), "classify" if ":" in spec or "cifar" in spec else "detect")
    assert adapter.task == kind
    for scope in Scope:
        assert_split_reassembles(adapter, scope)


@pytest.mark.parametrize(("name", "task"), [("yolo11n-pose.pt", "pose"), ("yolo11n-person.pt", "detect")])
def test_real_yolo_checkpoints_split_and_reassemble(name, task):
    adapter = load_model(str(shared_asset(f"models/{name}")))
    assert adapter.task == task and adapter.input_spec.imgsz == 640 and adapter.input_spec.stride == 32
    assert adapter.split().feature_taps == ["model.4", "model.6", "model.10"]
    assert adapter.split(Scope.TRUNK).feature_taps == ["model.16", "model.19", "model.22"]  # what the task module reads
    assert adapter.split(Scope.TRUNK).head_modules == ["model.23"]
    for scope in Scope:
        assert_split_reassembles(adapter, scope)


def test_cifar_checkpoint_loads_with_its_normalisation():
    adapter = load_model("cifar-resnet56", str(shared_asset("models/cifar10-resnet56.th")))
    assert adapter.input_spec.imgsz == 32 and adapter.input_spec.mean == (0.485, 0.456, 0.406)
    assert len(adapter.split().feature_taps) == 27  # 3 stages of 9 BasicBlocks
    assert_split_reassembles(adapter)


def test_yolo_checkpoint_round_trip_loads_in_stock_ultralytics_without_dfbf(tmp_path):
    adapter = load_model(str(shared_asset("models/yolo11n-pose.pt")))
    saved = adapter.save(tmp_path / "copy.pt")
    reloaded = load_model(str(saved))
    x = _example(adapter)
    with torch.no_grad():
        torch.testing.assert_close(_first(reloaded.model(x)), _first(adapter.model(x)))
    script = (
        "import sys, numpy as np\n"
        "from ultralytics import YOLO\n"
        f"model = YOLO({str(saved)!r})\n"
        "results = model.predict(np.zeros((96, 128, 3), np.uint8), imgsz=128, verbose=False)\n"
        "assert 'dfbf_cli' not in sys.modules\n"
        "print(model.task, len(results))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["pose", "1"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".th"])
def test_classifier_round_trip_keeps_a_shrunk_architecture(tmp_path, suffix):
    """A structurally smaller model (as pruning makes) saves and reloads from its state_dict shapes, as MODEL
    alone (the file names its architecture) or as the weights of that architecture."""
    from dfbf_cli.surgery import resize_to_state_dict

    adapter = load_model("cifar-resnet20")
    state = adapter.model.state_dict()
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:10]
    for key in ("weight", "bias", "running_mean", "running_var"):
        state[f"layer1.0.bn1.{key}"] = state[f"layer1.0.bn1.{key}"][:10]
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :10]
    resize_to_state_dict(adapter.model, state)
    adapter.model.load_state_dict(state)
    path = adapter.save(tmp_path / f"small{suffix}")
    x = _example(adapter)
    for reloaded in (load_model(str(path)), load_model("cifar-resnet20", str(path))):
        assert reloaded.model.layer1[0].conv1.out_channels == 10
        with torch.no_grad():
            torch.testing.assert_close(reloaded.model.eval()(x), adapter.model.eval()(x))


def test_evaluating_a_yolo_model_keeps_the_callers_torch_threads(random_pose):
    """Ultralytics' validator sets torch's CPU threads to its own count for the whole process (1 on 2 cores)."""
    from ultralytics.utils import NUM_THREADS

    from dfbf_cli.adapters import load_data

    model, data = random_pose
    threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS + 1)
    try:
        load_model(str(model)).evaluate(load_data(data), imgsz=64, batch=4, device=torch.device("cpu"))
        assert torch.get_num_threads() == NUM_THREADS + 1
    finally:
        torch.set_num_threads(threads)


def test_a_yolo_model_is_scored_on_square_inputs_as_a_fixed_shape_export_is(random_pose, tmp_path, monkeypatch):
    """YOLO.val() would give a PyTorch model rectangular batches of wide photos (an export gets square ones):
    dfbf scores every model on the same imgsz × imgsz inputs, so a comparison measures the models, not the padding."""
    from ultralytics.models.yolo.detect.val import DetectionValidator

    from dfbf_cli.adapters import load_data
    from tests.fixtures import yolo_dataset

    model, _ = random_pose
    wide = yolo_dataset(tmp_path / "wide", "pose", size=64, width=128)
    seen, preprocess = [], DetectionValidator.preprocess
    monkeypatch.setattr(DetectionValidator, "preprocess", lambda self, batch: seen.append(tuple(batch["img"].shape[-2:])) or preprocess(self, batch))
    load_model(str(model)).evaluate(load_data(wide), imgsz=128, batch=4, device=torch.device("cpu"))
    assert seen and set(seen) == {(128, 128)}


def test_a_bare_state_dict_as_model_names_the_form_that_loads_it(tmp_path):
    path = tmp_path / "r20.th"
    torch.save({"state_dict": load_model("cifar-resnet20").model.state_dict()}, path)
    form = re.escape(f"'cifar-resnet56 --weights {path}'")
    with pytest.raises(DfbfError, match=f"does not say which architecture.*{form}"):
        load_model(str(path))


@pytest.mark.parametrize(
    ("spec", "weights", "message"),
    [
        ("missing.pt", None, "could not be downloaded"),
        ("no-such-model.yaml", None, "does not exist"),
        ("resnet18", None, "Unknown model"),
        ("torchvision:alexnet", None, "Unsupported torchvision model"),
        ("cifar-resnet7", None, "Unknown CIFAR ResNet"),
        ("cifar-resnet20", "nowhere.th", "does not exist"),
        ("cifar-resnet20", "cifar10-resnet20", "is not a file"),
        ("torchvision:resnet18", "IMAGENET_NOPE", "neither a file nor a weights name of resnet18"),
        ("torchvision:resnet18", "cifar-resnet56-as-weights", "do not fit"),
    ],
)
def test_bad_model_specs_are_user_errors(spec, weights, message):
    if weights == "cifar-resnet56-as-weights":
        weights = str(shared_asset("models/cifar10-resnet56.th"))
    with pytest.raises(DfbfError, match=message):
        load_model(spec, weights)


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(DfbfError, match="Cannot load"):
        load_model(str(bad))

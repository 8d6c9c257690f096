"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent) and a CLI runner."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
MODELS, DATA = SHARED / "models", SHARED / "data"


def shared_asset(relative: str) -> Path:
    """A file under ../shared/assets, or skip the test saying why."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs the shared asset {path} (only present on the project's machines)")
    return path


def cifar_subset(per_class: int):
    """The first ``per_class`` images of each class of the CIFAR dev file (it is sorted by class)."""
    import numpy as np

    from dfbf_cli.data import LabelledImages

    source = shared_asset("data/cifar10-test-dev.npz")
    with np.load(source) as archive:
        x, y = archive["x"], archive["y"]
    index = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    return LabelledImages(source, labels=y[index], arrays=x[index])


@pytest.fixture(scope="session")
def dataset_copy(tmp_path_factory):
    """Copy a small shared YOLO dataset to a temporary folder, so Ultralytics' label caches land there."""

    def copy(name: str) -> Path:
        target = tmp_path_factory.getbasetemp() / name
        if not target.exists():
            shutil.copytree(shared_asset(f"data/{name}"), target)
        return target / "data.yaml"

    return copy


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``dfbf ARGS`` in-process through the real entry point; return exit code and output."""
    from dfbf_cli.cli import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["dfbf", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr()
        code = exit_info.value.code
        return CliResult(code if isinstance(code, int) else (0 if code is None else 1), out.out, out.err)

    return run


# -- generated fixtures: the tier that needs nothing but the package -------------------------------------


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """Folder of generated inputs shared by the session (see tests/fixtures.py)."""
    return tmp_path_factory.mktemp("generated")


def random_cifar(folder: Path, depth: int) -> list[str]:
    """A random-weight CIFAR ResNet saved as a weights file (a random model is only reproducible as a file),
    as MODEL arguments."""
    import torch

    from dfbf_cli.adapters import load_model

    path = folder / f"r{depth}-random.safetensors"
    if not path.exists():
        torch.manual_seed(depth)
        load_model(f"cifar-resnet{depth}").save(path)
    return [f"cifar-resnet{depth}", "--weights", str(path)]


@pytest.fixture(scope="session")
def random_r20(generated):
    return random_cifar(generated, 20)


@pytest.fixture(scope="session")
def random_pose(generated):
    """A random-weight one-class YOLO11n-pose checkpoint at 64 px, and a 4-image pose dataset for it."""
    from tests.fixtures import one_class_yolo, yolo_dataset

    return one_class_yolo(generated, "pose"), yolo_dataset(generated / "pose-data", "pose")


def quick_synthetic(model_args: list[str], out: Path, *, num_images: int = 16, batch: int = 8, low_res: int = 2, iterations: int = 3) -> Path:
    """A few fp32 synthetic 32-px images of a CIFAR model (``model_args`` as on the command line): a dataset directory."""
    import torch

    from dfbf_cli.adapters import load_model
    from dfbf_cli.engine.synthesis import plan_synthesis, run_synthesis
    from dfbf_cli.settings import Precision, SynthesisSettings

    teacher = load_model(model_args[0], model_args[2])
    plan = plan_synthesis(teacher, out, num_images=num_images, imgsz=32, batch=batch, settings=SynthesisSettings(low_res, iterations), seed=0,
                          precision=Precision.FP32)
    run_synthesis(teacher, plan, device=torch.device("cpu"))
    return out


@pytest.fixture(scope="session")
def random_r20_synthetic(tmp_path_factory, random_r20):
    """16 quick synthetic images of the random-weight ResNet-20 (a dataset directory)."""
    return quick_synthetic(random_r20, tmp_path_factory.mktemp("synth") / "r20")


@pytest.fixture
def quick_synthesis(monkeypatch):
    """The quick preset with two inversion steps per image: for tests of what compress does with its images,
    not of how good they are (synthesis has its own tests)."""
    from dataclasses import replace

    from dfbf_cli.settings import PRESETS, PresetName, SynthesisSettings

    monkeypatch.setitem(PRESETS, PresetName.QUICK, replace(PRESETS[PresetName.QUICK], synthesis=SynthesisSettings(low_res_iterations=0, iterations=2)))


def pruned_copy(adapter, ratio: float, scope=None):
    """``adapter`` pruned one-shot at a uniform ratio (within ``scope``, default the backbone)."""
    from dfbf_cli.engine.pruning import prune
    from dfbf_cli.settings import PruneSettings, Scope

    return prune(adapter, PruneSettings(ratio, scope=scope or Scope.BACKBONE))[0]


def stock_ultralytics_predicts(model: Path, imgsz: int, result_field: str) -> None:
    """``ultralytics.YOLO(model)`` predicts on a blank image in a fresh process that never imports dfbf,
    and the result has ``result_field`` (keypoints, boxes...)."""
    import subprocess

    script = (
        "import sys, numpy as np\n"
        "from ultralytics import YOLO\n"
        f"results = YOLO({str(model)!r}).predict(np.zeros(({imgsz}, {imgsz}, 3), np.uint8), imgsz={imgsz}, verbose=False)\n"
        f"assert 'dfbf_cli' not in sys.modules and results[0].{result_field} is not None\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

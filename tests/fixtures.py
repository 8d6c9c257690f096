"""Small generated inputs, so the whole pipeline runs on a clone without ../shared: random-weight
models saved as files, an .npz, a folder of photos, and tiny Ultralytics datasets of every task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

KPT_SHAPE = [17, 3]


def photos(folder: Path, count: int = 6, size: int = 48, seed: int = 0) -> Path:
    """``count`` smooth random RGB images (PNG): unlabelled photos for agreement checks."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"photo{i}.png")
    return folder


def labelled_npz(path: Path, count: int = 40, classes: int = 10, size: int = 32, seed: int = 0) -> Path:
    """A class-balanced .npz of random images (accuracy is near chance: it exercises the plumbing)."""
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), y=np.arange(count) % classes)
    return path


def _label_line(task: str, rng: np.random.Generator) -> str:
    cx, cy, w, h = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.4)
    box = [cx, cy, w, h]
    if task == "pose":
        fields = box + [v for _ in range(KPT_SHAPE[0]) for v in (rng.uniform(cx - w / 2, cx + w / 2), rng.uniform(cy - h / 2, cy + h / 2), 2)]
    elif task == "segment":
        fields = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
    elif task == "obb":
        fields = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
    else:
        fields = box
    return "0 " + " ".join(f"{v:.5f}" for v in fields)


def yolo_dataset(folder: Path, task: str = "pose", count: int = 4, size: int = 64, seed: int = 0, width: int | None = None) -> Path:
    """An Ultralytics dataset of ``count`` random images (``size`` high, ``width`` or ``size`` wide) with one object each,
    for ``task``; returns its YAML."""
    rng = np.random.default_rng(seed)
    images, labels = folder / "images" / "val", folder / "labels" / "val"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, width or size, 3), dtype=np.uint8)).save(images / f"im{i}.png")
        (labels / f"im{i}.txt").write_text(_label_line(task, rng) + "\n")
    config = {"path": ".", "train": "images/val", "val": "images/val", "names": {0: "person"}}
    if task == "pose":
        config["kpt_shape"] = KPT_SHAPE
        config["flip_idx"] = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    (folder / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "data.yaml"


def one_class_yolo(folder: Path, task: str) -> Path:
    """A random-weight one-class YOLO11n of ``task`` saved as a stock checkpoint (pose: 17 keypoints)."""
    from dfbf_cli.adapters import load_model

    name = {"detect": "yolo11n.yaml", "pose": "yolo11n-pose.yaml", "segment": "yolo11n-seg.yaml", "obb": "yolo11n-obb.yaml"}[task]
    import ultralytics  # noqa: F401  (the YAML builder)
    from ultralytics.nn.tasks import yaml_model_load

    config = yaml_model_load(name)
    config["nc"] = 1
    path = folder / f"{Path(name).stem}-1c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    adapter = load_model(str(path))
    adapter.model.names = {0: "person"}
    adapter.train_args = {"imgsz": 64}
    adapter.input_spec = type(adapter.input_spec)(64, stride=adapter.input_spec.stride)
    return adapter.save(folder / f"{Path(name).stem}-1c.pt")

"""Ultralytics' dataset format: a YAML naming image folders, one label file per image.

Read and checked here before any work starts (every validation image decodes, label files exist and
hold the fields the task needs), because Ultralytics itself skips a broken file with a warning and
scores what is left, which turns a user's mistake into a silent 0.0000. This module also writes the
YOLO datasets dfbf makes for itself: a noisy copy of the validation split, and teacher pseudo-labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dfbf_cli.contract import DatasetFile
from dfbf_cli.errors import DfbfError
from dfbf_cli.images import IMAGE_SUFFIXES, check_image, read_image


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    index = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if index is not None:
        parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


@dataclass(frozen=True)
class YoloDataset(DatasetFile):
    """An Ultralytics dataset YAML with its ``path:`` resolved against the YAML's own folder."""

    config: dict

    @property
    def names(self) -> dict[int, str]:
        names = self.config.get("names")
        if isinstance(names, list):
            return dict(enumerate(names))
        if isinstance(names, dict):
            return {int(k): str(v) for k, v in names.items()}
        return {i: f"class_{i}" for i in range(int(self.config.get("nc", 0)))}

    def val_images(self) -> list[Path]:
        """The validation images: folders (searched recursively, as Ultralytics does) or .txt lists."""
        root = Path(self.config["path"])
        found: list[Path] = []
        for entry in self.config["val"] if isinstance(self.config["val"], list) else [self.config["val"]]:
            place = root / entry
            if place.is_dir():
                found += sorted(p for p in place.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            else:
                found += [(root / line.strip()) for line in place.read_text().splitlines() if line.strip()]
        return found

    def resolved_yaml(self, folder: Path) -> Path:
        """Write the YAML with an absolute ``path:`` into ``folder`` (Ultralytics would resolve it elsewhere)."""
        out = folder / self.source.name
        out.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return out

    def check(self, fields_ok: Callable[[int], bool], fields_wanted: str) -> None:
        """Every validation image decodes; label files exist and each line has a known class, finite
        values and a field count ``fields_ok`` accepts (``fields_wanted`` says which, for the message)."""
        images = self.val_images()
        if not images:
            raise DfbfError(f"{self.source}: the validation split '{self.config['val']}' holds no images.")
        labelled = 0
        for image in images:
            check_image(image)
            labels = label_path(image)
            if not labels.is_file():
                continue
            labelled += 1
            for number, line in enumerate(labels.read_text(errors="replace").splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    values = [float(v) for v in fields]
                except ValueError:
                    values = []
                if not values or not all(math.isfinite(v) for v in values) or not fields_ok(len(values)) \
                        or values[0] != int(values[0]) or int(values[0]) not in self.names:
                    raise DfbfError(f"{labels}, line {number}: expected a class of {self.source.name} and {fields_wanted}, "
                                    f"got '{line.strip()[:80]}'.")
        if labelled == 0:
            raise DfbfError(f"{self.source}: none of the {len(images)} validation images has a label file "
                            f"(looked for {label_path(images[0])} and the like).")

    @classmethod
    def load(cls, path: Path) -> YoloDataset:
        try:
            config = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise DfbfError(f"{path} is not valid YAML: {error}.") from error
        if not isinstance(config, dict) or "val" not in config or not ({"names", "nc"} & config.keys()):
            raise DfbfError(f"{path} is not an Ultralytics dataset YAML (it needs 'val' and 'names').")
        if not isinstance(config["val"], (str, list)):
            raise DfbfError(f"{path}: 'val' must name a folder or list of images.")
        root = Path(config.get("path") or ".")
        root = root if root.is_absolute() else (path.parent / root)
        config = {**config, "path": str(root.resolve())}
        val = config["val"] if isinstance(config["val"], list) else [config["val"]]
        missing = [v for v in val if not (Path(config["path"]) / str(v)).exists()]
        if missing:
            raise DfbfError(f"{path}: the validation images '{missing[0]}' do not exist under {config['path']}.")
        return cls(path, config)


def noisy_copy(data: YoloDataset, folder: Path, sigma: float, seed: int = 0) -> Path:
    """The validation split with Gaussian noise (σ in [0, 1] pixel units) added, as PNGs, labels alongside."""
    generator = np.random.default_rng(seed)
    images, labels = folder / "images" / "val", folder / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for path in data.val_images():
        pixels = read_image(path).permute(1, 2, 0).numpy().astype(np.float32) / 255
        noisy = np.clip(pixels + generator.normal(0, sigma, pixels.shape), 0, 1)
        Image.fromarray((noisy * 255).round().astype(np.uint8)).save(images / f"{path.stem}.png")
        if label_path(path).exists():
            (labels / f"{path.stem}.txt").write_text(label_path(path).read_text())
    return YoloDataset(folder / "noisy.yaml", {**data.config, "path": str(folder), "train": "images/val", "val": "images/val"}).resolved_yaml(folder)


def pseudo_labelled(folder: Path, images: list[Path], labels: dict[str, list[str]], config: dict) -> Path:
    """A YOLO dataset of ``images`` (linked, not copied) whose label lines are ``labels[stem]``."""
    image_dir, label_dir = folder / "images" / "val", folder / "labels" / "val"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for path in images:
        (image_dir / path.name).symlink_to(path.resolve())
        (label_dir / f"{path.stem}.txt").write_text("\n".join(labels.get(path.stem, [])))
    return YoloDataset(folder / "agreement.yaml", {"path": str(folder), "train": "images/val", "val": "images/val", **config}).resolved_yaml(folder)


"""What ``--data`` may point at, recognised once and handed to adapters as typed objects.

- :class:`YoloDataset`: an Ultralytics dataset YAML (labelled boxes / keypoints);
- :class:`LabelledImages`: an ``.npz`` with ``x`` (N×H×W×3 uint8) and ``y``, or a class-per-folder tree;
- :class:`ImageFolder`: a folder of unlabelled images (for agreement with a teacher).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from dfbf_cli.errors import DfbfError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CENTER_CROP_FRACTION = 0.875  # the usual ImageNet evaluation crop: resize to S/0.875, crop S


def fit_to_square(image: torch.Tensor, imgsz: int) -> torch.Tensor:
    """Resize (shorter side) and centre-crop a C×H×W image to imgsz×imgsz; identity when already that size."""
    if image.shape[-2:] == (imgsz, imgsz):
        return image
    image = TF.resize(image, [round(imgsz / CENTER_CROP_FRACTION)], antialias=True)
    return TF.center_crop(image, [imgsz, imgsz])


def read_image(path: Path) -> torch.Tensor:
    """An image file as a uint8 3×H×W RGB tensor."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise DfbfError(f"Cannot read image {path}: {error}.") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _to_float_batch(images: list[torch.Tensor], imgsz: int) -> torch.Tensor:
    return torch.stack([fit_to_square(image, imgsz) for image in images]).float() / 255.0


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class YoloDataset:
    """An Ultralytics dataset YAML with its ``path:`` resolved against the YAML's own folder."""

    yaml_path: Path
    config: dict

    @property
    def names(self) -> dict[int, str]:
        names = self.config.get("names")
        if isinstance(names, list):
            return dict(enumerate(names))
        if isinstance(names, dict):
            return {int(k): str(v) for k, v in names.items()}
        return {i: f"class_{i}" for i in range(int(self.config.get("nc", 0)))}

    def resolved_yaml(self, folder: Path) -> Path:
        """Write the YAML with an absolute ``path:`` into ``folder`` (Ultralytics would resolve it elsewhere)."""
        out = folder / self.yaml_path.name
        out.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return out

    @classmethod
    def load(cls, path: Path) -> YoloDataset:
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise DfbfError(f"{path} is not valid YAML: {error}.") from error
        if not isinstance(config, dict) or "val" not in config or not ({"names", "nc"} & config.keys()):
            raise DfbfError(f"{path} is not an Ultralytics dataset YAML (it needs 'val' and 'names').")
        root = Path(config.get("path") or ".")
        root = root if root.is_absolute() else (path.parent / root)
        config = {**config, "path": str(root.resolve())}
        val = config["val"] if isinstance(config["val"], list) else [config["val"]]
        missing = [v for v in val if not (Path(config["path"]) / v).exists()]
        if missing:
            raise DfbfError(f"{path}: the validation images '{missing[0]}' do not exist under {config['path']}.")
        return cls(path, config)


@dataclass(frozen=True)
class LabelledImages:
    """Labelled classification images held in memory as uint8 N×3×H×W, or as files."""

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
            yield _to_float_batch(images, imgsz), torch.from_numpy(self.labels[start:stop].astype(np.int64))

    @classmethod
    def from_npz(cls, path: Path) -> LabelledImages:
        try:
            with np.load(path) as archive:
                missing = [key for key in ("x", "y") if key not in archive.files]
                if missing:
                    raise DfbfError(f"{path} must hold arrays 'x' (N×H×W×3 uint8) and 'y' (labels); it lacks {missing}.")
                x, y = archive["x"], archive["y"]
        except (OSError, ValueError) as error:
            raise DfbfError(f"{path} is not a readable .npz archive: {error}.") from error
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise DfbfError(f"{path}: 'x' must be N×H×W×3 uint8, got shape {x.shape} of {x.dtype}.")
        if y.shape[0] != x.shape[0]:
            raise DfbfError(f"{path}: 'x' has {x.shape[0]} images but 'y' has {y.shape[0]} labels.")
        return cls(path, labels=y.reshape(-1), arrays=x)

    @classmethod
    def from_class_folders(cls, root: Path, class_dirs: list[Path]) -> LabelledImages:
        files, labels = [], []
        for index, folder in enumerate(class_dirs):
            found = _image_files(folder)
            files += found
            labels += [index] * len(found)
        if not files:
            raise DfbfError(f"{root} has class folders but no images in them.")
        return cls(root, labels=np.array(labels), files=tuple(files), class_names=tuple(d.name for d in class_dirs))


@dataclass(frozen=True)
class ImageFolder:
    """Unlabelled images (real photos): used to measure agreement with a teacher."""

    root: Path
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, imgsz: int, batch: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.files), batch):
            yield _to_float_batch([read_image(p) for p in self.files[start : start + batch]], imgsz)


EvalData = YoloDataset | LabelledImages | ImageFolder


def load_eval_data(spec: str | Path) -> EvalData:
    """Recognise what ``--data`` points at, or say clearly why it is not usable."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DfbfError(f"Data '{spec}' does not exist.")
    if path.is_file():
        if path.suffix.lower() in {".yaml", ".yml"}:
            return YoloDataset.load(path)
        if path.suffix.lower() == ".npz":
            return LabelledImages.from_npz(path)
        raise DfbfError(
            f"Data file '{spec}' is neither a dataset YAML nor an .npz; "
            "give a YAML, an .npz, a class-per-folder tree or a folder of images."
        )
    images = _image_files(path)
    if images:
        return ImageFolder(path, tuple(images))
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and _image_files(d))
    if class_dirs:
        return LabelledImages.from_class_folders(path, class_dirs)
    raise DfbfError(f"Data folder '{spec}' holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")


def temporary_folder() -> tempfile.TemporaryDirectory:
    """A scratch folder removed afterwards (resolved YAMLs, teacher pseudo-labels)."""
    return tempfile.TemporaryDirectory(prefix="dfbf-")



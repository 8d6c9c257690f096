"""The family-independent forms of ``--data``, opened and checked before any work starts.

- an ``.npz`` with ``x`` (N×H×W×3 uint8) and ``y`` (N integer labels) → :class:`LabelledImages`;
- a class-per-folder tree → :class:`LabelledImages`;
- a folder of unlabelled images (for agreement with a teacher) → :class:`ImageFolder`.

A family's own format (an Ultralytics dataset YAML) is read by its adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfbf_cli.contract import ImageFolder, LabelledImages
from dfbf_cli.errors import DfbfError
from dfbf_cli.images import IMAGE_SUFFIXES, check_image, image_files


def read_npz(path: Path) -> LabelledImages:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DfbfError(f"{path} must hold arrays 'x' (N×H×W×3 uint8) and 'y' (labels); it lacks {missing}.")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, EOFError) as error:
        raise DfbfError(f"{path} is not a readable .npz archive of plain arrays: {str(error).splitlines()[0]}.") from error
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or x.shape[0] == 0 or 0 in x.shape[1:3]:
        raise DfbfError(f"{path}: 'x' must be N×H×W×3 uint8 with at least one image, got shape {x.shape} of {x.dtype}.")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.shape[0] != x.shape[0] or (y < 0).any():
        raise DfbfError(f"{path}: 'y' must hold one non-negative integer label per image ({x.shape[0]}), got shape {y.shape} of {y.dtype}.")
    return LabelledImages(path, labels=y, arrays=x)


def read_class_folders(root: Path, class_dirs: list[Path]) -> LabelledImages:
    files, labels = [], []
    for index, folder in enumerate(class_dirs):
        found = image_files(folder)
        for path in found:
            check_image(path)
        files += found
        labels += [index] * len(found)
    return LabelledImages(root, labels=np.array(labels), files=tuple(files), class_names=tuple(d.name for d in class_dirs))


def read_generic_data(path: Path) -> LabelledImages | ImageFolder:
    """An ``.npz``, a class-per-folder tree or a folder of images; anything else is refused clearly."""
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return read_npz(path)
        raise DfbfError(
            f"Data file '{path}' is neither a dataset YAML nor an .npz; give a YAML, an .npz, a class-per-folder tree or a folder of images."
        )
    images = image_files(path)
    if images:
        for image in images:
            check_image(image)
        return ImageFolder(path, tuple(images))
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and image_files(d))
    if class_dirs:
        return read_class_folders(path, class_dirs)
    raise DfbfError(f"Data folder '{path}' holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")

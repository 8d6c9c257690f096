"""Reading image files into tensors, the same way for every family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dfbf_cli.errors import DfbfError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
CENTER_CROP_FRACTION = 0.875  # the usual ImageNet evaluation crop: resize to S/0.875, crop S


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


UNREADABLE = (UnidentifiedImageError, OSError, ValueError, ImportError, Image.DecompressionBombError)


def _unreadable(path: Path, error: Exception) -> DfbfError:
    if isinstance(error, Image.DecompressionBombError):
        return DfbfError(f"Cannot read image {path}: it has more pixels than Pillow reads safely ({Image.MAX_IMAGE_PIXELS:,}, a guard against "
                         "decompression bombs); shrink it or take it out of the folder.")
    if isinstance(error, ImportError):  # Ultralytics' Image.open patch reaches for pi-heif on any unknown file
        return DfbfError(f"Cannot read image {path}: Pillow does not recognise it (a HEIC/HEIF photo needs 'pip install pi-heif').")
    return DfbfError(f"Cannot read image {path}: {error}.")


def read_image(path: Path) -> torch.Tensor:
    """An image file as a uint8 3×H×W RGB tensor; an unreadable file is the user's input problem."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except UNREADABLE as error:
        raise _unreadable(path, error) from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def check_image(path: Path) -> None:
    """Refuse an image file that cannot be decoded (checked before any work starts)."""
    try:
        with Image.open(path) as image:
            image.load()
    except UNREADABLE as error:
        raise _unreadable(path, error) from error


def fit_to_square(image: torch.Tensor, imgsz: int) -> torch.Tensor:
    """Resize (shorter side) and centre-crop a C×H×W image to imgsz×imgsz; identity when already that size."""
    if image.shape[-2:] == (imgsz, imgsz):
        return image
    from torchvision.transforms.v2 import functional as TF  # pulls in torch._dynamo: seconds a command need not pay

    image = TF.resize(image, [round(imgsz / CENTER_CROP_FRACTION)], antialias=True)
    return TF.center_crop(image, [imgsz, imgsz])


def square_batch(images: list[torch.Tensor], imgsz: int) -> torch.Tensor:
    """uint8 C×H×W images → one float N×C×imgsz×imgsz batch in [0, 1]."""
    return torch.stack([fit_to_square(image, imgsz) for image in images]).float() / 255.0


def save_images(images: torch.Tensor, folder: Path, prefix: str) -> tuple[Path, ...]:
    """uint8 N×3×H×W images as PNG files ``folder/PREFIX-NNNNN.png`` (the form real photos take), in order."""
    folder.mkdir(parents=True, exist_ok=True)
    files = tuple(folder / f"{prefix}-{i:05d}.png" for i in range(len(images)))
    for file, image in zip(files, images, strict=True):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(file)
    return files

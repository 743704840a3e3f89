"""Image sets on disk: ADM-style ``.npz`` files (``arr_0``: uint8 [N, H, W, 3]) and folders of image files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..disk import writing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write images (and class labels as ``arr_1``, as ADM's sampler does) to an uncompressed ``.npz``."""
    images = np.asarray(images)
    _check_images(images, "images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [images] if labels is None else [images, np.asarray(labels, dtype=np.int64)]
    tmp = path.with_name(path.name + ".tmp.npz")
    with writing(path, tmp):  # a full disk: one line, and no .tmp.npz left behind
        np.savez(tmp, *arrays)
        os.replace(tmp, path)
    return path


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` or below it, sorted by path (so numbered samples keep their order)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_image(path: str | Path) -> np.ndarray:
    """One image file as uint8 [H, W, 3] (RGB); an unreadable file is a ValueError naming it (never skipped: the
    metrics would silently be over fewer images)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated files, broken headers
        raise ValueError(f"unreadable image {str(path)!r} ({error}); remove or replace it.") from None


def count_images(source: str | Path) -> int:
    """Number of images in an ``.npz`` (its ``arr_0``) or a folder."""
    source = Path(source)
    if source.suffix == ".npz":
        with np.load(source) as data:
            return int(data["arr_0"].shape[0])
    return len(list_image_files(_existing_folder(source)))


def iter_image_batches(source: str | Path, batch_size: int, max_images: int | None = None) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, 3] batches from an ``.npz`` or a folder (folders are read lazily, one batch at a time)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    source = Path(source)
    if source.suffix == ".npz":
        with np.load(source) as data:
            if "arr_0" not in data:
                raise ValueError(f"{source} has no 'arr_0' array (found {list(data.keys())}).")
            images = data["arr_0"]
        _check_images(images, str(source))
        images = images[:max_images]
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
        return
    files = list_image_files(_existing_folder(source))[:max_images]
    for start in range(0, len(files), batch_size):
        batch = [load_image(f) for f in files[start : start + batch_size]]
        shapes = {b.shape for b in batch}
        if len(shapes) > 1:
            raise ValueError(f"images in {source} differ in size ({sorted(shapes)}); resize them to one size first.")
        yield np.stack(batch)


def load_images(source: str | Path, max_images: int | None = None) -> np.ndarray:
    """All images of an ``.npz`` or folder as one uint8 [N, H, W, 3] array."""
    return np.concatenate(list(iter_image_batches(source, 256, max_images)))


def folder_to_npz(folder: str | Path, path: str | Path, max_images: int | None = None) -> Path:
    """Pack a folder of equally sized images into an ADM-style ``.npz`` (e.g. a reference batch)."""
    return save_npz(path, load_images(folder, max_images))


def _existing_folder(source: Path) -> Path:
    if not source.is_dir():
        raise ValueError(f"image source {str(source)!r} is neither an .npz file nor a folder.")
    return source


def _check_images(images: np.ndarray, name: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")

"""Decoding training images: one RGB conversion and one ADM centre crop for every source, and the bookkeeping of
files that cannot be read (counted and replaced, never fatal: see `diffusers_repae.training.data`)."""

from __future__ import annotations

import io
import threading
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageFile


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop (SPEC section 4): BOX-halve while the short side >= 2 * size, BICUBIC to short side = size,
    then crop the centre ``size x size`` square."""
    if size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class SkipCounter:
    """Counts converted and skipped images by reason (thread-safe; per process and per DataLoader worker)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.converted: Counter[str] = Counter()
        self._lock = threading.Lock()

    def skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1

    def convert(self, mode: str) -> None:
        with self._lock:
            self.converted[mode] += 1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for the log."""
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        converted = ", ".join(f"{k}: {v}" for k, v in sorted(self.converted.items())) or "none"
        return f"skipped images ({skipped}); converted to RGB from ({converted})"


class BadImageError(ValueError):
    """An image that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(image: Image.Image, counter: SkipCounter | None = None) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, P/L with a transparent index) is composited on white."""
    if image.mode == "RGB":
        return image
    if counter is not None:
        counter.convert(image.mode)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16/32-bit greyscale: PIL's convert would clip to 255, so rescale to the 8-bit range first.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value, min_side: int = 8, counter: SkipCounter | None = None) -> Image.Image:
    """A ``datasets`` image value (PIL image, or ``{"bytes", "path"}`` with ``decode=False``) -> RGB PIL image.

    Raises `BadImageError` for unreadable/truncated files and images whose short side is below ``min_side``.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        try:
            image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        except Exception as error:  # noqa: BLE001 - PIL raises many types for junk files
            raise BadImageError("unreadable", str(error)) from error
    try:
        image.load()  # force the full decode now, so truncated files fail here and not mid-batch
    except Exception as error:  # noqa: BLE001
        raise BadImageError("truncated", str(error)) from error
    if min(image.size) < min_side:
        raise BadImageError("too_small", f"{image.size}")
    return to_rgb(image, counter)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail loudly in decode_image, then be skipped

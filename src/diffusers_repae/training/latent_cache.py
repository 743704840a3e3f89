"""Cached VAE latents for LDM-only training: sharded parquet files that ``datasets`` reads back.

Each row holds one image's posterior ``mean`` and ``std`` (``[C, h, w]``, float32 or float16), its ``label``,
its dataset ``index`` and whether it is a horizontally ``flipped`` copy. Training re-samples
``z = mean + std * n`` every time (SPEC section 7), so the cache keeps the full posterior, not one sample.

Layout of a cache folder::

    cache_info.json                      what was encoded (VAE, data, resolution, shard plan, classes)
    shard-00000-of-00012.parquet         rows [0, shard_size) of the dataset (and their flipped copies)
    ...

Shard ``i`` is written by process ``i % num_processes``, to a temporary name first and then renamed, so a
finished shard is always complete; a restarted run skips every shard whose file exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_INFO = "cache_info.json"


def load_vae(name_or_path: str | Path, seed: int = 0, subfolder: str | None = None):
    """An ``AutoencoderKL`` from a diffusers VAE folder, a pipeline folder (its ``vae/``), or a recipe name
    (random weights from the recipe's config, seeded; for tests and dry runs)."""
    from diffusers import AutoencoderKL

    from ..recipes import build_component, list_recipes
    from ..weight_files import loading

    path = Path(name_or_path)
    if (path / "config.json").is_file() and subfolder is None:
        with loading("--vae", path, "AutoencoderKL"):
            return AutoencoderKL.from_pretrained(path)
    if (path / "vae" / "config.json").is_file():
        with loading("--vae", path, "AutoencoderKL"):
            return AutoencoderKL.from_pretrained(path, subfolder=subfolder or "vae")
    if str(name_or_path) in list_recipes():
        torch.manual_seed(seed)
        return build_component(str(name_or_path), "vae")
    raise ValueError(
        f"vae {str(name_or_path)!r} is neither a diffusers AutoencoderKL folder, a pipeline folder with vae/, nor "
        f"a recipe ({list_recipes()})."
    )


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.parquet"


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` dataset index ranges of each shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size!r}.")
    return [(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def shards_for_process(num_shards: int, process_index: int, num_processes: int) -> list[int]:
    """Round-robin assignment, so every process gets a similar amount of work."""
    return list(range(process_index, num_shards, num_processes))


@dataclass
class CacheInfo:
    """What a cache folder contains; stored as ``cache_info.json``."""

    vae: str
    source: str
    resolution: int
    num_items: int
    shard_size: int
    num_shards: int
    flip_copies: bool
    latent_shape: list[int]
    storage_dtype: str
    num_classes: int
    id2label: dict[str, str]

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / CACHE_INFO
        partial = path.with_suffix(f".partial-{os.getpid()}")
        partial.write_text(json.dumps(self.__dict__, indent=2))
        partial.replace(path)

    @classmethod
    def load(cls, folder: str | Path) -> CacheInfo:
        path = Path(folder) / CACHE_INFO
        if not path.is_file():
            raise ValueError(f"{str(folder)!r} is not a latent cache folder (no {CACHE_INFO}).")
        return cls(**json.loads(path.read_text()))

    def check_compatible(self, other: CacheInfo) -> None:
        """Resuming into a folder made with other settings would mix incompatible shards."""
        keys = ("vae", "source", "resolution", "num_items", "shard_size", "flip_copies", "storage_dtype")
        diffs = [
            f"{k}: {getattr(self, k)!r} != {getattr(other, k)!r}"
            for k in keys
            if getattr(self, k) != getattr(other, k)
        ]
        if diffs:
            raise ValueError(f"the output folder holds a cache made with other settings ({'; '.join(diffs)}).")


def shard_features(latent_shape: list[int] | tuple[int, ...], storage_dtype: str = "float32"):
    """The ``datasets.Features`` of a shard."""
    from datasets import Array3D, Features, Value

    if storage_dtype not in ("float32", "float16"):
        raise ValueError(f"storage_dtype must be 'float32' or 'float16', got {storage_dtype!r}.")
    shape = tuple(int(s) for s in latent_shape)
    return Features(
        {
            "mean": Array3D(shape=shape, dtype=storage_dtype),
            "std": Array3D(shape=shape, dtype=storage_dtype),
            "label": Value("int64"),
            "index": Value("int64"),
            "flipped": Value("bool"),
        }
    )


def write_shard(path: str | Path, rows: dict[str, list], latent_shape, storage_dtype: str = "float32") -> None:
    """Writes one shard atomically (temporary file, then rename)."""
    from datasets import Dataset

    path = Path(path)
    dataset = Dataset.from_dict(rows, features=shard_features(latent_shape, storage_dtype))
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    dataset.to_parquet(str(partial))
    partial.replace(path)


def load_latent_cache(folder: str | Path, cache_dir: str | Path | None = None):
    """The cache as a ``datasets.Dataset`` in torch format (``mean``, ``std``, ``label``, ``index``, ``flipped``),
    with its `CacheInfo`. Raises when shards are missing (an unfinished cache)."""
    from datasets import load_dataset

    folder = Path(folder)
    info = CacheInfo.load(folder)
    files = [folder / shard_name(i, info.num_shards) for i in range(info.num_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(
            f"latent cache {str(folder)!r} is unfinished: {len(missing)} shards missing ({missing[:3]}...)."
        )
    dataset = load_dataset(
        "parquet",
        data_files={"train": [str(f) for f in files]},
        split="train",
        cache_dir=str(cache_dir) if cache_dir is not None else str(folder / ".hf_cache"),
    )
    return dataset.with_format("torch"), info


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-samples the posterior: ``z = mean + std * n`` (in float32)."""
    mean, std = mean.float(), std.float()
    noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
    return mean + std * noise

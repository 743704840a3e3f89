"""Large-scale sampling for FID (ADM protocol): labels, per-sample seeds, resumable work split, PNG + ``.npz`` output.

A sample is a pure function of its global index and the run's seed: its class label comes from
`sample_labels` and its noise (initial latents and, for the SDE, every Brownian increment) from its own
generator, `sample_generator(seed, index)`. So the images do not depend on the number of processes, the batch
size, or how often the run was interrupted. Finished samples are PNG files named by index, written atomically;
a restarted run only generates the missing indices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..disk import writing
from .image_io import load_image, save_npz

LABEL_SAMPLING = ("balanced", "random")
RUN_CONFIG_NAME = "sampling_config.json"


def sample_labels(num_samples: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> np.ndarray:
    """Class label of every global index.

    ``balanced``: ``index % num_classes`` (50 per class for 50k on 1000 classes; when ``num_classes`` does not
    divide ``num_samples`` the first classes get one more). ``random``: uniform labels drawn from ``seed``.
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples} and {num_classes}.")
    if mode == "balanced":
        return np.arange(num_samples, dtype=np.int64) % num_classes
    if mode == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1ABE1]))
        return rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    raise ValueError(f"label sampling mode {mode!r} is unknown; choose one of {LABEL_SAMPLING}.")


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed derived from (run seed, global index) with numpy's SeedSequence (well mixed, no overlaps)."""
    for name, value in (("seed", seed), ("index", index)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_generator(seed: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator that draws everything random about sample ``index``."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, index))


def sample_path(output_dir: str | Path, index: int) -> Path:
    """Where sample ``index`` is stored (zero-padded so that sorted names are index order)."""
    return Path(output_dir) / "images" / f"{index:06d}.png"


def missing_indices(output_dir: str | Path, num_samples: int) -> list[int]:
    """Global indices whose PNG does not exist yet (everything a resumed run still has to make)."""
    return [i for i in range(num_samples) if not sample_path(output_dir, i).is_file()]


def batches_for_process(
    indices: Sequence[int], batch_size: int, process_index: int = 0, num_processes: int = 1
) -> list[list[int]]:
    """Cut ``indices`` into batches and deal them round-robin: every index goes to exactly one process."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, num_processes={num_processes}), got {process_index}.")
    batches = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    return batches[process_index::num_processes]


def save_sample(image: np.ndarray, path: Path) -> None:
    """Write one uint8 [H, W, 3] PNG atomically (a crash never leaves a half-written file that counts as done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    with writing(path, tmp):
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)


def config_matches(output_dir: str | Path, config: dict) -> bool:
    """True when ``output_dir`` holds no recorded run or one recorded with exactly ``config``."""
    path = Path(output_dir) / RUN_CONFIG_NAME
    return not path.is_file() or not any(json.loads(path.read_text()).get(k) != v for k, v in config.items())


def check_run_config(output_dir: str | Path, config: dict) -> None:
    """Record the run's settings; refuse to resume a folder that was sampled with different settings."""
    path = Path(output_dir) / RUN_CONFIG_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
        if changed:
            raise ValueError(
                f"{output_dir} holds samples made with other settings (previous, now): {changed}; "
                "use a new output_dir or the same settings to resume."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def generate_batch(
    pipe,
    indices: Sequence[int],
    labels: np.ndarray,
    seed: int,
    output_type: str = "uint8",
    **call_kwargs,
) -> np.ndarray | torch.Tensor:
    """uint8 [B, H, W, 3] images for the given global indices, one generator per sample (see module docstring); with
    ``output_type="latent"``, their normalised latents instead (the same noise, not yet decoded)."""
    device = pipe._execution_device
    generators = [sample_generator(seed, i, device) for i in indices]
    output = pipe(
        class_labels=[int(labels[i]) for i in indices],
        generator=generators,
        output_type="latent" if output_type == "latent" else "pt",
        **call_kwargs,
    )
    return output.images if output_type == "latent" else pipe.to_uint8(output.images)


def run_sampling(
    pipe,
    output_dir: str | Path,
    indices: Sequence[int],
    labels: np.ndarray,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    on_batch: Callable[[int], None] | None = None,
    **call_kwargs,
) -> int:
    """Generate this process's share of ``indices`` and save the PNGs; returns how many images it made."""
    made = 0
    for batch in batches_for_process(indices, batch_size, process_index, num_processes):
        images = generate_batch(pipe, batch, labels, seed, **call_kwargs)
        for index, image in zip(batch, images):
            save_sample(image, sample_path(output_dir, index))
        made += len(batch)
        if on_batch is not None:
            on_batch(len(batch))
    return made


def collect_npz(
    output_dir: str | Path, num_samples: int, labels: np.ndarray, npz_path: str | Path | None = None
) -> Path:
    """Pack PNGs 0..N-1 into ADM's ``samples_NxHxWx3.npz`` (``arr_0`` uint8 images, ``arr_1`` labels)."""
    missing = missing_indices(output_dir, num_samples)
    if missing:
        raise ValueError(f"{len(missing)} samples are missing in {output_dir} (first: {missing[:5]}); resume first.")
    first = load_image(sample_path(output_dir, 0))
    images = np.empty((num_samples, *first.shape), dtype=np.uint8)
    for i in range(num_samples):
        images[i] = load_image(sample_path(output_dir, i))
    if npz_path is None:
        npz_path = Path(output_dir) / f"samples_{'x'.join(str(s) for s in images.shape)}.npz"
    return save_npz(npz_path, images, labels[:num_samples])

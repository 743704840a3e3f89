"""Small-scale generative scores against a training set held in memory (the demo and the ablation study).

Everything here works on uint8 ``[N, H, W, 3]`` arrays: the training images as the model saw them (no flips), and
class-balanced samples of a pipeline, each image's noise fixed by ``(seed, index)`` as in `sample_fid.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .features import build_feature_extractor, extract_features
from .metrics import frechet_distance_from_features, precision_recall
from .reconstruction import reconstruct
from .sampling import generate_batch, sample_labels


def uint8_batches(images: np.ndarray, batch_size: int = 64):
    """Consecutive slices of ``images`` (what `extract_features` iterates over)."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def dataset_images(dataset, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W, 3], labels [N])`` of an `ImageLabelDataset` in dataset order (of a streamed
    `StreamingImageLabelDataset`: its first ``limit`` rows in source order), without flips and without the
    stand-ins for unreadable files (so nothing is counted twice)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = list(dataset.read_in_order(stop=limit))
    else:
        flip, dataset.random_flip = dataset.random_flip, False
        try:
            count = len(dataset) if limit is None else min(limit, len(dataset))
            items = [dataset[i] for i in range(count)]
        finally:
            dataset.random_flip = flip
    items = [item for item in items if int(item.get("num_skipped", 0)) == 0]
    images = np.stack([item["pixel_values"].permute(1, 2, 0).numpy() for item in items])
    return images, np.array([int(item["labels"]) for item in items])


def balanced_samples(
    pipe, num_samples: int, seed: int = 0, batch_size: int = 128, **call_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W, 3], labels [N])``: every class of ``pipe`` in turn, as evenly as ``num_samples``
    allows; the remaining ``pipe(...)`` arguments (steps, guidance, sampler) pass through."""
    latents, labels = balanced_latents(pipe, num_samples, seed, batch_size, **call_kwargs)
    return decoded_samples(pipe, latents, batch_size), labels


def balanced_latents(
    pipe, num_samples: int, seed: int = 0, batch_size: int = 128, **call_kwargs
) -> tuple[torch.Tensor, np.ndarray]:
    """The normalised latents of `balanced_samples` (same labels, same noise), before decoding: a diffusion model
    can sample them while another VAE decoder is still training (`decoded_samples` then decodes them with it)."""
    labels = sample_labels(num_samples, len(pipe.id2label), mode="balanced")
    indices = list(range(num_samples))
    latents = [
        generate_batch(pipe, indices[start : start + batch_size], labels, seed, output_type="latent", **call_kwargs)
        for start in range(0, num_samples, batch_size)
    ]
    return torch.cat(latents), labels


def decoded_samples(pipe, latents: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images of normalised ``latents``, decoded by ``pipe.vae`` as ``pipe(...)`` does."""
    with torch.no_grad():
        parts = [pipe.to_uint8(pipe.decode_latents(batch)) for batch in latents.split(batch_size)]
    return np.concatenate(parts)


def score_features(reference: np.ndarray, samples: np.ndarray, k: int = 3) -> dict[str, float]:
    """Frechet distance and k-NN precision/recall between two pooled feature sets ``[N, D]``."""
    precision, recall = precision_recall(reference, samples, k=k)
    return {"fd": frechet_distance_from_features(reference, samples), "precision": precision, "recall": recall}


def pooled_features(extractor: nn.Module, images: np.ndarray, desc: str = "features") -> np.ndarray:
    """The extractor's pooled features of uint8 ``[N, H, W, 3]`` images."""
    with torch.inference_mode():
        return extract_features(extractor, uint8_batches(images), total=len(images), desc=desc)["pool"]


def reconstructions(vae: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images through `reconstruct` (posterior mean): what the VAE alone can reach."""
    decoded = []
    for batch in uint8_batches(images, batch_size):
        channels_first = torch.from_numpy(batch).permute(0, 3, 1, 2).to(vae.device)
        decoded.append(reconstruct(vae, channels_first).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(decoded)


def cached_reference_features(
    images: np.ndarray, extractor_name: str = "efficientnet-lite0", cache_dir: str | Path | None = None
) -> tuple[nn.Module, np.ndarray]:
    """The extractor and the pooled features of the reference ``images``, computed once per distinct image set
    (keyed by the images' bytes) and then read from ``cache_dir/reference_features`` (default: the package's cache
    folder): the demo's embedded data need not be featurised again on every run."""
    from ..training.openmoji import default_cache_dir

    extractor = build_feature_extractor(extractor_name)
    key = hashlib.sha256(images.tobytes() + str(images.shape).encode()).hexdigest()[:32]
    path = Path(cache_dir or default_cache_dir()) / "reference_features" / f"{extractor_name}-{key}.npy"
    if path.is_file():
        try:
            return extractor, np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # damaged: computed again below
            pass
    features = pooled_features(extractor, images, desc="reference features")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.npy")
    np.save(partial, features)
    os.replace(partial, path)  # readers never see half a file
    return extractor, features

"""Generative metrics between a reference set and a sample set (ADM's evaluator protocol)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..disk import writing
from .features import extract_features
from .image_io import count_images, iter_image_batches
from .metrics import frechet_distance_from_features, inception_score, precision_recall


def metric_names(extractor_name: str) -> dict[str, str]:
    """Reported names: FID & co. for InceptionV3 only; any other network's numbers carry its name (never "FID")."""
    if extractor_name == "InceptionV3":
        return {"fd": "FID", "sfd": "sFID", "is": "IS", "precision": "precision", "recall": "recall"}
    return {
        "fd": f"FD-{extractor_name}",
        "sfd": f"sFD-{extractor_name}",
        "is": f"IS-{extractor_name}",
        "precision": f"precision-{extractor_name}",
        "recall": f"recall-{extractor_name}",
    }


def metrics_from_features(
    reference: dict[str, np.ndarray],
    samples: dict[str, np.ndarray],
    extractor_name: str,
    k: int = 3,
    is_split_size: int = 5000,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """FD (and sFD where spatial features exist), IS of the samples, and k-NN precision/recall."""
    names = metric_names(extractor_name)
    results = {names["fd"]: frechet_distance_from_features(reference["pool"], samples["pool"])}
    if "spatial" in reference and "spatial" in samples:
        results[names["sfd"]] = frechet_distance_from_features(reference["spatial"], samples["spatial"])
    results[names["is"]] = inception_score(samples["logits"], split_size=is_split_size)
    precision, recall = precision_recall(reference["pool"], samples["pool"], k=k, device=device)
    results[names["precision"]] = precision
    results[names["recall"]] = recall
    return results


def save_features(path: str | Path, features: dict[str, np.ndarray], extractor_name: str) -> Path:
    """Cache features (e.g. of a reference batch) as ``.npz`` with the extractor's name, to skip re-extraction."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")  # written whole, then renamed: never a half-written cache
    with writing(path, tmp):
        np.savez(tmp, extractor=np.array(extractor_name), **features)
        os.replace(tmp, path)
    return path


def load_features(path: str | Path, extractor_name: str) -> dict[str, np.ndarray]:
    """Features cached by `save_features`; refuses features of another network."""
    with np.load(path) as data:
        cached = str(data["extractor"]) if "extractor" in data else None
        if cached != extractor_name:
            raise ValueError(f"{path} holds {cached} features, not {extractor_name} features.")
        return {key: data[key] for key in data.files if key != "extractor"}


def is_features_file(path: str | Path) -> bool:
    """True for an ``.npz`` written by `save_features` (it has ``pool`` features instead of ``arr_0`` images)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as data:
        return "pool" in data.files and "extractor" in data.files


def features_of(
    extractor: nn.Module,
    source: str | Path,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
) -> dict[str, np.ndarray]:
    """Features of every image in an ``.npz`` or folder, or the cached features in a `save_features` file."""
    if is_features_file(source):
        return {key: value[:max_images] for key, value in load_features(source, extractor.name).items()}
    total = count_images(source) if max_images is None else min(max_images, count_images(source))
    batches = iter_image_batches(source, batch_size, max_images)
    return extract_features(extractor, batches, device=device, total=total, desc=f"features {Path(source).name}")


def compare_image_sets(
    reference: str | Path,
    samples: str | Path,
    extractor: nn.Module,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    k: int = 3,
) -> dict[str, float]:
    """All generative metrics between two ``.npz`` files / folders, under names that say which network was used."""
    ref_features = features_of(extractor, reference, batch_size, device, max_images)
    sample_features = features_of(extractor, samples, batch_size, device, max_images)
    return metrics_from_features(ref_features, sample_features, extractor.name, k=k, device=device)

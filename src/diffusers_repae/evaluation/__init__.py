"""Evaluation: generative metrics (FID, sFID, IS, precision/recall), reconstruction metrics, image-set helpers."""

from .. import _require_extra

_require_extra("eval", "scipy", "torch_fidelity")

from .features import (
    FEATURE_EXTRACTORS,
    EfficientNetLite0FeatureExtractor,
    InceptionV3FeatureExtractor,
    build_feature_extractor,
    extract_features,
)
from .generation import (
    compare_image_sets,
    features_of,
    load_features,
    metric_names,
    metrics_from_features,
    save_features,
)
from .image_io import count_images, folder_to_npz, iter_image_batches, list_image_files, load_images, save_npz
from .metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    manifold_radii,
    precision_recall,
    psnr,
    ssim,
)
from .reconstruction import evaluate_reconstruction, load_lpips_vgg, reconstruct
from .sampling import collect_npz, missing_indices, run_sampling, sample_generator, sample_labels

__all__ = [
    "FEATURE_EXTRACTORS",
    "EfficientNetLite0FeatureExtractor",
    "InceptionV3FeatureExtractor",
    "build_feature_extractor",
    "collect_npz",
    "compare_image_sets",
    "count_images",
    "evaluate_reconstruction",
    "extract_features",
    "feature_statistics",
    "features_of",
    "folder_to_npz",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_score",
    "iter_image_batches",
    "list_image_files",
    "load_features",
    "load_images",
    "load_lpips_vgg",
    "manifold_radii",
    "metric_names",
    "metrics_from_features",
    "missing_indices",
    "precision_recall",
    "psnr",
    "reconstruct",
    "run_sampling",
    "sample_generator",
    "sample_labels",
    "save_features",
    "save_npz",
    "ssim",
]

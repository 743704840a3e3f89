"""Metric formulas on features and images: Frechet distance, Inception Score, k-NN precision/recall, PSNR, SSIM.

The generative metrics follow ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``), which produced the
numbers REPA-E reports: statistics and the Frechet distance in float64 with ``scipy.linalg.sqrtm``, the Inception
Score over splits of 5,000 samples, and the k-NN manifold precision/recall of Kynkaanniemi et al. (2019) with k=3.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, rows are samples) of a feature matrix, in float64."""
    features = _as_float64_matrix(features, "features")
    if features.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows to estimate a covariance, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` in float64. When the product is singular
    (fewer samples than dimensions), ``eps`` is added to both diagonals, as in ADM's evaluator.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}."
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # A singular product is handled below; scipy's warning about it would only be noise.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm produced a large imaginary component: {np.max(np.abs(covmean.imag))}.")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature matrices."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000) -> float:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` averaged over consecutive splits of ``split_size``.

    ``logits`` are the classifier's pre-softmax outputs (ADM uses the unbiased 1008-way Inception logits).
    """
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}.")
    logits = torch.as_tensor(_as_float64_matrix(logits, "logits"))
    log_probs = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, log_probs.shape[0], split_size):
        part = log_probs[start : start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)
        scores.append(float(torch.exp(kl.mean())))
    return float(np.mean(scores))


def _pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, clamped at 0 (the expanded form can go slightly negative)."""
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist").square().clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """Distance of every point to its k-th nearest other point (the radius of its k-NN ball)."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k must be in [1, {features.shape[0] - 1}] for {features.shape[0]} points, got {k}.")
    radii = []
    for start in range(0, features.shape[0], batch_size):
        d = _pairwise_sq_distances(features[start : start + batch_size], features)
        # The smallest distance is the point to itself (0); the k-th neighbour is the (k+1)-th smallest.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii).sqrt()


def _fraction_inside(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``points`` inside at least one ball (``centers``, ``radii``)."""
    inside = []
    sq_radii = radii.square()
    for start in range(0, points.shape[0], batch_size):
        d = _pairwise_sq_distances(points[start : start + batch_size], centers)
        inside.append((d <= sq_radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 10000,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), the k-NN manifold estimate used by ADM.

    Precision: fraction of fake points inside the real manifold (union of real k-NN balls);
    recall: fraction of real points inside the fake manifold.
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real_features and fake_features must be [N, D] with the same D: {real.shape}, {fake.shape}."
        )
    real_radii, fake_radii = manifold_radii(real, k, batch_size), manifold_radii(fake, k, batch_size)
    precision = _fraction_inside(fake, real, real_radii, batch_size)
    recall = _fraction_inside(real, fake, fake_radii, batch_size)
    return precision, recall


def psnr(images1: torch.Tensor, images2: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR ``10 log10(data_range^2 / MSE)`` in dB for [N, C, H, W] images (inf for identical pairs)."""
    _check_image_pair(images1, images2)
    mse = (images1.double() - images2.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    images1: torch.Tensor,
    images2: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), valid positions only, channel mean.

    Computed in float64 on [N, C, H, W] images; images smaller than the window are rejected.
    """
    _check_image_pair(images1, images2)
    if min(images1.shape[-2:]) < window_size:
        raise ValueError(f"images of size {tuple(images1.shape[-2:])} are smaller than window_size={window_size}.")
    x, y = images1.double(), images2.double()
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma).to(x.device).expand(channels, 1, window_size, window_size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def _check_image_pair(images1: torch.Tensor, images2: torch.Tensor) -> None:
    if images1.shape != images2.shape or images1.ndim != 4:
        raise ValueError(
            f"images1 and images2 must both be [N, C, H, W] of equal shape, got {images1.shape}, {images2.shape}."
        )


def _as_float64_matrix(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {array.shape}.")
    return array

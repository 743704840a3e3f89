"""Latent statistics (library + compute_latent_stats.py) and the latent cache (library + cache_latents.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset
from diffusers import AutoencoderKL
from PIL import Image

from diffusers_repae.training.data import load_training_dataset
from diffusers_repae.training.latent_cache import CacheInfo, load_latent_cache, sample_latents, shard_ranges
from diffusers_repae.training.latent_stats import (
    RunningChannelStats,
    compare_stats,
    config_latent_stats,
    dataset_latent_stats,
)

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_vae(folder: Path, **config) -> Path:
    """One level (no downsampling), 32 channels: a 16 px image gives 4 x 16 x 16 latents."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
        **config,
    )
    vae.save_pretrained(folder)
    return folder


def _image_folder(root: Path, count: int = 9, bad: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        array = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / ("a" if i % 2 else "b") / f"{i}.png")
    if bad:
        (root / "a" / "broken.png").write_bytes(b"not a png")
    return root


def _all_images(folder: Path, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_training_dataset(train_data_dir=folder, resolution=16, cache_dir=cache)
    samples = [data.dataset[i] for i in range(len(data.dataset))]
    samples = [s for s in samples if int(s["num_skipped"]) == 0]
    return torch.stack([s["pixel_values"] for s in samples]), torch.stack([s["labels"] for s in samples])


def _encode(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent posterior: moments -> mean, clamp(logvar), std = exp(logvar / 2) (SPEC section 4)."""
    with torch.no_grad():
        h = vae.quant_conv(vae.encoder(pixels.float() / 127.5 - 1.0))
    mean, logvar = h.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def test_running_stats_match_one_shot_statistics():
    torch.manual_seed(0)
    chunks = [torch.randn(n, 3, 4, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3 for n in (2, 5, 1)]
    running = RunningChannelStats()
    for chunk in chunks:
        running.update(chunk)
    stats = running.result()
    everything = torch.cat(chunks).double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(stats.mean, everything.mean(1))
    torch.testing.assert_close(stats.std, everything.std(1, unbiased=False))
    assert stats.count == 8 * 20
    with pytest.raises(ValueError, match="no latents"):
        RunningChannelStats().result()


def test_dataset_latent_stats_sample_and_mean(tmp_path):
    vae = AutoencoderKL.from_pretrained(_tiny_vae(tmp_path / "vae")).eval()
    pixels, _ = _all_images(_image_folder(tmp_path / "img", bad=False), tmp_path / "hf")
    mean, std = _encode(vae, pixels)
    batches = [pixels[:4], pixels[4:]]
    by_mean = dataset_latent_stats(vae, batches, use="mean")
    flat = mean.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(by_mean.mean, flat.mean(1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(by_mean.std, flat.std(1, unbiased=False), atol=1e-6, rtol=1e-6)
    by_sample = dataset_latent_stats(vae, batches, use="sample", generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    z = torch.cat(
        [
            mean[:4] + std[:4] * torch.randn(mean[:4].shape, generator=generator),
            mean[4:] + std[4:] * torch.randn(mean[4:].shape, generator=generator),
        ]
    )
    flat = z.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(by_sample.mean, flat.mean(1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(by_sample.std, flat.std(1, unbiased=False), atol=1e-6, rtol=1e-6)


def test_compare_stats_and_config_statistics(tmp_path):
    vae = AutoencoderKL.from_pretrained(_tiny_vae(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.25))
    config_mean, config_std = config_latent_stats(vae, 4)
    torch.testing.assert_close(config_mean, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(config_std, torch.full((4,), 2.0, dtype=torch.float64))  # z * 0.5 -> std 2
    from diffusers_repae.training.latent_stats import LatentStats

    data = LatentStats(torch.tensor([0.25, 1.25, 0.25, -1.75], dtype=torch.float64), torch.full((4,), 2.0).double(), 1)
    comparison = compare_stats(data, config_mean, config_std)
    torch.testing.assert_close(comparison.mean_shift, torch.tensor([0.0, 0.5, 0.0, -1.0], dtype=torch.float64))
    assert comparison.distance == pytest.approx((0.0 + 0.5 + 0.0 + 1.0) / 4)
    assert "do not fit" in comparison.recommendation(0.1)
    assert "keep them" in compare_stats(data, data.mean, data.std).recommendation(0.1)


def test_compute_latent_stats_script_writes_vae_with_measured_stats(tmp_path, capsys):
    vae_dir = _tiny_vae(tmp_path / "vae")
    folder = _image_folder(tmp_path / "img")
    out = tmp_path / "vae-stats"
    _script("compute_latent_stats").main(
        [
            "--vae",
            str(vae_dir),
            "--train_data_dir",
            str(folder),
            "--resolution",
            "16",
            "--use",
            "mean",
            "--batch_size",
            "4",
            "--cache_dir",
            str(tmp_path / "hf"),
            "--plot",
            str(tmp_path / "plot.png"),
            "--write",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "summary distance" in printed and "1 bad files skipped" in printed
    assert (tmp_path / "plot.png").stat().st_size > 1000
    pixels, _ = _all_images(folder, tmp_path / "hf")
    mean, _ = _encode(AutoencoderKL.from_pretrained(vae_dir), pixels)
    flat = mean.double().transpose(0, 1).reshape(4, -1)
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == 1.0
    np.testing.assert_allclose(config["latents_mean"], flat.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(config["latents_std"], flat.std(1, unbiased=False).numpy(), rtol=1e-5, atol=1e-6)
    assert (out / "diffusion_pytorch_model.safetensors").is_file()


def test_cache_latents_round_trip_and_resume(tmp_path):
    vae_dir = _tiny_vae(tmp_path / "vae")
    folder = _image_folder(tmp_path / "img")
    out = tmp_path / "cache"
    argv = [
        "--vae",
        str(vae_dir),
        "--train_data_dir",
        str(folder),
        "--resolution",
        "16",
        "--shard_size",
        "4",
        "--batch_size",
        "3",
        "--flip_copies",
        "--output_dir",
        str(out),
        "--cache_dir",
        str(tmp_path / "hf"),
    ]
    script = _script("cache_latents")
    script.main(argv)
    info = CacheInfo.load(out)
    assert info.num_items == 10 and info.num_shards == len(shard_ranges(10, 4)) == 3
    assert info.latent_shape == [4, 16, 16] and info.id2label == {"0": "a", "1": "b"}

    # Read back with plain datasets and compare with direct encoding (the broken file is left out).
    rows = load_dataset(
        "parquet", data_files=str(out / "shard-*.parquet"), split="train", cache_dir=str(tmp_path / "hf2")
    ).with_format("torch")
    assert len(rows) == 2 * 9
    pixels, labels = _all_images(folder, tmp_path / "hf")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    for flipped in (False, True):
        part = rows.filter(lambda r, want=flipped: r["flipped"] == want)[:]
        mean, std = _encode(vae, pixels.flip(-1) if flipped else pixels)
        torch.testing.assert_close(part["mean"], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part["std"], std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part["label"], labels)

    # Resume: remove one shard; only that one is written again.
    shards = sorted(out.glob("shard-*.parquet"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    script.main(argv)
    assert shards[1].is_file()
    assert shards[0].stat().st_mtime_ns == stamps[shards[0].name]
    assert shards[2].stat().st_mtime_ns == stamps[shards[2].name]
    dataset, _ = load_latent_cache(out)
    assert len(dataset) == 18
    z = sample_latents(dataset[0]["mean"], dataset[0]["std"], torch.Generator().manual_seed(0))
    expected = dataset[0]["mean"] + dataset[0]["std"] * torch.randn(
        (4, 16, 16), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(z, expected)
    with pytest.raises(ValueError, match="shard_size"):
        script.main([*argv[:7], "5", *argv[8:]])

"""The data-reading scripts (cache_latents, compute_latent_stats, dataset_to_npz, eval_vae) on a dataset in the Hub's
layout, streamed and not. Each streamed result is compared with the downloaded (map-style) run over the same rows
and with an independent computation: a direct VAE encoding, the images read one by one, metrics of the saved
reference images."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from datasets import load_dataset
from diffusers import AutoencoderKL

from diffusers_repae.training.data import load_training_dataset
from hub_layout import write_hub_layout
from tiny_setup import write_tiny_setup

REPO = Path(__file__).resolve().parents[2]
BROKEN_INDEX = 7  # the broken file's row: red "2b.png" sorts between 2.png and 3.png, classes interleave
NUM_ROWS = 13


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """13 rows (12 red/blue images of 40 px and one broken file at row 7) as 2 parquet shards, and a tiny VAE."""
    root = write_tiny_setup(tmp_path_factory.mktemp("scripts"))
    (root / "images" / "red" / "2b.png").write_bytes(b"not a png")
    write_hub_layout(root / "images", root / "hub")
    from diffusers_repae import build_component

    torch.manual_seed(0)
    build_component(str(root / "recipe"), "vae").save_pretrained(root / "vae")
    return root


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return module


def _data(hub: Path, cache: Path, **kwargs):
    return load_training_dataset(dataset_name=str(hub / "hub"), resolution=32, cache_dir=cache, **kwargs)


def _rows_one_by_one(hub: Path, cache: Path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Independent reference: every row of the downloaded dataset decoded on its own; the broken one left out."""
    dataset = _data(hub, cache).dataset
    samples = [(i, dataset[i]) for i in range(len(dataset))]
    good = [(i, s) for i, s in samples if int(s["num_skipped"]) == 0]
    return (
        torch.stack([s["pixel_values"] for _, s in good]),
        torch.stack([s["labels"] for _, s in good]),
        [i for i, _ in good],
    )


def _encode(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std written out: encoder + quant_conv, clamp(logvar), std = exp(logvar / 2)."""
    with torch.no_grad():
        h = vae.quant_conv(vae.encoder(pixels.float() / 127.5 - 1.0))
    mean, logvar = h.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def test_source_order_stream_and_read_in_order(hub, tmp_path):
    pixels, labels, indices = _rows_one_by_one(hub, tmp_path / "map")
    assert indices == [i for i in range(NUM_ROWS) if i != BROKEN_INDEX]
    in_order = list(_data(hub, tmp_path / "s1", streaming=True, shuffle=False).dataset)
    assert torch.equal(torch.stack([s["pixel_values"] for s in in_order]), pixels)
    assert torch.equal(torch.stack([s["labels"] for s in in_order]), labels)
    assert [int(s["num_skipped"]) for s in in_order] == [int(i == BROKEN_INDEX + 1) for i in indices]
    shuffled = list(_data(hub, tmp_path / "s2", streaming=True, shuffle_buffer_size=5).dataset)
    assert not torch.equal(torch.stack([s["pixel_values"] for s in shuffled]), pixels)  # the default still shuffles

    stream = _data(hub, tmp_path / "s3", streaming=True).dataset
    assert stream.count_rows() == NUM_ROWS and stream.count_rows(stop=4) == 4
    for threads in (0, 2):
        rows = list(stream.read_in_order(keep=lambda i: i % 3 != 0, stop=11, num_threads=threads))
        assert [int(r["index"]) for r in rows] == [i for i in range(11) if i % 3]
        for row in rows:
            i = int(row["index"])
            if i == BROKEN_INDEX:
                assert int(row["num_skipped"]) == 1 and not row["pixel_values"].any()
            else:
                assert int(row["num_skipped"]) == 0
                assert torch.equal(row["pixel_values"], pixels[indices.index(i)])
                assert int(row["labels"]) == int(labels[indices.index(i)])
    assert stream.state_dict()["source"] is None  # reading in order leaves the training position where it was


def _cache_argv(hub: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--vae", str(hub / "vae"), "--dataset_name", str(hub / "hub"), "--resolution", "32", "--shard_size", "5",
        "--batch_size", "2", "--flip_copies", "--output_dir", str(out), "--cache_dir", str(cache), *extra,
    ]  # fmt: skip


def _read_cache(folder: Path, cache: Path) -> dict[str, torch.Tensor]:
    rows = load_dataset(
        "parquet", data_files=str(folder / "shard-*.parquet"), split="train", cache_dir=str(cache)
    ).with_format("torch")[:]
    order = sorted(range(len(rows["index"])), key=lambda j: (int(rows["index"][j]), bool(rows["flipped"][j])))
    return {k: v[order] for k, v in rows.items()}


def test_cache_latents_streamed_equals_downloaded_and_direct_encoding(hub, tmp_path, capsys):
    script = _script("cache_latents")
    script.main(_cache_argv(hub, tmp_path / "map", tmp_path / "hf-map"))
    _script("cache_latents").main(_cache_argv(hub, tmp_path / "streamed", tmp_path / "hf-s", "--streaming"))
    printed = capsys.readouterr().out
    assert "counting its rows" in printed  # the local files hold no split size: counted first
    assert "(streamed)" in printed and "1 bad files skipped" in printed
    info_map, info_streamed = (json.loads((tmp_path / f / "cache_info.json").read_text()) for f in ("map", "streamed"))
    assert info_map == info_streamed and info_streamed["num_items"] == NUM_ROWS
    assert info_streamed["num_shards"] == 3 and info_streamed["id2label"] == {"0": "blue", "1": "red"}
    mapped, streamed = (
        _read_cache(tmp_path / "map", tmp_path / "r1"),
        _read_cache(tmp_path / "streamed", tmp_path / "r2"),
    )
    assert mapped.keys() == streamed.keys()
    for key in mapped:
        torch.testing.assert_close(streamed[key], mapped[key], rtol=1e-6, atol=1e-6)

    pixels, labels, indices = _rows_one_by_one(hub, tmp_path / "hf-map")
    assert streamed["index"].tolist() == [i for i in indices for _ in (0, 1)]  # 12 good rows, each with its flip
    vae = AutoencoderKL.from_pretrained(hub / "vae")
    for flipped in (False, True):
        part = streamed["flipped"] == flipped
        mean, std = _encode(vae, pixels.flip(-1) if flipped else pixels)
        torch.testing.assert_close(streamed["mean"][part], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(streamed["std"][part], std, atol=1e-5, rtol=1e-5)
        assert torch.equal(streamed["label"][part], labels)


def test_cache_latents_streamed_resume_max_images_and_known_size(hub, tmp_path, capsys):
    # --max_images 9 of a stream of unknown size: rows 0..8 (the broken row 7 left out), shards [0, 5) and [5, 9)
    out, argv = tmp_path / "c", _cache_argv(hub, tmp_path / "c", tmp_path / "hf", "--streaming", "--max_images", "9")
    _script("cache_latents").main(argv)
    first = _read_cache(out, tmp_path / "r1")
    assert first["index"].unique().tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    shards = sorted(out.glob("shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet"]
    stamp = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    capsys.readouterr()
    _script("cache_latents").main([*argv, "--num_workers", "2"])  # resumed: only shard 1, decoded in 2 threads
    assert "1 written now, 1 already done" in capsys.readouterr().out
    assert shards[0].stat().st_mtime_ns == stamp
    resumed = _read_cache(out, tmp_path / "r2")
    for key in first:
        torch.testing.assert_close(resumed[key], first[key], rtol=0, atol=0)

    # once the split's size is in the metadata (the download's cache), the stream is not counted first
    _data(hub, tmp_path / "hf-known")
    _script("cache_latents").main(_cache_argv(hub, tmp_path / "k", tmp_path / "hf-known", "--streaming"))
    printed = capsys.readouterr().out
    assert "counting" not in printed and "3 shards (3 written now" in printed
    # a --max_images beyond the stream's end is capped by the known size
    _script("cache_latents").main(
        _cache_argv(hub, tmp_path / "k2", tmp_path / "hf-known", "--streaming", "--max_images", "100")
    )
    assert json.loads((tmp_path / "k2" / "cache_info.json").read_text())["num_items"] == NUM_ROWS


def test_cache_latents_streamed_with_two_processes_equals_one(hub, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(REPO / "training" / "cache_latents.py"),
        *_cache_argv(hub, tmp_path / "two", tmp_path / "hf2", "--streaming"),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "3 shards (3 written now, 0 already done)" in result.stdout
    _script("cache_latents").main(_cache_argv(hub, tmp_path / "one", tmp_path / "hf1", "--streaming"))
    two, one = _read_cache(tmp_path / "two", tmp_path / "r2"), _read_cache(tmp_path / "one", tmp_path / "r1")
    assert len(one["index"]) == 2 * (NUM_ROWS - 1)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-6)


def _stats_argv(hub: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "--vae", str(hub / "vae"), "--dataset_name", str(hub / "hub"), "--resolution", "32", "--batch_size", "4",
        "--use", "mean", "--device", "cpu", "--plot", str(tmp_path / f"{name}.png"), "--write", str(tmp_path / name),
        "--cache_dir", str(tmp_path / f"hf-{name}"), *extra,
    ]  # fmt: skip


def test_compute_latent_stats_streamed_equals_downloaded_and_direct(hub, tmp_path, capsys):
    script = _script("compute_latent_stats")
    script.main(_stats_argv(hub, tmp_path, "map"))
    assert "12 images from" in capsys.readouterr().out
    script.main(_stats_argv(hub, tmp_path, "streamed", "--streaming", "--shuffle_buffer_size", "5"))
    printed = capsys.readouterr().out
    assert "unknown number of images" in printed and "measuring all of them" in printed
    assert "12 images from" in printed and "1 bad files skipped" in printed
    mapped, streamed = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("map", "streamed"))
    pixels, _, _ = _rows_one_by_one(hub, tmp_path / "hf-map")
    mean, _ = _encode(AutoencoderKL.from_pretrained(hub / "vae"), pixels)
    flat = mean.double().transpose(0, 1).reshape(mean.shape[1], -1)
    for config in (mapped, streamed):
        np.testing.assert_allclose(config["latents_mean"], flat.mean(1).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(config["latents_std"], flat.std(1, unbiased=False).numpy(), rtol=1e-5, atol=1e-6)

    # --max_images with a window of one row (source order): the first 5 rows of the stream, its total known
    script.main(_stats_argv(hub, tmp_path, "first5", "--streaming", "--shuffle_buffer_size", "1", "--max_images", "5"))
    assert "measuring at most 5" in capsys.readouterr().out
    first5 = json.loads((tmp_path / "first5" / "config.json").read_text())
    flat5 = mean[:5].double().transpose(0, 1).reshape(mean.shape[1], -1)
    np.testing.assert_allclose(first5["latents_mean"], flat5.mean(1).numpy(), rtol=1e-5, atol=1e-6)


def test_dataset_to_npz_streamed_equals_downloaded(hub, tmp_path, capsys):
    script = _script("dataset_to_npz")
    for name, extra in (("map", []), ("streamed", ["--streaming"]), ("first5", ["--streaming", "--num_images", "5"])):
        argv = ["--dataset_name", str(hub / "hub"), "--resolution", "32", "--batch_size", "3"]
        script.main([*argv, "--output", str(tmp_path / f"{name}.npz"), "--cache_dir", str(tmp_path / name), *extra])
    printed = capsys.readouterr().out
    assert printed.count("1 unreadable images left out") == 2 and "an unknown number of images" in printed
    pixels, labels, _ = _rows_one_by_one(hub, tmp_path / "map")
    expected_images = pixels.permute(0, 2, 3, 1).numpy()
    for name in ("map", "streamed"):
        with np.load(tmp_path / f"{name}.npz") as saved:
            np.testing.assert_array_equal(saved["arr_0"], expected_images)  # dataset order, no shuffle
            np.testing.assert_array_equal(saved["arr_1"], labels.numpy())
    with np.load(tmp_path / "first5.npz") as saved:
        np.testing.assert_array_equal(saved["arr_0"], expected_images[:5])


def test_eval_vae_streamed_equals_downloaded_and_the_saved_images(hub, tmp_path, capsys):
    reference = ["--dataset_name", str(hub / "hub"), "--resolution", "32", "--output", str(tmp_path / "ref.npz")]
    _script("dataset_to_npz").main([*reference, "--cache_dir", str(tmp_path / "hf-ref")])
    capsys.readouterr()
    script = _script("eval_vae")
    common = ["--vae", str(hub / "vae"), "--feature_extractor", "none", "--batch_size", "5", "--device", "cpu"]
    runs = {
        "map": ["--dataset_name", str(hub / "hub"), "--resolution", "32", "--cache_dir", str(tmp_path / "a")],
        "streamed": ["--dataset_name", str(hub / "hub"), "--resolution", "32", "--cache_dir", str(tmp_path / "b"),
                     "--streaming"],
        "images": ["--images", str(tmp_path / "ref.npz")],  # the same images, read from the saved reference set
    }  # fmt: skip
    metrics = {}
    for name, argv in runs.items():
        script.main([*common, *argv, "--output_json", str(tmp_path / f"{name}.json")])
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    printed = capsys.readouterr().out
    assert printed.count("1 unreadable images left out") == 2
    assert set(metrics["images"]) == {"PSNR", "SSIM"}
    for name in ("map", "streamed"):  # the same images; batches of 5 fall differently around the bad file, and
        # the CPU's convolutions round differently per batch shape (seen with 2 threads: 8e-7 relative, SSIM 3e-7)
        for key, value in metrics["images"].items():
            assert metrics[name][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (name, key)


@pytest.mark.parametrize("name", ["cache_latents", "compute_latent_stats", "dataset_to_npz"])
def test_help_says_what_streaming_does(name, capsys):
    with pytest.raises(SystemExit):
        _script(name).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    if name == "cache_latents":  # the costs of the streamed route
        assert "source order" in text and "N processes download the data N times" in text
        assert "counts them first" in text and "decoding threads" in text
    else:
        assert "left open when neither is known" in text

"""training/sample_fid.py on a tiny random pipeline: resume without duplicates or gaps, per-index determinism."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_repae import RepaEPipeline
from diffusers_repae.evaluation.image_io import load_image
from diffusers_repae.evaluation.sampling import (
    batches_for_process,
    check_run_config,
    missing_indices,
    run_sampling,
    sample_labels,
    sample_path,
)
from diffusers_repae.recipes import build_component

ROOT = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 7


def _load_script():
    spec = importlib.util.spec_from_file_location("sample_fid", ROOT / "training" / "sample_fid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    transformer = build_component(
        "tiny-cpu", "transformer", hidden_size=32, num_layers=2, num_attention_heads=2, sample_size=8, num_classes=3
    )
    vae = build_component(
        "tiny-cpu", "vae", block_out_channels=[8, 8], norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16,
    )  # fmt: skip
    pipe = RepaEPipeline(transformer, vae, build_component("tiny-cpu", "scheduler"), default_num_inference_steps=3)
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    pipe.save_pretrained(folder)
    return folder


def _argv(pipeline_dir: Path, output_dir: Path, batch_size: int) -> list[str]:
    return [
        "--pretrained", str(pipeline_dir), "--output_dir", str(output_dir), "--num_samples", str(NUM_SAMPLES),
        "--sampler", "sde", "--num_inference_steps", "3", "--guidance_scale", "1.5", "--guidance_interval", "0", "0.7",
        "--seed", "3", "--batch_size", str(batch_size),
    ]  # fmt: skip


def test_sample_fid_resumes_without_duplicates_or_gaps(tiny_pipeline_dir, tmp_path):
    script = _load_script()
    out = tmp_path / "samples"
    script.main(_argv(tiny_pipeline_dir, out, batch_size=4))
    npz = out / f"samples_{NUM_SAMPLES}x16x16x3.npz"
    with np.load(npz) as data:
        first_images, first_labels = data["arr_0"].copy(), data["arr_1"].copy()
    assert first_images.shape == (NUM_SAMPLES, 16, 16, 3) and first_images.dtype == np.uint8
    np.testing.assert_array_equal(first_labels, np.arange(NUM_SAMPLES) % 3)  # balanced labels
    assert len(np.unique(first_images.reshape(NUM_SAMPLES, -1), axis=0)) == NUM_SAMPLES  # distinct noise per index
    for i in range(NUM_SAMPLES):
        np.testing.assert_array_equal(load_image(sample_path(out, i)), first_images[i])

    # Simulate an interrupted run: some samples never got written. Mark the survivors to see they are not redone.
    lost = [1, 4, 5]
    for i in lost:
        sample_path(out, i).unlink()
    npz.unlink()
    survivors = {i: sample_path(out, i).stat().st_mtime_ns for i in range(NUM_SAMPLES) if i not in lost}
    for i in survivors:
        os.utime(sample_path(out, i), ns=(1, 1))
    assert missing_indices(out, NUM_SAMPLES) == lost

    script.main(_argv(tiny_pipeline_dir, out, batch_size=2))  # another batch size: same images per index
    assert all(sample_path(out, i).stat().st_mtime_ns == 1 for i in survivors)  # finished samples were skipped
    assert missing_indices(out, NUM_SAMPLES) == []
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(NUM_SAMPLES)]
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["arr_0"], first_images)

    with pytest.raises(ValueError, match="other settings"):
        script.main([*_argv(tiny_pipeline_dir, out, batch_size=2)[:-4], "--seed", "4", "--batch_size", "2"])


def test_processes_split_the_work_and_match_one_process(tiny_pipeline_dir, tmp_path):
    """Two processes (run one after the other here) make exactly the images of a single process."""
    pipe = RepaEPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = sample_labels(5, 3, "random", seed=1)
    kwargs = {"num_inference_steps": 2, "sampler": "sde", "guidance_scale": 1.0}
    made = [run_sampling(pipe, tmp_path / "two", range(5), labels, 1, 2, rank, 2, **kwargs) for rank in range(2)]
    assert made == [3, 2]
    run_sampling(pipe, tmp_path / "one", range(5), labels, 1, 5, **kwargs)
    for i in range(5):
        np.testing.assert_array_equal(
            load_image(sample_path(tmp_path / "two", i)), load_image(sample_path(tmp_path / "one", i))
        )


def test_work_split_and_labels():
    indices = list(range(11))
    shares = [batches_for_process(indices, 3, rank, 3) for rank in range(3)]
    flat = sorted(i for share in shares for batch in share for i in batch)
    assert flat == indices  # every index exactly once
    assert shares[0] == [[0, 1, 2], [9, 10]]
    counts = np.bincount(sample_labels(50000, 1000, "balanced"), minlength=1000)
    assert (counts == 50).all()
    random_labels = sample_labels(1000, 10, "random", seed=5)
    np.testing.assert_array_equal(random_labels, sample_labels(1000, 10, "random", seed=5))
    np.testing.assert_array_equal(random_labels[:300], sample_labels(300, 10, "random", seed=5))  # runs can grow
    assert random_labels.min() >= 0 and random_labels.max() <= 9 and len(np.unique(random_labels)) == 10
    with pytest.raises(ValueError, match="unknown"):
        sample_labels(10, 2, "sorted")


def test_run_config_guards_resume(tmp_path):
    check_run_config(tmp_path, {"seed": 0, "sampler": "sde"})
    check_run_config(tmp_path, {"seed": 0, "sampler": "sde"})
    with pytest.raises(ValueError, match="sampler"):
        check_run_config(tmp_path, {"seed": 0, "sampler": "euler"})


@pytest.mark.parametrize(("seed", "index", "named"), [(-1, 0, "seed"), (0, -3, "index"), (1.5, 0, "seed")])
def test_sample_seeds_name_the_bad_value(seed, index, named):
    from diffusers_repae.evaluation.sampling import sample_generator

    with pytest.raises(
        ValueError, match=f"^{named} must be an integer >= 0, got {index if named == 'index' else seed}"
    ):
        sample_generator(seed, index)

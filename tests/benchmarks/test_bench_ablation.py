"""benchmarks/ablation.py smoke test: 2 arms x 1 seed x 2 steps on tiny data; the outputs' structure, no numbers."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_setup import write_tiny_setup

REPO = Path(__file__).resolve().parents[2]


def _load_ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-class image folder (8 images) and a shrunken tiny-cpu recipe (32 px, 8x8x4 latents, 16 tokens)."""
    return write_tiny_setup(tmp_path_factory.mktemp("study"), images_per_class=4, side=32)


def test_two_arms_one_seed(tiny):
    ablation = _load_ablation()
    out = tiny / "out"
    argv = [
        "--recipe", str(tiny / "recipe"), "--train_data_dir", str(tiny / "images"), "--resolution", "32",
        "--arms", "vanilla", "repae", "--seeds", "3", "--steps", "2", "--eval_every", "2", "--vae_steps", "1",
        "--num_eval_samples", "4", "--num_inference_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "1",
        "--output_dir", str(out),
    ]  # fmt: skip
    ablation.main(argv)

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["steps"] == 2 and results["config"]["seeds"] == [3]
    assert results["config"]["vae"] == str(out / "vae")  # trained by train_vae.py in the same command
    assert (out / "vae" / "config.json").is_file()
    assert set(results["arms"]) == {"vanilla", "repae"}
    for arm in ("vanilla", "repae"):
        records = results["arms"][arm]["3"]
        assert [r["step"] for r in records] == [2]
        for record in records:
            for key in ("fd", "precision", "recall", "alignment_cos", "recon_l1", "images_per_s", "train_wall_s"):
                assert np.isfinite(record[key]), (arm, key)
            assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
            assert len(record["latent_mean"]) == len(record["latent_std"]) == 4
        assert set(results["summary"][arm]["fd"]) == {"median", "min", "max"}
    # the frozen-VAE arm keeps the starting VAE; the end-to-end arm trained it
    assert results["arms"]["vanilla"]["3"][0]["recon_l1"] != results["arms"]["repae"]["3"][0]["recon_l1"]
    assert Image.open(out / "fd_vs_step.png").size[0] > 100
    assert "| vanilla" in (out / "results.md").read_text()

    with pytest.raises(ValueError, match="--overwrite"):  # a finished study is never written over silently
        ablation.main(argv)


def test_segments_end_every_k_steps_and_at_the_last():
    ablation = _load_ablation()
    assert ablation.segment_ends(2, 1) == [1, 2]
    assert ablation.segment_ends(3, 2) == [2, 3]
    assert ablation.segment_ends(6, 3) == [3, 6]
    assert ablation.segment_ends(2, 5) == [2]

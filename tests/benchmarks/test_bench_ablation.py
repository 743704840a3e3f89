"""benchmarks/ablation.py smoke tests: every arm x 1 seed x 2 steps on tiny data (the outputs' structure, no quality
numbers), and the latent-patch spectrum against a computation written here."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_setup import write_tiny_setup

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str = "ablation"):
    """A benchmark script as a module (it may import its neighbour study_report.py, as when run from benchmarks/)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-class image folder (8 images) and a shrunken tiny-cpu recipe (32 px, 8x8x4 latents, 16 tokens)."""
    return write_tiny_setup(tmp_path_factory.mktemp("study"), images_per_class=4, side=32)


def test_every_arm_one_seed(tiny):
    ablation = _load_script()
    out = tiny / "out"
    argv = [
        "--recipe", str(tiny / "recipe"), "--train_data_dir", str(tiny / "images"), "--resolution", "32",
        "--seeds", "3", "--steps", "2", "--eval_every", "2", "--vae_steps", "1",
        "--num_eval_samples", "4", "--num_inference_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "1",
        "--output_dir", str(out),
    ]  # fmt: skip
    ablation.main(argv)

    results = json.loads((out / "results.json").read_text())
    arms = ["vanilla", "repa", "repae", "naive_e2e", "dropin_e2e", "dropin_control"]
    assert results["config"]["steps"] == 2 and results["config"]["seeds"] == [3]
    assert results["config"]["vae"] == str(out / "vae")  # trained by train_vae.py in the same command
    assert (out / "vae" / "config.json").is_file()
    assert list(results["arms"]) == arms
    final = {arm: results["arms"][arm]["3"][-1] for arm in arms}
    for arm in arms:
        records = results["arms"][arm]["3"]
        assert [r["step"] for r in records] == [2]
        for record in records:
            for key in ("fd", "precision", "recall", "alignment_cos", "recon_l1", "recon_fd", "effective_rank"):
                assert np.isfinite(record[key]), (arm, key)
            assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
            assert len(record["latent_mean"]) == len(record["latent_std"]) == 4
            # 4 channels x 2 x 2 patches: 16 eigenvalues, summing to 1, effective rank between 1 and 16
            assert len(record["latent_spectrum"]) == 16 and abs(sum(record["latent_spectrum"]) - 1) < 1e-3
            assert 1 <= record["effective_rank"] <= 16
        assert set(results["summary"][arm]["fd"]) == {"median", "min", "max"}
        assert set(results["summary"][arm]["effective_rank"]) == {"median", "min", "max"}
    # frozen-VAE arms keep their VAE; the end-to-end arms trained theirs; dropin_e2e uses the repae arm's VAE and
    # dropin_control a VAE trained further by train_vae.py
    assert final["vanilla"]["recon_l1"] == final["repa"]["recon_l1"]
    assert final["repae"]["recon_l1"] != final["vanilla"]["recon_l1"] != final["naive_e2e"]["recon_l1"]
    assert final["dropin_e2e"]["recon_l1"] == final["repae"]["recon_l1"]
    assert final["dropin_control"]["recon_l1"] != final["vanilla"]["recon_l1"]
    assert (out / "runs" / "control-vae-seed3" / "config.json").is_file()
    assert "ABLATION, NOT REPA-E" in (out / "runs" / "naive_e2e-seed3" / "README.md").read_text()
    assert Image.open(out / "fd_vs_step.png").size[0] > 100
    assert Image.open(out / "diagnostics_vs_step.png").size[0] > 100
    assert "| vanilla" in (out / "results.md").read_text()
    claims = (out / "claims.md").read_text()
    rows = [line for line in claims.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 8 and "--arms repae naive_e2e" in claims  # a header and a row per claim

    with pytest.raises(ValueError, match="--overwrite"):  # a finished study is never written over silently
        ablation.main(argv)

    # --extend: the same study to 4 steps, fewer arms and the targeted one; earlier records kept, drop-ins start over
    steps = argv.index("--steps") + 1
    arms = ["vanilla", "repae", "dropin_e2e", "dropin_e2e_restats"]
    extended = [*argv[:steps], "4", *argv[steps + 1 :], "--extend", "--arms", *arms]
    with pytest.raises(ValueError, match="same --eval_every"):
        ablation.main([*extended, "--eval_every", "1"])
    ablation.main(extended)
    longer = json.loads((out / "results.json").read_text())
    assert longer["config"]["steps"] == 4 and longer["config"]["extended_from_steps"] == 2
    assert list(longer["arms"]) == arms
    for arm in ("vanilla", "repae"):
        records = longer["arms"][arm]["3"]
        assert [r["step"] for r in records] == [2, 4] and records[0] == results["arms"][arm]["3"][0]
    assert [r["step"] for r in longer["arms"]["dropin_e2e"]["3"]] == [2, 4]
    assert longer["arms"]["dropin_e2e"]["3"][-1]["recon_l1"] == longer["arms"]["repae"]["3"][-1]["recon_l1"]
    # the targeted arm: the repae VAE's weights (same reconstructions) with statistics measured on the data
    restats = longer["arms"]["dropin_e2e_restats"]["3"]
    assert [r["step"] for r in restats] == [2, 4] and restats[-1]["recon_l1"] == longer["arms"]["repae"]["3"][-1][
        "recon_l1"
    ]
    exported = json.loads((out / "runs" / "repae-seed3" / "vae" / "config.json").read_text())["latents_std"]
    measured = json.loads((out / "runs" / "restats-vae-seed3" / "config.json").read_text())["latents_std"]
    assert len(measured) == len(exported) == 4 and measured != exported
    assert "| (targeted) The drop-in gap" in (out / "claims.md").read_text()

    # the probe of the SiTs' aligned tokens reads the study's runs
    probe = _load_script("probe_alignment")
    probed = probe.main(["--study_dir", str(out), "--train_data_dir", str(tiny / "images"), "--num_images", "8"])
    assert list(probed["arms"]) == ["vanilla", "untrained", "repa"] and probed["num_held_out"] == 3
    for name in probed["arms"]:
        scores = probed["arms"][name]["3"]["scores"]
        assert list(scores) == ["0.25", "0.5", "0.75"] and all(-1 <= s["cosine"] <= 1 for s in scores.values())
    assert "| untrained |" in (out / "probe.md").read_text()
    with pytest.raises(ValueError, match="probe.json' already exists.*--overwrite"):  # a finished probe is kept
        probe.main(["--study_dir", str(out), "--train_data_dir", str(tiny / "images"), "--num_images", "8"])


def test_arm_names_and_their_dependencies(tiny):
    ablation = _load_script()
    base = ["--train_data_dir", str(tiny / "images")]
    assert ablation.parse_args([*base, "--arms", "dropin_start", "vanilla"]).arms == ["vanilla", "repa"]
    assert "dropin_e2e_restats" not in ablation.parse_args(base).arms  # targeted: only when named
    for arm in ("dropin_e2e", "dropin_e2e_restats"):
        with pytest.raises(ValueError, match=f"{arm} needs repae"):
            ablation.parse_args([*base, "--arms", arm])


def test_claim_verdicts_follow_the_seed_ranges():
    _load_script()
    report = sys.modules["study_report"]
    assert report.verdict([1, 2, 3], [4, 5, 6], lower_is_better=True) == "holds"
    assert report.verdict([4, 5, 6], [1, 2, 3], lower_is_better=True) == "does not hold"
    assert report.verdict([1, 5], [4, 6], lower_is_better=True).startswith("inconclusive")
    assert report.verdict([4, 5, 6], [1, 2, 3], lower_is_better=False) == "holds"


def test_patch_spectrum_against_a_direct_computation():
    ablation = _load_script()
    latents = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    latents[:, 1] = 0.5 * latents[:, 0] + 0.1 * latents[:, 1]  # correlated channels: not isotropic
    vectors = np.array([
        latents[n, :, y : y + 2, x : x + 2].numpy().reshape(-1)
        for n in range(6) for y in (0, 2) for x in (0, 2)
    ])  # fmt: skip
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(vectors, rowvar=False)))[::-1].clip(min=0)
    share = eigenvalues / eigenvalues.sum()
    expected_rank = np.exp(-(share[share > 0] * np.log(share[share > 0])).sum())
    spectrum, rank = ablation.patch_spectrum(latents)
    np.testing.assert_allclose(spectrum.numpy(), share, atol=1e-10)
    assert rank == pytest.approx(expected_rank, rel=1e-9)
    one_direction = torch.ones(4, 2, 4, 4) * torch.randn(4, 1, 1, 1)  # every patch a multiple of one vector
    assert ablation.patch_spectrum(one_direction)[1] == pytest.approx(1.0, abs=1e-6)


def test_segments_end_every_k_steps_and_at_the_last():
    ablation = _load_script()
    assert ablation.segment_ends(2, 1) == [1, 2]
    assert ablation.segment_ends(3, 2) == [2, 3]
    assert ablation.segment_ends(6, 3) == [3, 6]
    assert ablation.segment_ends(2, 5) == [2]


def test_the_probe_recovers_a_linear_relation_and_finds_none_in_noise():
    probe = _load_script("probe_alignment")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    weights = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    y = x @ weights + 3.0  # a common offset: the mean alone already has a high cosine
    exact = probe.ridge_probe(x[:300], y[:300], x[300:], y[300:], ridge=1e-9)
    assert exact["r2"] > 0.999 and exact["cosine"] > 0.999
    unrelated = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    chance = probe.ridge_probe(unrelated[:300], y[:300], unrelated[300:], y[300:], ridge=1e-9)
    assert chance["r2"] < 0.1
    mean_cosine = torch.nn.functional.cosine_similarity(y[:300].mean(0, keepdim=True), y[300:], dim=-1).mean()
    assert abs(chance["cosine"] - float(mean_cosine)) < 0.05  # no relation: about what the mean alone scores

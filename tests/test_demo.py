"""Smoke test of `training/demo.py` on a tiny image folder: the outputs exist and have the right structure.

Quality numbers live in the README (measured with `make demo`), never as thresholds here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import demo  # noqa: E402
from test_train_repae import _reset_accelerate  # noqa: E402


def _image_folder(root: Path) -> Path:
    """Two classes of 6 coloured squares each (distinct colours, so the classes differ)."""
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True)
        for i in range(6):
            array = np.full((40, 40, 3), 255, dtype=np.uint8)
            x, y = rng.integers(2, 20, size=2)
            array[y : y + 16, x : x + 16] = colour
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    images = _image_folder(root / "images")
    out = root / "out"
    argv = [
        "--output_dir", str(out), "--train_data_dir", str(images), "--max_train_steps", "3",
        "--vae_warmup_steps", "1", "--vae_freeze_step", "2", "--train_batch_size", "4", "--num_eval_samples", "10",
        "--num_inference_steps", "2",
    ]  # fmt: skip
    _reset_accelerate()  # a test module run before this one may have left accelerate's global state set up
    metrics = demo.main(argv)
    return out, metrics, argv


def test_demo_writes_its_report(demo_run):
    out, metrics, _ = demo_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    for key in ("FD-EfficientNetLite0", "precision-EfficientNetLite0", "recall-EfficientNetLite0"):
        assert np.isfinite(saved[key])
    assert 0 <= saved["precision-EfficientNetLite0"] <= 1 and 0 <= saved["recall-EfficientNetLite0"] <= 1
    assert saved["num_samples"] == 10 and saved["num_reference_images"] == 12
    vae_alone = saved["vae_reconstructions"]
    assert vae_alone["num_images"] == 10 and np.isfinite(vae_alone["FD-EfficientNetLite0"])
    assert 0 <= vae_alone["precision-EfficientNetLite0"] <= 1
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "loss_curves.png").is_file()


def test_the_exported_pipeline_samples_with_the_demos_settings(demo_run):
    from diffusers_repae import RepaEPipeline

    out, _, argv = demo_run
    config = RepaEPipeline.from_pretrained(out / "pipeline").config
    assert config.default_num_inference_steps == int(argv[argv.index("--num_inference_steps") + 1]) == 2
    assert config.default_guidance_scale == demo.parse_args([]).guidance_scale


def test_demo_pictures_have_one_row_per_class(demo_run):
    out, _, _ = demo_run
    samples = Image.open(out / "samples.png")
    # 2 classes -> 2 rows of 32 px samples shown at 2x
    assert samples.height == 2 * 64
    reconstructions = Image.open(out / "reconstructions.png")
    # a row of real images above a row of reconstructions, 12 images (fewer than 16 in the folder), 2x
    assert reconstructions.size == (12 * 64, 2 * 64)


def test_demo_refuses_to_overwrite_a_finished_demo(demo_run, capsys):
    out, _, argv = demo_run
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        demo.run_cli(demo.main, argv)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("flags", [["--vae_freeze_step", "5", "--vae_warmup_steps", "5"], ["--vae_freeze_step", "-1"]])
def test_demo_refuses_a_freeze_step_inside_the_warm_up(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--vae_freeze_step must be 0" in err
    assert "--num_eval_samples" in err  # the demo's own usage line, not train_repae's


def test_demo_accepts_no_freeze():
    assert demo.parse_args(["--vae_freeze_step", "0"]).vae_freeze_step == 0


def test_demo_passes_its_frozen_phase_to_train_repae():
    sys.path.insert(0, str(REPO / "training"))
    import train_repae

    demo_flags = ["--vae_freeze_step", "400", "--decoder_latent_noise", "0.25", "--decoder_only_step", "600"]
    parsed = train_repae.parse_args(["--output_dir", "unused", *demo.frozen_phase_flags(demo.parse_args(demo_flags))])
    assert parsed.vae_freeze_step == 400 and parsed.cache_frozen_targets
    assert parsed.train_decoder_after_freeze and parsed.decoder_latent_noise == 0.25
    assert parsed.decoder_only_step == 600 and parsed.sit_lr_decay_start == 400
    plain = train_repae.parse_args(
        ["--output_dir", "unused", *demo.frozen_phase_flags(demo.parse_args(["--no_decoder_training"]))]
    )
    assert not plain.train_decoder_after_freeze and plain.decoder_latent_noise == 0
    assert plain.decoder_only_step is None and plain.sit_lr_decay_start == 1000
    constant = train_repae.parse_args(
        ["--output_dir", "unused", *demo.frozen_phase_flags(demo.parse_args(["--constant_sit_lr"]))]
    )
    assert constant.sit_lr_decay_start is None


@pytest.mark.parametrize("decoder_only_step", ["400", "300"])
def test_demo_refuses_a_decoder_only_step_not_after_the_freeze(decoder_only_step, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--vae_freeze_step", "400", "--decoder_only_step", decoder_only_step])
    assert "--decoder_only_step must be 0 or > --vae_freeze_step (400)" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--vae_freeze_step", "0"], ["--no_decoder_training"]])
def test_without_a_decoder_phase_the_demo_has_no_decoder_only_phase(flags):
    assert demo.parse_args(flags).decoder_only_step == 0


def test_demo_passes_its_gan_settings_to_train_repae():
    sys.path.insert(0, str(REPO / "training"))
    import train_repae

    def parsed(*flags):
        return train_repae.parse_args(["--output_dir", "unused", *demo.gan_flags(demo.parse_args(list(flags)))])

    gan = parsed("--gan_start", "2500", "--gan_weight", "0.25")
    assert gan.disc_start == 2500 and gan.adaptive_disc_weight and gan.disc_weight == 0.25 and gan.disc_ndf == 32
    assert parsed("--gan_start", "0").disc_start > 10**8  # never


@pytest.mark.parametrize("flags", [["--gan_start", "-1"], ["--gan_weight", "0"]])
def test_demo_refuses_bad_gan_settings(flags, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(flags)
    assert "--gan_start must be >= 0 (0: no GAN) and --gan_weight > 0" in capsys.readouterr().err


def test_demo_refuses_negative_decoder_noise(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--decoder_latent_noise", "-0.1"])
    assert "--decoder_latent_noise must be >= 0, got -0.1" in capsys.readouterr().err


def test_reconstructions_decode_the_posterior_mean():
    import torch
    from diffusers import AutoencoderKL

    from diffusers_repae.evaluation.quick_score import reconstructions

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=2, layers_per_block=1).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    got = reconstructions(vae, images, batch_size=2)  # batches of 2, 2 and 1
    with torch.no_grad():  # the same, written out: [-1, 1] in, mean latent, decode, back to uint8
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        moments = vae.quant_conv(vae.encoder(x))
        y = vae.decode(moments[:, :2]).sample.clamp(-1, 1)
    expected = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert got.dtype == np.uint8 and got.shape == images.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_sample_grid_places_each_class_in_its_own_row_after_a_fitted_label_column():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 3, 1, 3, 1])
    grid = np.asarray(demo.labelled_rows(images, labels, {1: "a", 3: "bb"}, per_row=3, zoom=2))

    side = 8
    label_width = grid.shape[1] - 3 * side
    assert grid.shape[0] == 2 * side
    assert 0 < label_width < 40  # two short names need only a narrow column
    for row, class_id in enumerate([1, 3]):
        for column, image in enumerate(images[labels == class_id]):
            enlarged = image.repeat(2, axis=0).repeat(2, axis=1)  # nearest-neighbour zoom, written independently
            tile = grid[row * side : (row + 1) * side, label_width + column * side : label_width + (column + 1) * side]
            np.testing.assert_array_equal(tile, enlarged)
    assert (grid[:, :label_width] < 128).any(), "the class names are drawn in the label column"

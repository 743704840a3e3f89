"""Smoke test of `training/demo.py` on a tiny image folder: the outputs exist and have the right structure.

Quality numbers live in the README (measured with `make demo`), never as thresholds here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "training"))

import demo  # noqa: E402
from training_helpers import reset_accelerate  # noqa: E402


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
        "--output_dir", str(out), "--train_data_dir", str(images), "--stage1_steps", "2", "--stage2_steps", "2",
        "--decoder_steps", "2", "--decoder_gan_start", "1", "--train_batch_size", "4", "--num_eval_samples", "10",
        "--num_inference_steps", "2",
    ]  # fmt: skip
    reset_accelerate()  # a test module run before this one may have left accelerate's global state set up
    with pytest.MonkeyPatch.context() as patch:  # the stages' and the scores' caches stay inside the test
        patch.setenv("DIFFUSERS_REPAE_CACHE", str(root / "cache"))
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
    assert len(saved["stage_minutes"]) == 6 and saved["train_minutes"] <= saved["total_minutes"]  # 4 + 2 in-process
    logs = (out / "stage2-ldm.log").read_text(), (out / "stage3-decoder.log").read_text()  # side by side
    assert "LDM training" in logs[0] and "VAE training" in logs[1]
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "loss_curves.png").is_file()


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_each_stage_is_a_reusable_folder_and_the_pipeline_their_composition(demo_run):
    from diffusers import AutoencoderKL

    from diffusers_repae import RepaEPipeline

    out, _, _ = demo_run
    stage1 = RepaEPipeline.from_pretrained(out / "stage1-repae")
    assert AutoencoderKL.from_pretrained(out / "stage3-decoder").config.latents_std == stage1.vae.config.latents_std
    assert (out / "latents" / "cache_info.json").is_file()
    transformer, vae = _weights(out / "pipeline" / "transformer"), _weights(out / "pipeline" / "vae")
    stage2, stage3 = _weights(out / "stage2-ldm" / "transformer"), _weights(out / "stage3-decoder")
    first = _weights(out / "stage1-repae" / "vae")
    assert transformer.keys() == stage2.keys() and all(torch.equal(transformer[k], stage2[k]) for k in stage2)
    assert vae.keys() == stage3.keys() and all(torch.equal(vae[k], stage3[k]) for k in stage3)
    encoder = [k for k in first if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in first if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(vae[k], first[k]) for k in encoder)  # the stage-1 latent space
    assert any(not torch.equal(vae[k], first[k]) for k in decoder)  # a fine-tuned decoder
    pipe = RepaEPipeline.from_pretrained(out / "pipeline")
    assert pipe.vae.config.latents_mean == stage1.vae.config.latents_mean


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


def test_a_second_demo_into_a_folder_in_use_is_refused_in_one_line(demo_run, capsys):
    import subprocess

    out, _, argv = demo_run
    before = (out / "metrics.json").read_bytes()
    holder = subprocess.Popen(  # another process holds the folder's lock, as a running demo does
        [sys.executable, "-c", "import sys, time; from diffusers_repae.run_lock import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit_info:
            demo.run_cli(demo.main, [*argv, "--overwrite"])
    finally:
        holder.kill()
        holder.wait()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "is in use by pid" in err
    assert (out / "metrics.json").read_bytes() == before  # --overwrite removed nothing


def test_the_stages_get_the_recipes_settings():
    args = demo.parse_args([])
    groups = demo.stage_commands(args, Path("out"), "no")
    # stage 1 alone, then two lanes side by side: the latent cache and stage 2, and the decoder stage
    assert [[len(lane) for lane in lanes] for lanes in groups] == [[1], [2, 1]]
    commands = dict(step for lanes in groups for lane in lanes for step in lane)
    stage1, cache, stage2, stage3 = commands.values()

    def value(command, flag):
        return command[command.index(flag) + 1]

    assert Path(stage1[1]).name == "train_repae.py" and value(stage1, "--max_train_steps") == "1000"
    assert value(cache, "--vae") == value(stage2, "--pretrained_model_name_or_path") == str(Path("out/stage1-repae"))
    assert value(stage2, "--latents_dir") == value(cache, "--output_dir")
    assert value(stage2, "--lr_scheduler") == "linear" and value(stage2, "--lr_warmup_steps") == "0"
    assert "--freeze_encoder" in stage3 and value(stage3, "--decoder_latent_noise") == "0.8"
    assert value(stage3, "--disc_start") == value(stage3, "--lr_decay_start") == "1000"
    assert value(stage3, "--vae") == str(Path("out/stage1-repae"))
    no_decoder = demo.stage_commands(demo.parse_args(["--decoder_steps", "0"]), Path("out"), "no")
    assert [name for lanes in no_decoder for lane in lanes for name, _ in lane] == list(commands)[:3]


def test_lanes_run_side_by_side_and_a_failure_stops_them_all():
    import threading

    from diffusers_repae.cli import UserError

    order, other_lane_started = [], threading.Event()

    def waits_for_the_other_lane():  # would time out if the lanes ran one after the other
        assert other_lane_started.wait(timeout=30)
        order.append("a1")

    def fails():
        other_lane_started.set()
        raise UserError("broken")

    lanes = [[("a1", waits_for_the_other_lane), ("a2", lambda: order.append("a2"))], [("b1", fails)]]
    with pytest.raises(UserError, match="broken"):
        demo.run_lanes(lanes, Path("unused"))
    assert "a2" not in order  # the failure stopped lane a before its next step
    minutes = demo.run_lanes([[("x", lambda: order.append("x")), ("y", lambda: order.append("y"))]], Path("unused"))
    assert order[-2:] == ["x", "y"] and list(minutes) == ["x", "y"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_train_steps", "500"], "--max_train_steps is no longer a demo option: the demo runs stages now"),
        (["--vae_freeze_step=3"], "--vae_freeze_step is no longer a demo option"),
    ],
)
def test_the_former_single_run_flags_say_what_replaced_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.run_cli(demo.main, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags", [["--decoder_gan_start", "2000"], ["--decoder_latent_noise", "-0.1"], ["--stage1_steps", "0"]]
)
def test_demo_refuses_bad_stage_settings(flags, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(flags)
    assert "must be" in capsys.readouterr().err


def test_demo_streams_a_hub_dataset(tmp_path, monkeypatch):
    from diffusers_repae import RepaEPipeline
    from hub_layout import write_hub_layout

    hub = write_hub_layout(_image_folder(tmp_path / "images"), tmp_path / "hub")
    monkeypatch.setenv("DIFFUSERS_REPAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = [
        "--output_dir", str(out), "--dataset_name", str(hub), "--streaming", "--stage1_steps", "2",
        "--stage2_steps", "2", "--decoder_steps", "0", "--train_batch_size", "4", "--num_eval_samples", "10",
        "--num_inference_steps", "2",
    ]  # fmt: skip
    reset_accelerate()
    metrics = demo.main(argv)
    assert metrics["num_reference_images"] == 12 and len(metrics["stage_minutes"]) == 4  # no latent cache
    assert not (out / "latents").exists()
    assert "Latents encoded on the fly" in (out / "stage2-ldm" / "README.md").read_text()
    pipe = RepaEPipeline.from_pretrained(out / "pipeline")
    assert pipe.id2label == {0: "blue", 1: "red"}


def test_reference_features_are_computed_once_then_read(tmp_path, monkeypatch):
    from diffusers_repae.evaluation import quick_score

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    extractor, first = quick_score.cached_reference_features(images, cache_dir=tmp_path)
    np.testing.assert_array_equal(first, quick_score.pooled_features(extractor, images))

    def must_not_run(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(quick_score, "pooled_features", must_not_run)
    _, again = quick_score.cached_reference_features(images, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, first)
    with pytest.raises(AssertionError, match="computed again"):  # other images: another entry
        quick_score.cached_reference_features(images[:5], cache_dir=tmp_path)


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

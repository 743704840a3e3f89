"""The paper's stages as scripts: decoder fine-tuning on a frozen encoder (train_vae.py --freeze_encoder) and stage 2
continuing from a stage-1 output (train_ldm.py --pretrained_model_name_or_path STAGE1 --latents_dir ...)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffusers_repae import build_component
from diffusers_repae.training.vae_step import VAEWithFrozenEncoder
from tiny_setup import write_tiny_setup
from training_helpers import training_script

STATS = {"latents_mean": [0.1, -0.2, 0.0, 0.3], "latents_std": [0.5, 1.0, 1.5, 2.0]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny image folder and recipe, plus a VAE of that recipe with latent statistics in its config."""
    root = write_tiny_setup(tmp_path_factory.mktemp("stages"))
    torch.manual_seed(0)
    build_component(str(root / "recipe"), "vae", **STATS).save_pretrained(root / "vae")
    return root


def _common(setup, output_dir, steps):
    return [
        "--recipe", str(setup / "recipe"), "--train_data_dir", str(setup / "images"), "--resolution", "32",
        "--mixed_precision", "no", "--train_batch_size", "4", "--max_train_steps", str(steps),
        "--checkpointing_steps", "2", "--output_dir", str(output_dir), "--dataloader_num_workers", "0",
        "--report_to", "none", "--validation_steps", "0",
    ]  # fmt: skip


def test_frozen_encoder_decodes_a_perturbed_posterior_sample(setup):
    vae = AutoencoderKL.from_pretrained(setup / "vae")
    module = VAEWithFrozenEncoder(vae, latent_noise=0.8)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    mean, logvar, z, reconstruction = module(images, generator=torch.Generator().manual_seed(3))
    reconstruction.sum().backward()
    with torch.no_grad():  # the same draws, written out: posterior sample, then u ~ U(0, 0.8) and Gaussian noise
        generator = torch.Generator().manual_seed(3)
        moments = vae.quant_conv(vae.encoder(images))
        expected_mean, expected_logvar = moments.chunk(2, dim=1)
        sample = expected_mean + torch.exp(0.5 * expected_logvar) * torch.randn(z.shape, generator=generator)
        u = 0.8 * torch.rand(3, 1, 1, 1, generator=generator)
        noisy = sample + u * torch.randn(z.shape, generator=generator) * torch.tensor(STATS["latents_std"]).view(
            1, -1, 1, 1
        )
        expected = vae.decode(noisy).sample
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(z, sample)
    torch.testing.assert_close(reconstruction, expected)
    assert all(p.grad is None for p in vae.encoder.parameters()) and vae.quant_conv.weight.grad is None
    assert vae.decoder.conv_out.weight.grad is not None and vae.post_quant_conv.weight.grad is not None


def test_decoder_fine_tuning_keeps_the_latent_space(setup, tmp_path):
    out = tmp_path / "decoder"
    flags = ["--vae", str(setup / "vae"), "--freeze_encoder", "--decoder_latent_noise", "0.5", "--no_lpips",
             "--disc_ndf", "8", "--disc_start", "2", "--adaptive_disc_weight", "--lr_decay_start", "2"]  # fmt: skip
    training_script("train_vae").main([*_common(setup, out, 4), *flags])
    before = load_file(setup / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in ("decoder.conv_out.weight", "post_quant_conv.weight"))
    config = AutoencoderKL.from_pretrained(out).config
    assert (config.latents_mean, config.latents_std) == (STATS["latents_mean"], STATS["latents_std"])
    card = (out / "README.md").read_text()
    assert "Only the decoder was trained (encoder frozen, on latents plus noise of up to 0.5" in card
    # every rate is 1x before step 2 (the factor of step index 2 is (4 - 2) / 2), then halves: linear to 0 at step 4
    records = json.loads((out / "checkpoint-4" / "project_state.json").read_text())["history"]["records"]
    lr = {record["step"]: (record["lr/vae"], record["lr/disc"]) for record in records}
    assert lr[1] == lr[2] == lr[3] and lr[4] == pytest.approx((lr[3][0] / 2, lr[3][1] / 2))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--freeze_encoder"], "--freeze_encoder fine-tunes the decoder of a trained VAE: pass --vae"),
        (["--decoder_latent_noise", "0.3"], "--decoder_latent_noise only applies with --freeze_encoder"),
        (["--lr_decay_start", "4"], "--lr_decay_start must be in"),
    ],
)
def test_decoder_fine_tuning_refuses_bad_settings(setup, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        training_script("train_vae").parse_args([*_common(setup, tmp_path, 4), *flags])


def test_latent_noise_needs_the_latents_spread(setup):
    vae = build_component(str(setup / "recipe"), "vae")
    with pytest.raises(ValueError, match="latents_std"):
        VAEWithFrozenEncoder(vae, latent_noise=0.5)


def test_stage_2_continues_from_a_stage_1_output(setup, tmp_path):
    stage1, latents, stage2 = tmp_path / "stage1", tmp_path / "latents", tmp_path / "stage2"
    sit = ["--enc_type", "efficientnet-lite0"]
    training_script("train_repae").main([*_common(setup, stage1, 2), *sit, "--vae", str(setup / "vae"), "--no_lpips",
                                 "--disc_ndf", "8"])  # fmt: skip
    training_script("cache_latents").main(["--vae", str(stage1), "--output_dir", str(latents), "--train_data_dir",
                                   str(setup / "images"), "--resolution", "32"])  # fmt: skip
    # a learning rate of 1e-30 (0 is refused): every step moves a weight by about 1e-30, so what stage 2 exports is
    # what it started from, to within 1e-25
    stage2_argv = [*_common(setup, stage2, 1), *sit, "--pretrained_model_name_or_path", str(stage1),
                   "--latents_dir", str(latents), "--learning_rate", "1e-30"]  # fmt: skip
    del stage2_argv[:2]  # no --recipe: everything comes from the stage-1 folder
    training_script("train_ldm").main(stage2_argv)
    for component in ("transformer", "projector", "vae"):
        start = load_file(stage1 / component / "diffusion_pytorch_model.safetensors")
        end = load_file(stage2 / component / "diffusion_pytorch_model.safetensors")
        assert start.keys() == end.keys(), component
        for key in start:
            torch.testing.assert_close(end[key], start[key], rtol=0, atol=1e-25, msg=f"{component}: {key}")
    assert f"Latents from the cache {latents}" in (stage2 / "README.md").read_text()


def test_stage_calls_are_the_scripts_command_lines(tmp_path):
    """Keyword arguments become flags that each script's own parser reads back to the same values."""
    from pathlib import Path

    from diffusers_repae.training.stages import STAGES, stage_command, stage_flags

    assert stage_flags(a=1, b=True, c=False, d=None, e=[2, "x"], f=0, g=Path("p")) == [
        "--a", "1", "--b", "--e", "2", "x", "--f", "0", "--g", "p",
    ]  # fmt: skip
    for stage in STAGES:
        assert Path(stage_command(stage)[1]).is_file()
    command = stage_command(
        "train_ldm", vae=tmp_path, max_train_steps=500, proj_coeff=0, random_flip=True, encoder_depth=None,
        train_data_dir=tmp_path, resolution=32,
    )  # fmt: skip
    args = training_script("train_ldm").parse_args(command[2:])
    assert (args.vae, args.max_train_steps, args.proj_coeff, args.random_flip) == (str(tmp_path), 500, 0.0, True)
    with pytest.raises(ValueError, match="unknown stage 'train_sit': one of train_vae, train_repae"):
        stage_command("train_sit")


def test_a_failed_stage_raises_and_names_its_script(capfd):
    from diffusers_repae.training.stages import run_stage

    with pytest.raises(ValueError, match=r"training/train_vae.py failed \(exit status 2\)"):
        run_stage("train_vae", no_such_flag=1)
    assert "--no_such_flag" in capfd.readouterr().err  # the script's own message, above the failure

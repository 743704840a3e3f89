"""train_vae.py: the shared VAE loss (adaptive GAN weight, discriminator loss), exact resume, and an exported
AutoencoderKL that train_ldm.py and train_repae.py accept."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from diffusers_repae.models.discriminator import PatchGANDiscriminator
from diffusers_repae.training.losses import VAEReconstructionLoss
from tiny_setup import write_tiny_setup
from training_helpers import training_script

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- the loss


def test_adaptive_gan_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    conv_out = torch.nn.Conv2d(4, 3, 3, padding=1)  # stands in for the decoder's last layer
    disc = PatchGANDiscriminator(ndf=8, n_layers=2)
    h, x = torch.randn(2, 4, 16, 16), torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    loss_fn = VAEReconstructionLoss(None, lpips_weight=0.0, l1_weight=2.0, disc_weight=0.5, adaptive_disc_weight=True)
    terms = loss_fn(x, conv_out(h), mean, logvar, disc, 0, last_layer=conv_out.weight)

    # independently: gradients of each loss at the last layer, from a fresh forward
    x_hat = conv_out(h)
    rec = 2.0 * (x - x_hat).abs().mean()
    gan = -disc(x_hat).mean()
    (g_rec,) = torch.autograd.grad(rec, conv_out.weight, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan, conv_out.weight)
    expected_weight = 0.5 * torch.clamp(g_rec.norm() / (g_gan.norm() + 1e-4), 0.0, 1e4)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(terms["disc_weight"], expected_weight)
    torch.testing.assert_close(terms["loss"], rec + 1e-6 * kl + expected_weight * gan)
    assert not terms["disc_weight"].requires_grad  # the weight is a constant of the step, as in taming/LDM

    # REPA-E's fixed weight when adaptive is off, and no GAN at all before disc_start
    fixed = VAEReconstructionLoss(None, lpips_weight=0.0, disc_weight=0.5)(x, x_hat, mean, logvar, disc, 0)
    torch.testing.assert_close(fixed["disc_weight"], torch.tensor(0.5))
    late = VAEReconstructionLoss(None, lpips_weight=0.0, disc_start=5, adaptive_disc_weight=True)
    assert late(x, x_hat, mean, logvar, disc, 4, last_layer=conv_out.weight)["disc_weight"] == 0
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn(x, conv_out(h), mean, logvar, disc, 0)


def test_discriminator_loss_is_the_scaled_hinge():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(ndf=8, n_layers=2)
    x, x_hat = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    terms = VAEReconstructionLoss(None, lpips_weight=0.0, disc_factor=0.7).discriminator_loss(disc, x, x_hat)
    real, fake = disc(x), disc(x_hat)
    expected = 0.7 * 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["logits_fake"], fake.mean())


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A 2-class image folder (12 images: 3 batches of 4) and a shrunken tiny-cpu recipe (32 px, 8x8x4 latents)."""
    return write_tiny_setup(tmp_path_factory.mktemp("vae"))


def _common(setup, output_dir, steps):
    return [
        "--recipe", str(setup / "recipe"), "--train_data_dir", str(setup / "images"), "--resolution", "32",
        "--mixed_precision", "no", "--train_batch_size", "4", "--max_train_steps", str(steps),
        "--checkpointing_steps", "2", "--output_dir", str(output_dir), "--dataloader_num_workers", "0",
        "--report_to", "none",
    ]  # fmt: skip


def _vae_argv(setup, output_dir, steps, *extra):
    return [
        *_common(setup, output_dir, steps), "--no_lpips", "--disc_ndf", "8", "--disc_start", "1",
        "--adaptive_disc_weight", "--validation_steps", "2", "--num_validation_images", "4", "--random_flip", *extra,
    ]  # fmt: skip


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        out.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(path).items()})
    return out


@pytest.fixture(scope="module")
def trained_vae(tiny_setup):
    """4 steps straight (the GAN from step 1, adaptive weight) and 2 + 2 resumed: the exported VAE of the first."""
    straight, split = tiny_setup / "straight", tiny_setup / "split"
    training_script("train_vae").main(_vae_argv(tiny_setup, straight, 4))
    training_script("train_vae").main(_vae_argv(tiny_setup, split, 2))
    training_script("train_vae").main(_vae_argv(tiny_setup, split, 4, "--resume_from_checkpoint", "latest"))
    return straight, split


def test_resume_is_bit_identical(trained_vae):
    straight, split = trained_vae
    a, b = _tensors(straight / "checkpoint-4"), _tensors(split / "checkpoint-4")
    assert a.keys() == b.keys() and len(a) > 30  # VAE, discriminator, optimiser-free model files, project state
    for key in a:
        assert torch.equal(a[key], b[key]), key
    x = load_file(straight / "diffusion_pytorch_model.safetensors")
    y = load_file(split / "diffusion_pytorch_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    first = load_file(straight / "checkpoint-2" / "model.safetensors")
    last = load_file(straight / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it did train


def test_export_is_an_autoencoder_kl_with_measured_statistics(tiny_setup, trained_vae):
    from diffusers_repae.training.data import load_training_dataset

    out = trained_vae[0]
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.scaling_factor == 1.0 and len(vae.config.latents_mean) == 4
    # independently: posterior samples of every training image in dataset order, noise from the run's seed (0)
    data = load_training_dataset(train_data_dir=tiny_setup / "images", resolution=32, random_flip=True, seed=0)
    pixels = torch.stack([data.dataset[i]["pixel_values"] for i in range(len(data.dataset))])
    with torch.no_grad():
        posterior = vae.encode(pixels.float() / 127.5 - 1).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    z = (posterior.mean + posterior.std * noise).double()
    torch.testing.assert_close(torch.tensor(vae.config.latents_mean, dtype=torch.float64), z.mean(dim=(0, 2, 3)))
    std = z.var(dim=(0, 2, 3), unbiased=False).sqrt()
    torch.testing.assert_close(torch.tensor(vae.config.latents_std, dtype=torch.float64), std)
    for name in ("reconstructions.png", "loss_curves.png", "README.md", "validation/step-0000002.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "reconstructions.png").size == (8 * 32, 32)  # 4 real | reconstruction pairs
    assert (out / "discriminator" / "config.json").is_file()
    assert "without the LPIPS perceptual term" in (out / "README.md").read_text()


def test_train_ldm_and_train_repae_accept_the_exported_vae(tiny_setup, trained_vae, tmp_path):
    from diffusers_repae import RepaEPipeline

    vae_dir = trained_vae[0]
    exported = AutoencoderKL.from_pretrained(vae_dir)
    sit_flags = ["--enc_type", "efficientnet-lite0", "--validation_steps", "0", "--vae", str(vae_dir)]
    ldm_out = training_script("train_ldm").main([*_common(tiny_setup, tmp_path / "ldm", 1), *sit_flags])
    repae_out = training_script("train_repae").main(
        [*_common(tiny_setup, tmp_path / "repae", 1), *sit_flags, "--no_lpips", "--disc_ndf", "8"]
    )
    ldm = RepaEPipeline.from_pretrained(ldm_out)
    assert ldm.vae.config.latents_mean == exported.config.latents_mean  # the frozen VAE's statistics, unchanged
    repae = RepaEPipeline.from_pretrained(repae_out)
    assert repae.vae.config.latents_mean != exported.config.latents_mean  # the BN started there and moved
    images = repae(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_bad_flags(tiny_setup, tmp_path):
    train_vae = training_script("train_vae")
    with pytest.raises(ValueError, match="kl_weight"):
        train_vae.parse_args(_vae_argv(tiny_setup, tmp_path, 2, "--kl_weight", "-1"))
    with pytest.raises(ValueError, match="num_validation_images"):
        train_vae.parse_args(_vae_argv(tiny_setup, tmp_path, 2, "--num_validation_images", "0"))
    args = train_vae.parse_args(_vae_argv(tiny_setup, tmp_path, 2))
    assert args.lpips_weight == 0 and args.adaptive_disc_weight

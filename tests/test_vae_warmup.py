"""`--vae_warmup_steps`: the first steps train only the VAE's reconstruction; afterwards the full REPA-E step."""

import torch
from accelerate import Accelerator

from diffusers_repae.training.losses import kl_loss
from diffusers_repae.training.repae_step import RepaEHyperParameters, images_to_vae_range, train_step
from test_train_repae import _batch, _models, _params, _reset_accelerate, _same


def test_warmup_step_trains_only_the_vae_on_its_reconstruction_loss():
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    models.vae_loss.disc_start = 10**9  # GAN off: the warm-up loss is then L1 + kl_weight * KL
    hp = RepaEHyperParameters(encoder_depth=1, vae_warmup_steps=2)
    sit, projector, vae = _params(models.transformer), _params(models.projector), _params(models.vae)
    batch = _batch()

    # the expected loss, computed here from the posterior with the same generator draw
    images = images_to_vae_range(batch["pixel_values"])
    posterior = models.vae.vae.encode(images).latent_dist
    g = torch.Generator().manual_seed(3)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    reconstruction = models.vae.vae.decode(z).sample
    expected = (images - reconstruction).abs().mean() + models.vae_loss.kl_weight * kl_loss(
        posterior.mean, posterior.logvar
    )

    logs = train_step(accelerator, models, hp, batch, torch.Generator().manual_seed(3), 0)
    assert not any(key.startswith("sit/") for key in logs)  # no SiT pass
    torch.testing.assert_close(logs["vae/loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    assert _same(sit, _params(models.transformer)) and _same(projector, _params(models.projector))
    assert not _same(vae, _params(models.vae))
    # the latent BN follows the latents during warm-up (one batch-statistics update)
    assert int(models.latent_norm.num_batches_tracked) == 1


def test_after_warmup_the_full_step_runs():
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    models = _models(accelerator)
    hp = RepaEHyperParameters(encoder_depth=1, vae_warmup_steps=1)
    sit = _params(models.transformer)
    logs = train_step(accelerator, models, hp, _batch(), None, 1)
    assert {"sit/denoising_loss", "vae/proj_loss"} <= set(logs)
    assert not _same(sit, _params(models.transformer))

"""One VAE training step (stage 1 of latent diffusion): the loss code of the end-to-end step, without the SiT.

Generator update (L1 + LPIPS + KL + GAN, optionally with taming/LDM's adaptive GAN weight) then discriminator
update, both through the functions `repae_step` uses (`vae_reconstruction_update`, `discriminator_pass`), so
``train_vae.py`` and ``train_repae.py`` optimise the same VAE loss. ``models`` is a `RepaEModels` whose SiT-side
fields (transformer, projector, latent_norm, encoders, optimizer_sit) are unused.

Decoder fine-tuning (``train_vae.py --freeze_encoder``) is the same step with `VAEWithFrozenEncoder` in place of
`VAEWithPosterior`: the encoder, and so the latent space a diffusion model learned, stays fixed while the decoder
learns, optionally on noise-perturbed latents so that it also decodes a diffusion model's imperfect latents well.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from .repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    VAEWithPosterior,
    discriminator_pass,
    images_to_vae_range,
    vae_reconstruction_update,
)


def perturbed_latents(
    latents: torch.Tensor, spread: torch.Tensor, max_noise: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``latents + u * spread * n``: per sample ``u ~ U(0, max_noise)``, Gaussian ``n``; ``spread`` is each channel's
    std. A decoder trained on these also decodes the small errors of a diffusion model's latents well."""
    if max_noise == 0:
        return latents
    device = generator.device if generator is not None else None
    scale = max_noise * torch.rand(latents.shape[0], 1, 1, 1, generator=generator, device=device)
    kick = torch.randn(latents.shape, generator=generator, device=device)
    return latents + (scale * kick).to(latents.device, latents.dtype) * spread.view(1, -1, 1, 1).to(latents.dtype)


class VAEWithFrozenEncoder(VAEWithPosterior):
    """`VAEWithPosterior` whose encoder (and ``quant_conv``) is frozen: ``forward`` samples the fixed posterior
    without gradient, adds `perturbed_latents` noise (``latent_noise`` x ``latents_std`` of the VAE's config) and
    decodes. Only the decoder and ``post_quant_conv`` train; the KL term of the loss is then a constant."""

    def __init__(self, vae: torch.nn.Module, latent_noise: float = 0.0):
        super().__init__(vae)
        if latent_noise < 0:
            raise ValueError(f"decoder_latent_noise must be >= 0, got {latent_noise!r}.")
        std = getattr(vae.config, "latents_std", None)
        if latent_noise and std is None:
            raise ValueError(
                "decoder_latent_noise needs the VAE's latents_std (its latents' spread): measure it first with "
                "training/compute_latent_stats.py --write."
            )
        self.latent_noise = latent_noise
        self.register_buffer("spread", torch.tensor(std if std is not None else [1.0], dtype=torch.float32))
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.vae.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            posterior = self.vae.encode(images).latent_dist
            z = posterior.sample(generator=generator)
            decoder_input = perturbed_latents(z, self.spread, self.latent_noise, generator)
        return posterior.mean, posterior.logvar, z, self.vae.decode(decoder_input).sample


def vae_train_step(
    accelerator: Accelerator,
    models: RepaEModels,
    hp: RepaEHyperParameters,
    batch: dict,
    generator: torch.Generator | None,
    global_step: int,
) -> dict[str, torch.Tensor]:
    """One step on ``{"pixel_values": uint8 [B, 3, H, W], ...}``: VAE update, then discriminator update."""
    images = images_to_vae_range(batch["pixel_values"])
    with accelerator.accumulate(models.vae, models.discriminator):
        logs, _, reconstruction = vae_reconstruction_update(
            accelerator, models, images, generator, global_step, hp.max_grad_norm
        )
        logs.update(discriminator_pass(accelerator, models, hp, images, reconstruction, global_step))
    return logs


@torch.no_grad()
def reconstruction_pairs(vae, pixel_values: torch.Tensor) -> np.ndarray:
    """uint8 ``[N, 3, H, W]`` -> float ``[2N, H, W, 3]`` in [0, 1]: each image followed by its reconstruction
    (posterior mean, decoded), ready for `validation.grid_image` with an even number of columns."""
    parameter = next(vae.parameters())
    x = pixel_values.to(parameter.device, parameter.dtype) / 127.5 - 1.0
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    real = (x.float() + 1) / 2
    fake = ((decoded.float() + 1) / 2).clamp(0, 1)
    pairs = torch.stack([real, fake], dim=1).flatten(0, 1)  # real0, fake0, real1, fake1, ...
    return pairs.permute(0, 2, 3, 1).cpu().numpy()

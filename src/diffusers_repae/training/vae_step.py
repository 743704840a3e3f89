"""One VAE training step (stage 1 of latent diffusion): the loss code of the end-to-end step, without the SiT.

Generator update (L1 + LPIPS + KL + GAN, optionally with taming/LDM's adaptive GAN weight) then discriminator
update, both through the functions `repae_step` uses (`vae_reconstruction_update`, `discriminator_pass`), so
``train_vae.py`` and ``train_repae.py`` optimise the same VAE loss. ``models`` is a `RepaEModels` whose SiT-side
fields (transformer, projector, latent_norm, encoders, optimizer_sit) are unused.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from .repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    discriminator_pass,
    images_to_vae_range,
    vae_reconstruction_update,
)


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
    (posterior mean, decoded), ready for `trainer.grid_image` with an even number of columns."""
    parameter = next(vae.parameters())
    x = pixel_values.to(parameter.device, parameter.dtype) / 127.5 - 1.0
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    real = (x.float() + 1) / 2
    fake = ((decoded.float() + 1) / 2).clamp(0, 1)
    pairs = torch.stack([real, fake], dim=1).flatten(0, 1)  # real0, fake0, real1, fake1, ...
    return pairs.permute(0, 2, 3, 1).cpu().numpy()

"""LDM-only training on a frozen VAE (REPA's recipe, REPA-E's second stage; SPEC sections 3 and 7).

The SiT learns denoising + REPA alignment on latents normalised by the frozen VAE's statistics (a latent
BatchNorm kept in eval mode, exactly as the original's ``train_ldm_only.py``). Latents come either from a cache
of posterior means and stds (``cache_latents.py``) or from encoding the images on the fly; both re-sample
``z = mean + std * n`` from the step's generator, so the two routes give the same step for the same samples.
The vision encoder always sees the images (the cache stores each row's dataset ``index`` and flip).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .latent_cache import sample_latents
from .repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    draw_step_noise,
    ema_target,
    encoder_features,
    images_to_vae_range,
    sit_pass,
)


class CachedLatentsWithImages(torch.utils.data.Dataset):
    """Rows of a latent cache joined with their images (for the vision encoder).

    ``latents`` is the cache as a torch-format ``datasets.Dataset`` (``mean``, ``std``, ``label``, ``index``,
    ``flipped``); ``images`` the map-style image dataset the cache was made from (without random flips: flipped
    copies are separate cache rows).
    """

    def __init__(self, latents, images):
        self.latents, self.images = latents, images
        self.counter = getattr(images, "counter", None)

    def __len__(self) -> int:
        return len(self.latents)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.images, "set_epoch"):
            self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.latents[index]
        pixels = self.images[int(row["index"])]["pixel_values"]
        if bool(row["flipped"]):
            pixels = pixels.flip(-1)
        return {
            "mean": row["mean"].float(),
            "std": row["std"].float(),
            "labels": row["label"].long(),
            "pixel_values": pixels,
        }


@torch.no_grad()
def batch_latents(batch: dict, vae, generator: torch.Generator | None) -> torch.Tensor:
    """Raw VAE latents of a batch: re-sampled from cached ``mean``/``std``, or from encoding ``pixel_values``."""
    if "mean" in batch:
        mean, std = batch["mean"], batch["std"]
    else:
        posterior = vae.encode(images_to_vae_range(batch["pixel_values"]).to(vae.dtype)).latent_dist
        mean, std = posterior.mean, posterior.std
    return sample_latents(mean, std, generator)


def ldm_train_step(
    accelerator: Accelerator,
    models: RepaEModels,
    hp: RepaEHyperParameters,
    batch: dict,
    vae,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """One SiT step (denoising + ``proj_coeff`` x alignment) with the latent BN frozen at the VAE's statistics.

    ``models`` needs ``transformer``, ``projector``, ``latent_norm`` (eval mode, from the VAE config),
    ``encoders``, ``optimizer_sit`` and optionally ``ema``; the VAE-side fields are unused.
    """
    labels = batch["labels"].long()
    zs = encoder_features(models.encoders, batch["pixel_values"])
    latents = batch_latents(batch, vae, generator)
    noise = draw_step_noise(latents, hp, generator)
    with accelerator.accumulate(models.transformer, models.projector):
        logs = sit_pass(accelerator, models, hp, latents, labels, zs, noise)
        if accelerator.sync_gradients and models.ema is not None:
            models.ema.step(ema_target(accelerator, models))
    return logs

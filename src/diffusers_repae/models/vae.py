"""AutoencoderKL presets for REPA-E's VAEs and latent (de)normalisation that works with any diffusers VAE."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

VAE_PRESETS: dict[str, dict] = {
    # SD-VAE (ft-EMA): 4 levels, attention only in the mid-block, latents 4 x H/8 x W/8.
    "f8d4": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 256,
        "scaling_factor": 1.0,
    },
    # VA-VAE / IN-VAE: 5 levels, attention also at the lowest resolution (2 encoder, 3 decoder blocks).
    "f16d32": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 128, 256, 256, 512],
        "layers_per_block": 2,
        "latent_channels": 32,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 256,
        "scaling_factor": 1.0,
    },
}


def vae_config(arch: str, **overrides) -> dict:
    """The ``AutoencoderKL`` config of a preset (``f8d4`` or ``f16d32``), with optional overrides."""
    if arch not in VAE_PRESETS:
        raise ValueError(f"arch must be one of {sorted(VAE_PRESETS)}, got {arch!r}.")
    return {**VAE_PRESETS[arch], **overrides}


def build_vae(arch: str, **overrides) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` for a preset."""
    return AutoencoderKL(**vae_config(arch, **overrides))


def check_latent_stats(config) -> None:
    """Refuses a VAE config whose ``latents_mean``/``latents_std`` (when set) would make every image NaN or
    infinite: non-numbers, non-finite values, or a standard deviation <= 0 (the latents are divided by it)."""
    for field in ("latents_mean", "latents_std"):
        values = getattr(config, field, None)
        if values is None:
            continue
        try:
            tensor = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"vae config.json: {field} must be a list of numbers, got {values!r}.") from None
        bad = not bool(torch.isfinite(tensor).all()) or (field == "latents_std" and bool((tensor <= 0).any()))
        if bad or tensor.ndim != 1 or tensor.numel() == 0:
            wanted = "finite numbers > 0" if field == "latents_std" else "finite numbers"
            raise ValueError(
                f"vae config.json: {field} must be a non-empty list of {wanted} (one per latent channel), got "
                f"{values!r}: recompute them (training/compute_latent_stats.py --write) or remove the field."
            )


def latent_stats(vae: AutoencoderKL, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mean, std, scaling_factor)`` broadcastable to ``like`` ``[B, C, H, W]``.

    With ``latents_mean/latents_std`` in the config (REPA-E's VAEs) those are used; otherwise the classic
    ``shift_factor``/``scaling_factor`` pair stands in (mean = shift, std = 1), so any diffusers VAE works.
    """
    config = vae.config
    channels = like.shape[1]
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, dtype=torch.float32)
        std = torch.tensor(config.latents_std, dtype=torch.float32)
        if mean.numel() != channels or std.numel() != channels:
            raise ValueError(
                f"vae.config.latents_mean/latents_std have {mean.numel()}/{std.numel()} entries but the latents "
                f"have {channels} channels."
            )
    else:
        mean = torch.full((channels,), float(getattr(config, "shift_factor", None) or 0.0))
        std = torch.ones(channels)
    shape = (1, channels, 1, 1)
    mean = mean.reshape(shape).to(device=like.device, dtype=like.dtype)
    std = std.reshape(shape).to(device=like.device, dtype=like.dtype)
    return mean, std, float(getattr(config, "scaling_factor", None) or 1.0)


def normalize_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the normalised space the SiT works in: ``(z - mean) * scaling_factor / std``."""
    mean, std, scaling = latent_stats(vae, latents)
    return (latents - mean) * scaling / std


def denormalize_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize_latents`: ``x * std / scaling_factor + mean`` (REPA-E: ``x * std + mean``)."""
    mean, std, scaling = latent_stats(vae, latents)
    return latents * std / scaling + mean

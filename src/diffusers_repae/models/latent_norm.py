"""The latent BatchNorm of REPA-E and its exact exchange with an AutoencoderKL config's statistics."""

from __future__ import annotations

import torch
from torch import nn


class LatentBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d(C, eps=1e-4, affine=False)`` applied to raw VAE latents during training (SPEC section 3).

    At export its running statistics become the VAE config's ``latents_mean = running_mean`` and
    ``latents_std = sqrt(running_var)``. Like the original decoder, the std carries **no eps**: sampling
    un-normalises with ``z = x * sqrt(running_var) + running_mean``.

    Exactness: the std is computed in float64 from the float32 variance, so ``float32(latents_std)`` is the
    correctly rounded float32 square root (what CUDA's ``sqrt`` returns; torch's vectorised CPU ``sqrt`` can be one
    ulp off), and squaring it back in float64 then rounding to float32 gives the original variance: BN -> config
    -> BN is lossless.
    """

    def __init__(self, num_channels: int, momentum: float = 0.1, eps: float = 1e-4):
        super().__init__(num_channels, eps=eps, momentum=momentum, affine=False, track_running_stats=True)

    def to_latents_stats(self) -> tuple[list[float], list[float]]:
        """``(latents_mean, latents_std)`` as plain float lists, ready for ``AutoencoderKL`` config."""
        mean = self.running_mean.double().tolist()
        std = self.running_var.double().sqrt().tolist()
        return mean, std

    @torch.no_grad()
    def load_latents_stats(self, latents_mean, latents_std) -> LatentBatchNorm:
        """Set the running statistics from per-channel ``latents_mean`` / ``latents_std`` (lists or tensors)."""
        mean = torch.as_tensor(latents_mean, dtype=torch.float64).flatten()
        std = torch.as_tensor(latents_std, dtype=torch.float64).flatten()
        if mean.numel() != self.num_features or std.numel() != self.num_features:
            raise ValueError(
                f"latents_mean/latents_std must have {self.num_features} entries (one per latent channel), "
                f"got {mean.numel()} and {std.numel()}."
            )
        self.running_mean.copy_(mean.to(self.running_mean.dtype))
        self.running_var.copy_((std * std).to(self.running_var.dtype))
        return self

    @classmethod
    def from_vae_config(cls, vae_config, momentum: float = 0.1) -> LatentBatchNorm:
        """A BN whose running statistics are the VAE config's ``latents_mean`` / ``latents_std``."""
        norm = cls(vae_config.latent_channels, momentum=momentum)
        if getattr(vae_config, "latents_mean", None) is None or getattr(vae_config, "latents_std", None) is None:
            raise ValueError("The VAE config has no latents_mean/latents_std; compute them first.")
        return norm.load_latents_stats(vae_config.latents_mean, vae_config.latents_std)

"""REPA-E's losses (SPEC sections 1, 2, 6): interpolant and time sampling, denoising, REPA alignment, VAE losses."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weight_files import WeightFileError, load_weights_into, read_state_dict

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")
# "correct": LPIPS gets [-1, 1], the range it expects. "original": REPA-E's LPIPS maps its [-1, 1] input by
# x * 2 - 1 again, so VGG sees [-3, 1]; the published VAEs were trained with that objective.
LPIPS_INPUT_RANGES = ("correct", "original")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")


def sample_time(
    batch_size: int, weighting: str = "uniform", path_type: str = "linear", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training times ``t`` in [0, 1] (t = 1 is noise), ``[batch_size]`` float32 on the generator's device.

    ``uniform``: ``t ~ U(0, 1)``. ``lognormal``: ``s = exp(N(0, 1))`` then ``t = s / (1 + s)`` (linear path) or
    ``t = 2 / pi * atan(s)`` (cosine path).
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("path_type", path_type, PATH_TYPES)
    device = generator.device if generator is not None else None
    if weighting == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    s = torch.randn(batch_size, generator=generator, device=device).exp()
    return s / (1 + s) if path_type == "linear" else 2 / math.pi * torch.atan(s)


def interpolant(t: torch.Tensor, path_type: str = "linear") -> tuple[torch.Tensor, ...]:
    """``(alpha_t, sigma_t, d_alpha_t, d_sigma_t)`` with ``x_t = alpha_t x + sigma_t eps``, shaped like ``t``."""
    _check_choice("path_type", path_type, PATH_TYPES)
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    return (
        torch.cos(t * half_pi),
        torch.sin(t * half_pi),
        -half_pi * torch.sin(t * half_pi),
        half_pi * torch.cos(t * half_pi),
    )


def noisy_latents_and_target(
    latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path_type: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, v)``: linear path ``x_t = (1 - t) x + t eps`` and ``v = eps - x``; cosine path analogously."""
    alpha, sigma, d_alpha, d_sigma = (c.view(-1, 1, 1, 1).to(latents.dtype) for c in interpolant(t, path_type))
    return alpha * latents + sigma * noise, d_alpha * latents + d_sigma * noise


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((v_hat - v)^2)``: per-sample mean over C, H, W, then over the batch (computed in fp32)."""
    return (prediction.float() - target.float()).pow(2).mean()


def repa_alignment_loss(encoder_features: list[torch.Tensor], projected: list[torch.Tensor]) -> torch.Tensor:
    """Mean over encoders and batch of the token-mean of ``-cos(z, projector(h))`` (SPEC section 5).

    Normalised in fp32: fp16 cosines are what made long fp16 REPA runs go NaN (SPEC section 11).
    """
    if len(encoder_features) != len(projected):
        raise ValueError(f"got {len(encoder_features)} encoder feature sets but {len(projected)} projections.")
    losses = []
    for z, z_tilde in zip(encoder_features, projected):
        if z.shape != z_tilde.shape:
            raise ValueError(
                f"encoder features {tuple(z.shape)} and projected SiT tokens {tuple(z_tilde.shape)} differ: the "
                "encoder token count must equal the SiT token count."
            )
        z = F.normalize(z.float(), dim=-1)
        z_tilde = F.normalize(z_tilde.float(), dim=-1)
        losses.append(-(z * z_tilde).sum(dim=-1).mean())
    return torch.stack(losses).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum_{C,H,W}(mean^2 + var - 1 - logvar)``, averaged over the batch (logvar already clamped)."""
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(dim=1).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def load_lpips(vgg_weights_path: str | Path | None = None, pretrained_backbone: bool = True) -> nn.Module:
    """LPIPS (VGG variant) in eval mode, frozen.

    ``lpips`` ships its linear heads but downloads torchvision's ImageNet VGG16; offline, pass the torchvision
    ``vgg16`` state dict file (``.pth`` or ``.safetensors``) as ``vgg_weights_path``. ``pretrained_backbone=False``
    gives a random backbone, only good for exercising the code path in tests.
    """
    import lpips

    if vgg_weights_path is None and pretrained_backbone:
        model = lpips.LPIPS(net="vgg", verbose=False)  # may download torchvision's VGG16 weights
    else:
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if vgg_weights_path is not None:
            _load_vgg_features(model.net, Path(vgg_weights_path))
    model.eval().requires_grad_(False)
    return model


def _load_vgg_features(net: nn.Module, path: Path) -> None:
    """Copy torchvision ``vgg16`` ``features.{i}.*`` weights into lpips' slices (which keep the indices ``i``)."""
    expected = "torchvision's vgg16 ImageNet state dict (vgg16-397923af.pth, or a safetensors copy)"
    state = read_state_dict(path, "--lpips_vgg_path", expected)
    mapped = {}
    for slice_name, block in net.named_children():
        for index, layer in block.named_children():
            for param_name, _ in layer.named_parameters():
                key = f"features.{index}.{param_name}"
                if key not in state:
                    raise WeightFileError(
                        f"--lpips_vgg_path {str(path)!r} is not {expected} (it has no {key!r}): pass {expected}."
                    )
                mapped[f"{slice_name}.{index}.{param_name}"] = state[key]
    load_weights_into(net, mapped, "--lpips_vgg_path", path, expected)


class VAEReconstructionLoss(nn.Module):
    """The VAE's loss, generator and discriminator side (configs/l1_lpips_kl_gan.yaml, SPEC section 6).

    One copy for every script that trains a VAE: ``train_repae.py`` (end-to-end, plus alignment) and
    ``train_vae.py`` (stage 1 of latent diffusion). Generator:
    ``L1 + lpips_weight * LPIPS + kl_weight * KL + d_weight * disc_factor * (-mean D(x_hat))``, all in fp32 (autocast
    off), with ``d_weight = disc_weight`` (REPA-E) or, with ``adaptive_disc_weight``, taming/LDM's balance
    ``disc_weight * ||dL_rec/dW|| / (||dL_gan/dW|| + 1e-4)`` (clamped to [0, 1e4], no gradient) over the decoder's
    last layer ``W``. Discriminator: ``disc_factor`` x the hinge loss. The GAN terms start at ``disc_start``.
    LPIPS receives images in [-1, 1] with ``normalize=False``, the range it expects; ``lpips_input_range=
    "original"`` reproduces REPA-E, which fed [-1, 1] to an LPIPS mapping ``x * 2 - 1`` (VGG sees [-3, 1]).
    ``lpips`` may be None when ``lpips_weight`` is 0 (offline runs without VGG weights).
    """

    def __init__(
        self,
        lpips: nn.Module | None = None,
        l1_weight: float = 1.0,
        lpips_weight: float = 1.0,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.1,
        disc_start: int = 0,
        disc_factor: float = 1.0,
        adaptive_disc_weight: bool = False,
        lpips_input_range: str = "correct",
    ):
        super().__init__()
        _check_choice("lpips_input_range", lpips_input_range, LPIPS_INPUT_RANGES)
        if lpips is None and lpips_weight != 0:
            raise ValueError(f"lpips_weight is {lpips_weight} but no LPIPS model was given; pass one or use 0.")
        self.lpips = lpips
        self.l1_weight = l1_weight
        self.lpips_weight = lpips_weight
        self.kl_weight = kl_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.disc_factor = disc_factor
        self.adaptive_disc_weight = adaptive_disc_weight
        self.lpips_input_range = lpips_input_range

    def gan_active(self, global_step: int) -> bool:
        return self.disc_weight > 0 and self.disc_factor > 0 and global_step >= self.disc_start

    def forward(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        discriminator: nn.Module | None,
        global_step: int = 0,
        last_layer: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms (``l1``, ``lpips``, ``kl``, ``gan``, ``disc_weight``) and their weighted sum ``loss``, fp32.

        ``last_layer`` (the decoder's ``conv_out.weight``) is needed only with ``adaptive_disc_weight``.
        """
        device_type = images.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            images, reconstructions = images.float(), reconstructions.float()
            terms = {"l1": (images - reconstructions).abs().mean()}
            if self.lpips_weight != 0:
                original_range = self.lpips_input_range == "original"  # lpips' normalize maps x -> 2x - 1
                terms["lpips"] = self.lpips(images, reconstructions, normalize=original_range).mean()
            else:
                terms["lpips"] = torch.zeros((), device=images.device)
            terms["kl"] = kl_loss(mean, logvar)
            rec = self.l1_weight * terms["l1"] + self.lpips_weight * terms["lpips"]
            gan = torch.zeros((), device=images.device)
            d_weight = torch.zeros((), device=images.device)
            if discriminator is not None and self.gan_active(global_step):
                gan = -discriminator(reconstructions).float().mean()
                d_weight = self.disc_weight * self.disc_factor * self.adaptive_weight(rec, gan, last_layer)
            terms["gan"] = gan
            terms["disc_weight"] = d_weight
            terms["loss"] = rec + self.kl_weight * terms["kl"] + d_weight * gan
        return terms

    def adaptive_weight(
        self, rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor | None
    ) -> torch.Tensor:
        """1 without ``adaptive_disc_weight``; else ``||grad rec|| / (||grad gan|| + 1e-4)`` at ``last_layer``."""
        if not self.adaptive_disc_weight:
            return torch.ones((), device=gan_loss.device)
        if last_layer is None:
            raise ValueError("adaptive_disc_weight needs the decoder's last layer weight (last_layer).")
        if not torch.is_grad_enabled():  # evaluation: no graph to differentiate
            return torch.ones((), device=gan_loss.device)
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
        weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach()

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, reconstructions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``disc_factor`` x hinge loss on ``(x, x_hat)`` in fp32 (``loss``), with the mean logits for the log."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            logits_real = discriminator(images.detach().float())
            logits_fake = discriminator(reconstructions.detach().float())
            loss = self.disc_factor * hinge_d_loss(logits_real, logits_fake)
        return {"loss": loss, "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

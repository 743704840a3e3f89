"""One REPA-E end-to-end training step (SPEC section 7), as library functions the script and the tests call.

Order inside a step: VAE forward -> VAE update (reconstruction + 1.5 x alignment through a *frozen, eval-mode*
SiT, align-only) -> discriminator update -> SiT update (denoising + 0.5 x alignment on the *detached* latents,
same t and noise) -> EMA. All randomness of a step (posterior sample, t, noise, label dropout) comes from one
``torch.Generator`` that the caller checkpoints, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from .ema import ModelEMA
from .losses import (
    VAEReconstructionLoss,
    denoising_loss,
    noisy_latents_and_target,
    repa_alignment_loss,
    sample_time,
)


class VAEWithPosterior(nn.Module):
    """Wraps an ``AutoencoderKL`` so that encode + sample + decode is *one* ``forward`` (what DDP needs to sync).

    ``forward(images) -> (mean, logvar, z, reconstruction)``; ``z = mean + std * n`` with ``n`` from ``generator``.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample(generator=generator)
        return posterior.mean, posterior.logvar, z, self.vae.decode(z).sample


@dataclass
class RepaEHyperParameters:
    """The per-step knobs of SPEC section 7 (defaults are the original's)."""

    encoder_depth: int = 8
    proj_coeff: float = 0.5
    vae_align_proj_coeff: float = 1.5
    path_type: str = "linear"
    weighting: str = "uniform"
    cfg_prob: float = 0.1
    max_grad_norm: float = 1.0
    # LDM-only training on a frozen VAE: the BN stays in eval mode at the VAE's statistics (no batch statistics).
    freeze_latent_norm: bool = False


@dataclass
class RepaEModels:
    """Everything a step touches. ``vae``, ``transformer``, ``projector``, ``discriminator`` may be DDP-wrapped.

    A stage that trains part of the method leaves the rest None (train_ldm.py: no VAE side; train_vae.py: no SiT).
    """

    vae: nn.Module | None = None
    transformer: nn.Module | None = None
    projector: nn.Module | None = None
    discriminator: nn.Module | None = None
    latent_norm: nn.Module | None = None
    encoders: list = field(default_factory=list)
    vae_loss: VAEReconstructionLoss | None = None
    optimizer_vae: torch.optim.Optimizer | None = None
    optimizer_disc: torch.optim.Optimizer | None = None
    optimizer_sit: torch.optim.Optimizer | None = None
    ema: ModelEMA | None = None
    extra: dict = field(default_factory=dict)


def images_to_vae_range(pixel_values: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float in [-1, 1] (``x / 127.5 - 1``)."""
    return pixel_values.float() / 127.5 - 1.0


@torch.no_grad()
def encoder_features(encoders: list, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Frozen vision-encoder tokens of the clean uint8 images, one ``[B, N, z_dim]`` per encoder."""
    return [encoder(pixel_values) for encoder in encoders]


def latent_norm_train(norm: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The latent BN in training mode, with statistics synchronised over processes (SPEC section 3).

    ``nn.SyncBatchNorm`` handles CUDA; it refuses CPU tensors, so with several CPU (gloo) processes the batch
    statistics are all-reduced here. No gradient is needed: the SiT pass runs on detached latents.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or isinstance(norm, nn.SyncBatchNorm):
        return norm(latents)
    with torch.no_grad():
        x = latents.double()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        dist.all_reduce(stats)
        channels = x.shape[1]
        n = stats[-1]
        mean = stats[:channels] / n
        var = stats[channels : 2 * channels] / n - mean * mean
        momentum = norm.momentum
        norm.running_mean.mul_(1 - momentum).add_((momentum * mean).to(norm.running_mean.dtype))
        norm.running_var.mul_(1 - momentum).add_((momentum * var * n / (n - 1)).to(norm.running_var.dtype))
        norm.num_batches_tracked.add_(1)
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + norm.eps)
    return out.to(latents.dtype)


@dataclass
class StepNoise:
    """The randomness shared by the VAE alignment pass and the SiT pass of one step."""

    t: torch.Tensor
    noise: torch.Tensor
    drop_labels: torch.Tensor


def draw_step_noise(latents: torch.Tensor, hp: RepaEHyperParameters, generator: torch.Generator | None) -> StepNoise:
    """t, Gaussian noise like ``latents`` and the label-dropout mask, drawn from ``generator`` in a fixed order."""
    batch = latents.shape[0]
    t = sample_time(batch, hp.weighting, hp.path_type, generator=generator)
    device = generator.device if generator is not None else None
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    drop = torch.rand(batch, generator=generator, device=device) < hp.cfg_prob
    return StepNoise(t.to(latents.device), noise.to(latents.device), drop.to(latents.device))


def _set_trainable(module: nn.Module, flag: bool) -> None:
    module.requires_grad_(flag)
    module.train(flag)


def decoder_last_layer(accelerator: Accelerator, vae: nn.Module) -> torch.Tensor:
    """The decoder's output conv weight (taming/LDM's "last layer" of the adaptive GAN weight)."""
    return accelerator.unwrap_model(vae).vae.decoder.conv_out.weight


def vae_generator_loss(
    accelerator: Accelerator,
    models: RepaEModels,
    images: torch.Tensor,
    generator: torch.Generator | None,
    global_step: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """VAE forward (autocast) and its generator loss terms: what train_repae.py and train_vae.py share.

    Returns the loss terms (`generator_loss_terms`), the sampled latents and the reconstruction.
    """
    with accelerator.autocast():
        mean, logvar, z, reconstruction = models.vae(images, generator=generator)
    terms = generator_loss_terms(accelerator, models, images, reconstruction, mean, logvar, global_step)
    return terms, z, reconstruction


def generator_loss_terms(
    accelerator: Accelerator,
    models: RepaEModels,
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    global_step: int,
) -> dict[str, torch.Tensor]:
    """``models.vae_loss`` of a reconstruction. The discriminator scores it unwrapped and frozen (the generator loss
    must not train it); it stays in train mode, as in the original."""
    discriminator = accelerator.unwrap_model(models.discriminator)
    discriminator.requires_grad_(False)
    last_layer = decoder_last_layer(accelerator, models.vae) if models.vae_loss.adaptive_disc_weight else None
    return models.vae_loss(images, reconstruction, mean, logvar, discriminator, global_step, last_layer)


def vae_alignment_pass(
    accelerator: Accelerator,
    models: RepaEModels,
    hp: RepaEHyperParameters,
    images: torch.Tensor,
    labels: torch.Tensor,
    zs: list[torch.Tensor],
    generator: torch.Generator | None,
    global_step: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, StepNoise]:
    """VAE update: ``gen_loss + vae_align_proj_coeff * proj_loss`` with the SiT frozen and in eval mode.

    The SiT, projector and latent BN run unwrapped (no DDP: they receive no gradient here) and the BN normalises
    with its running statistics, letting gradients flow through it into the VAE. Returns the loss terms, the
    detached latents and reconstructions and the step's shared noise.
    """
    transformer = accelerator.unwrap_model(models.transformer)
    projector = accelerator.unwrap_model(models.projector)
    for module in (transformer, projector):
        module.requires_grad_(False)
        module.eval()
    models.latent_norm.eval()

    terms, z, reconstruction = vae_generator_loss(accelerator, models, images, generator, global_step)
    noise = draw_step_noise(z, hp, generator)
    with accelerator.autocast():
        x_t, _ = noisy_latents_and_target(models.latent_norm(z.float()), noise.noise, noise.t, hp.path_type)
        hidden = transformer(x_t, noise.t, labels, return_hidden_states_at=hp.encoder_depth, align_only=True)
        proj_loss = repa_alignment_loss(zs, projector(hidden.hidden_states))
    loss = terms["loss"] + hp.vae_align_proj_coeff * proj_loss
    accelerator.backward(loss)
    out = {f"vae/{k}": v.detach() for k, v in terms.items() if k != "loss"}
    out["vae/gen_loss"] = terms["loss"].detach()
    out["vae/proj_loss"] = proj_loss.detach()
    out["vae/loss"] = loss.detach()
    if accelerator.sync_gradients:
        out["grad_norm/vae"] = grad_norm_for_logs(
            accelerator.clip_grad_norm_(models.vae.parameters(), hp.max_grad_norm)
        )
    models.optimizer_vae.step()
    models.optimizer_vae.zero_grad(set_to_none=True)
    return out, z.detach(), reconstruction.detach(), noise


def discriminator_pass(
    accelerator: Accelerator,
    models: RepaEModels,
    hp: RepaEHyperParameters,
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    global_step: int,
) -> dict[str, torch.Tensor]:
    """Discriminator update on ``(x, x_hat.detach())`` with the hinge loss, in fp32; skipped before disc_start."""
    if not models.vae_loss.gan_active(global_step):
        return {}
    models.discriminator.requires_grad_(True)
    models.discriminator.train()
    terms = models.vae_loss.discriminator_loss(models.discriminator, images, reconstruction)
    accelerator.backward(terms["loss"])
    out = {f"disc/{k}": v.detach() for k, v in terms.items()}
    if accelerator.sync_gradients:
        out["grad_norm/disc"] = grad_norm_for_logs(
            accelerator.clip_grad_norm_(models.discriminator.parameters(), hp.max_grad_norm)
        )
    models.optimizer_disc.step()
    models.optimizer_disc.zero_grad(set_to_none=True)
    return out


def sit_pass(
    accelerator: Accelerator,
    models: RepaEModels,
    hp: RepaEHyperParameters,
    latents: torch.Tensor,
    labels: torch.Tensor,
    zs: list[torch.Tensor],
    noise: StepNoise,
) -> dict[str, torch.Tensor]:
    """SiT update: ``mean((v_hat - v)^2) + proj_coeff * proj_loss`` on detached latents, BN in training mode."""
    for module in (models.transformer, models.projector):
        module.requires_grad_(True)
        module.train()
    models.latent_norm.train(not hp.freeze_latent_norm)
    with torch.no_grad():
        if hp.freeze_latent_norm:
            normalized = models.latent_norm(latents.detach().float())
        else:
            normalized = latent_norm_train(models.latent_norm, latents.detach().float())
    x_t, target = noisy_latents_and_target(normalized, noise.noise, noise.t, hp.path_type)
    null_class = accelerator.unwrap_model(models.transformer).config.num_classes
    labels = torch.where(noise.drop_labels, torch.full_like(labels, null_class), labels)
    with accelerator.autocast():
        output = models.transformer(x_t, noise.t, labels, return_hidden_states_at=hp.encoder_depth)
        proj_loss = repa_alignment_loss(zs, models.projector(output.hidden_states))
    denoise = denoising_loss(output.sample, target)
    loss = denoise + hp.proj_coeff * proj_loss
    accelerator.backward(loss)
    out = {"sit/denoising_loss": denoise.detach(), "sit/proj_loss": proj_loss.detach(), "sit/loss": loss.detach()}
    if accelerator.sync_gradients:
        params = list(models.transformer.parameters()) + list(models.projector.parameters())
        out["grad_norm/sit"] = grad_norm_for_logs(accelerator.clip_grad_norm_(params, hp.max_grad_norm))
    models.optimizer_sit.step()
    models.optimizer_sit.zero_grad(set_to_none=True)
    return out


def ema_target(accelerator: Accelerator, models: RepaEModels) -> nn.ModuleDict:
    """The modules the EMA follows: the SiT, the REPA projector and the latent BN (whose running statistics it
    averages), i.e. everything the original's single SiT module holds, whose EMA covers it all."""
    transformer = accelerator.unwrap_model(models.transformer)
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile wrapper
    projector = accelerator.unwrap_model(models.projector)
    return nn.ModuleDict({"transformer": transformer, "projector": projector, "latent_norm": models.latent_norm})


def vae_reconstruction_update(
    accelerator: Accelerator,
    models: RepaEModels,
    images: torch.Tensor,
    generator: torch.Generator | None,
    global_step: int,
    max_grad_norm: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """VAE update on its generator loss alone (no alignment term): `train_vae.py`'s step.

    Returns the logged terms (``vae/*``, ``grad_norm/vae``), the detached latents and the detached reconstruction.
    """
    terms, z, reconstruction = vae_generator_loss(accelerator, models, images, generator, global_step)
    accelerator.backward(terms["loss"])
    logs = {f"vae/{k}": v.detach() for k, v in terms.items()}
    if accelerator.sync_gradients:
        logs["grad_norm/vae"] = grad_norm_for_logs(accelerator.clip_grad_norm_(models.vae.parameters(), max_grad_norm))
    models.optimizer_vae.step()
    models.optimizer_vae.zero_grad(set_to_none=True)
    return logs, z.detach(), reconstruction.detach()


def train_step(
    accelerator: Accelerator,
    models: RepaEModels,
    hp: RepaEHyperParameters,
    batch: dict,
    generator: torch.Generator | None,
    global_step: int,
) -> dict[str, torch.Tensor]:
    """One full REPA-E step on a batch ``{"pixel_values": uint8 [B,3,H,W], "labels": [B]}``; returns loss terms:
    VAE (with alignment) -> discriminator -> SiT -> EMA."""
    pixel_values, labels = batch["pixel_values"], batch["labels"].long()
    images = images_to_vae_range(pixel_values)
    with accelerator.accumulate(models.vae, models.transformer, models.projector, models.discriminator):
        zs = encoder_features(models.encoders, pixel_values)
        logs, latents, reconstruction, noise = vae_alignment_pass(
            accelerator, models, hp, images, labels, zs, generator, global_step
        )
        logs.update(discriminator_pass(accelerator, models, hp, images, reconstruction, global_step))
        logs.update(sit_pass(accelerator, models, hp, latents, labels, zs, noise))
        if accelerator.sync_gradients and models.ema is not None:
            models.ema.step(ema_target(accelerator, models))
    return logs


def grad_norm_for_logs(norm) -> torch.Tensor:
    """``clip_grad_norm_``'s total norm (before clipping) as a detached float tensor for the step's logs."""
    return torch.as_tensor(norm).detach().float()

"""ABLATION ONLY, not REPA-E: the paper's negative control, for ``benchmarks/ablation.py --arms naive_e2e``.

*Naive end-to-end training*: the VAE and the SiT train together, but the SiT's denoising loss flows back into the
VAE (no stop-gradient on the latents) and the alignment loss does not reach the VAE. The paper reports that this
makes the latent space collapse towards something trivially easy to denoise and hurts generation; REPA-E exists
because of it (`repae_step.train_step` tunes the VAE through the alignment loss alone and trains the SiT on
detached latents). ``train_repae.py --ablation naive_e2e`` selects this step; nobody should train a model with it.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .losses import denoising_loss, noisy_latents_and_target, repa_alignment_loss
from .repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    discriminator_pass,
    draw_step_noise,
    ema_target,
    encoder_features,
    grad_norm_for_logs,
    images_to_vae_range,
    vae_generator_loss,
)


def check_naive_end_to_end_setup(num_processes: int, gradient_accumulation_steps: int) -> None:
    """The step back-propagates two losses into two parameter sets by hand, which only one process without
    accumulation does as written (DDP would need both backward passes to synchronise)."""
    if num_processes != 1 or gradient_accumulation_steps != 1:
        raise ValueError(
            f"--ablation naive_e2e runs on one process without gradient accumulation, got {num_processes} "
            f"process(es) and --gradient_accumulation_steps {gradient_accumulation_steps}."
        )


def naive_end_to_end_step(
    accelerator: Accelerator,
    models: RepaEModels,
    hp: RepaEHyperParameters,
    batch: dict,
    generator: torch.Generator | None,
    global_step: int,
) -> dict[str, torch.Tensor]:
    """One step: VAE + SiT update from one forward pass (VAE loss + denoising loss into the VAE; denoising +
    ``proj_coeff`` x alignment into the SiT and projector), then the discriminator, then the EMA. The randomness
    is drawn in `train_step`'s order (posterior sample, then t / noise / label dropout)."""
    pixel_values, labels = batch["pixel_values"], batch["labels"].long()
    images = images_to_vae_range(pixel_values)
    zs = encoder_features(models.encoders, pixel_values)
    for module in (models.transformer, models.projector):
        module.requires_grad_(True)
        module.train()
    models.latent_norm.train()

    terms, z, reconstruction = vae_generator_loss(accelerator, models, images, generator, global_step)
    noise = draw_step_noise(z, hp, generator)
    # no stop-gradient: the BN (batch statistics) and the noisy latents and targets keep the VAE in the graph
    x_t, target = noisy_latents_and_target(models.latent_norm(z.float()), noise.noise, noise.t, hp.path_type)
    null_class = accelerator.unwrap_model(models.transformer).config.num_classes
    labels = torch.where(noise.drop_labels, torch.full_like(labels, null_class), labels)
    with accelerator.autocast():
        output = models.transformer(x_t, noise.t, labels, return_hidden_states_at=hp.encoder_depth)
        proj_loss = repa_alignment_loss(zs, models.projector(output.hidden_states))
    denoise = denoising_loss(output.sample, target)

    vae_params = [p for p in models.vae.parameters() if p.requires_grad]
    sit_params = list(models.transformer.parameters()) + list(models.projector.parameters())
    vae_loss = terms["loss"] + denoise
    sit_loss = denoise + hp.proj_coeff * proj_loss
    vae_loss.backward(inputs=vae_params, retain_graph=True)  # the alignment term is not in the VAE's loss
    sit_loss.backward(inputs=sit_params)
    logs = {f"vae/{k}": v.detach() for k, v in terms.items() if k != "loss"}
    logs.update({"vae/gen_loss": terms["loss"].detach(), "vae/loss": vae_loss.detach()})
    logs.update({"sit/denoising_loss": denoise.detach(), "sit/proj_loss": proj_loss.detach()})
    logs["sit/loss"] = sit_loss.detach()
    logs["grad_norm/vae"] = grad_norm_for_logs(accelerator.clip_grad_norm_(vae_params, hp.max_grad_norm))
    logs["grad_norm/sit"] = grad_norm_for_logs(accelerator.clip_grad_norm_(sit_params, hp.max_grad_norm))
    for optimizer in (models.optimizer_vae, models.optimizer_sit):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    logs.update(discriminator_pass(accelerator, models, hp, images, reconstruction.detach(), global_step))
    if models.ema is not None:
        models.ema.step(ema_target(accelerator, models))
    return logs

"""One REPA-E end-to-end training step on the tiny recipe, split by phase, and the training-side optimisations
(REPA loss vectorised vs per-sample loop, EMA foreach vs per-parameter loop, AdamW for-loop vs foreach vs fused,
channels_last for the VAE).

    .venv/bin/python benchmarks/bench_train_step.py [--quick] [--train_batch_size 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from common import (
    Table,
    add_train_step_args,
    build_sit,
    max_abs_diff,
    measure,
    measure_pair,
    profile_call,
    speedup,
    suite_main,
    synchronize,
)
from diffusers_repae import LatentBatchNorm, build_component
from diffusers_repae.models.discriminator import PatchGANDiscriminator
from diffusers_repae.training.ema import ModelEMA, update_ema
from diffusers_repae.training.losses import (
    VAEReconstructionLoss,
    denoising_loss,
    hinge_d_loss,
    noisy_latents_and_target,
    repa_alignment_loss,
)
from diffusers_repae.training.repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    VAEWithPosterior,
    draw_step_noise,
    ema_target,
    encoder_features,
    images_to_vae_range,
    latent_norm_train,
    train_step,
)

RECIPE = "tiny-cpu"
PHASES = [
    "vision encoder",
    "VAE forward (encode, sample, decode)",
    "VAE losses (L1, KL, GAN generator)",
    "align pass (frozen SiT to block k, projector)",
    "VAE + align backward",
    "VAE clip + AdamW",
    "discriminator fwd + bwd",
    "discriminator clip + AdamW",
    "SiT pass (latent BN, SiT, projector, losses)",
    "SiT backward",
    "SiT clip + AdamW",
    "EMA (SiT + projector + BN buffers)",
]


def load_encoders(resolution: int, num_tokens: int, device: torch.device) -> tuple[list, str]:
    """The offline vision encoder of the tiny recipe (EfficientNet-Lite0, bundled weights)."""
    from diffusers_repae.training.encoders import load_vision_encoders

    return load_vision_encoders("efficientnet-lite0", resolution, num_tokens, device), "efficientnet-lite0"


def build_tiny_training(device: torch.device, seed: int = 0):
    """Accelerator, models, hyper-parameters and a batch for one tiny-recipe REPA-E step (no LPIPS: offline)."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=device.type == "cpu")
    vae = build_component(RECIPE, "vae")
    transformer = build_component(RECIPE, "transformer")
    resolution = vae.config.sample_size
    num_tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
    encoders, encoder_name = load_encoders(resolution, num_tokens, device)
    projector = build_component(RECIPE, "projector", z_dims=[e.z_dim for e in encoders])
    hp = RepaEHyperParameters(encoder_depth=projector.config.encoder_depth)
    discriminator = PatchGANDiscriminator()
    latent_norm = LatentBatchNorm(vae.config.latent_channels).to(device)
    vae_loss = VAEReconstructionLoss(None, lpips_weight=0.0)
    vae_module = VAEWithPosterior(vae).to(device)
    transformer, projector, discriminator = transformer.to(device), projector.to(device), discriminator.to(device)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    models = RepaEModels(
        vae=vae_module,
        transformer=transformer,
        projector=projector,
        discriminator=discriminator,
        latent_norm=latent_norm,
        encoders=encoders,
        vae_loss=vae_loss,
        optimizer_vae=adamw(vae_module.parameters()),
        optimizer_disc=adamw(discriminator.parameters()),
        optimizer_sit=adamw(list(transformer.parameters()) + list(projector.parameters())),
    )
    models.ema = ModelEMA(ema_target(accelerator, models), decay=0.9999)
    return accelerator, models, hp, resolution, encoder_name


def make_batch(batch_size: int, resolution: int, num_classes: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, 3, resolution, resolution), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return {"pixel_values": pixels.to(device), "labels": labels.to(device)}


def phased_step(models: RepaEModels, hp: RepaEHyperParameters, batch: dict, generator, device) -> dict[str, float]:
    """The library's step (repae_step.train_step, same order and modes) with a timer around every phase."""
    times: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        synchronize(device)
        now = time.perf_counter()
        times[name] = now - clock[0]
        clock[0] = now

    pixel_values, labels = batch["pixel_values"], batch["labels"].long()
    images = images_to_vae_range(pixel_values)
    zs = encoder_features(models.encoders, pixel_values)
    lap(PHASES[0])
    # VAE update through a frozen, eval-mode SiT (repae_step.vae_alignment_pass).
    transformer, projector, disc = models.transformer, models.projector, models.discriminator
    for module in (transformer, projector):
        module.requires_grad_(False).eval()
    models.latent_norm.eval()
    disc.requires_grad_(False)
    mean, logvar, z, reconstruction = models.vae(images, generator=generator)
    lap(PHASES[1])
    noise = draw_step_noise(z, hp, generator)
    terms = models.vae_loss(images, reconstruction, mean, logvar, disc, 0)
    lap(PHASES[2])
    x_t, _ = noisy_latents_and_target(models.latent_norm(z.float()), noise.noise, noise.t, hp.path_type)
    hidden = transformer(x_t, noise.t, labels, return_hidden_states_at=hp.encoder_depth, align_only=True)
    proj_loss = repa_alignment_loss(zs, projector(hidden.hidden_states))
    lap(PHASES[3])
    (terms["loss"] + hp.vae_align_proj_coeff * proj_loss).backward()
    lap(PHASES[4])
    torch.nn.utils.clip_grad_norm_(models.vae.parameters(), hp.max_grad_norm)
    models.optimizer_vae.step()
    models.optimizer_vae.zero_grad(set_to_none=True)
    lap(PHASES[5])
    # Discriminator (repae_step.discriminator_pass).
    disc.requires_grad_(True).train()
    hinge_d_loss(disc(images.float()), disc(reconstruction.detach().float())).backward()
    lap(PHASES[6])
    torch.nn.utils.clip_grad_norm_(disc.parameters(), hp.max_grad_norm)
    models.optimizer_disc.step()
    models.optimizer_disc.zero_grad(set_to_none=True)
    lap(PHASES[7])
    # SiT update on detached latents, same t and noise (repae_step.sit_pass).
    for module in (transformer, projector):
        module.requires_grad_(True).train()
    models.latent_norm.train()
    with torch.no_grad():
        normalized = latent_norm_train(models.latent_norm, z.detach().float())
    x_t, target = noisy_latents_and_target(normalized, noise.noise, noise.t, hp.path_type)
    labels = torch.where(noise.drop_labels, torch.full_like(labels, transformer.config.num_classes), labels)
    output = transformer(x_t, noise.t, labels, return_hidden_states_at=hp.encoder_depth)
    loss = denoising_loss(output.sample, target) + hp.proj_coeff * repa_alignment_loss(
        zs, projector(output.hidden_states)
    )
    lap(PHASES[8])
    loss.backward()
    lap(PHASES[9])
    params = list(transformer.parameters()) + list(projector.parameters())
    torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
    models.optimizer_sit.step()
    models.optimizer_sit.zero_grad(set_to_none=True)
    lap(PHASES[10])
    models.ema.step(
        torch.nn.ModuleDict({"transformer": transformer, "projector": projector, "latent_norm": models.latent_norm})
    )
    lap(PHASES[11])
    return times


def phase_table(args, device: torch.device) -> Table:
    """Median time per phase of the composed step, its FLOPs and memory, and the library's train_step as a check."""
    accelerator, models, hp, resolution, encoder_name = build_tiny_training(device, args.seed)
    batch_size = 1 if args.quick else args.train_batch_size
    batch = make_batch(batch_size, resolution, models.transformer.config.num_classes, device, args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    table = Table(
        f"REPA-E train step by phase ({RECIPE}, batch {batch_size}, {resolution} px, {device.type}, fp32)",
        ["phase", "ms", "share"],
    )
    # First call: FLOPs and peak memory (optimiser state and gradients get allocated here); also the warm-up.
    flops, mem, method = profile_call(lambda: phased_step(models, hp, batch, generator, device), device)
    for _ in range(max(0, args.warmup - 1)):
        phased_step(models, hp, batch, generator, device)
    runs = [phased_step(models, hp, batch, generator, device) for _ in range(max(1, args.repeats))]
    medians = {name: statistics.median(run[name] for run in runs) for name in PHASES}
    total = sum(medians.values())
    for name in PHASES:
        table.add(phase=name, ms=medians[name] * 1e3, share=f"{100 * medians[name] / total:.1f}%")
    table.add(phase="total (sum of phase medians)", ms=total * 1e3, share="100%")

    def library_step():
        return train_step(accelerator, models, hp, batch, generator, global_step=0)

    whole = measure(library_step, device, repeats=args.repeats, warmup=args.warmup)
    table.add(phase="library repae_step.train_step (whole)", ms=whole.median * 1e3, share="-")
    table.notes.append(
        f"{flops / 1e9:.2f} GFLOP per step (FlopCounterMode), {flops / total / 1e9:.2f} GFLOP/s; "
        f"peak memory {mem:.0f} MiB ({method}); vision encoder {encoder_name}; LPIPS off (no VGG weights offline)."
    )
    table.notes.append("phases: the library step's code path with a synchronised timer after each phase; medians.")
    return table


def repa_loss_loop(zs: list[torch.Tensor], zs_tilde: list[torch.Tensor]) -> torch.Tensor:
    """The original REPA/REPA-E alignment loss: a Python loop over encoders and over the batch ("before")."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for j in range(bsz):
            z_j = F.normalize(z[j], dim=-1)
            z_tilde_j = F.normalize(z_tilde[j], dim=-1)
            proj_loss = proj_loss + torch.mean(-(z_j * z_tilde_j).sum(dim=-1))
    return proj_loss / (len(zs) * bsz)


def ema_loop(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The original per-parameter EMA loop (``ema.mul_(decay).add_(p, alpha=1 - decay)``), buffers copied/averaged."""
    with torch.no_grad():
        ema_params = dict(ema_model.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)
        ema_buffers = dict(ema_model.named_buffers())
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                ema_buffers[name].mul_(decay).add_(buffer, alpha=1 - decay)
            else:
                ema_buffers[name].copy_(buffer)


def ema_foreach(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float, lerp: bool = False) -> None:
    """The proposed EMA: one ``torch._foreach_*`` call over all tensors (mul+add is bit-identical to the loop)."""
    with torch.no_grad():
        ema_t = [p for p in ema_model.parameters()] + [b for b in ema_model.buffers() if b.is_floating_point()]
        src_t = [p.detach() for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
        if lerp:
            torch._foreach_lerp_(ema_t, src_t, 1 - decay)
        else:
            torch._foreach_mul_(ema_t, decay)
            torch._foreach_add_(ema_t, src_t, alpha=1 - decay)
        for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
            if not buffer.is_floating_point():
                ema_buffer.copy_(buffer)


def params_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(max_abs_diff(x, y) for x, y in zip(a.parameters(), b.parameters()))


def add_pair(table: Table, name: str, before_name: str, after_name: str, before, after, diff=None) -> None:
    table.add(
        optimisation=name,
        before=before_name,
        after=after_name,
        before_ms=before.median * 1e3,
        after_ms=after.median * 1e3,
        speedup=speedup(before, after),
        max_abs_diff=diff,
    )


def repa_loss_rows(table: Table, args, device: torch.device) -> None:
    """Alignment loss forward + backward; sizes of one GPU's share of a REPA-E batch (32 x 256 tokens x 768)."""
    batch, tokens, dim = (4, 64, 112) if args.quick else (32, 256, 768)
    generator = torch.Generator().manual_seed(args.seed)
    zs = [torch.randn(batch, tokens, dim, generator=generator).to(device)]
    projected = [torch.randn(batch, tokens, dim, generator=generator).to(device).requires_grad_(True)]

    def run(loss_fn):
        def fn():
            projected[0].grad = None
            loss = loss_fn(zs, projected)
            loss.backward()
            return loss.detach(), projected[0].grad.clone()

        return fn

    before, after = measure_pair(run(repa_loss_loop), run(repa_alignment_loss), device, args.repeats, args.warmup)
    (loss_b, grad_b), (loss_a, grad_a) = run(repa_loss_loop)(), run(repa_alignment_loss)()
    diff = max(max_abs_diff(loss_b, loss_a), max_abs_diff(grad_b, grad_a))
    add_pair(
        table, f"REPA loss fwd+bwd [{batch}x{tokens}x{dim}]", "loop over batch", "vectorised", before, after, diff
    )


def ema_rows(table: Table, args, device: torch.device) -> None:
    """EMA update of a SiT: the per-parameter loop (original and library) vs one foreach call."""
    config = "tiny" if args.quick else args.ema_config
    model, _ = build_sit(config, device, args.seed)
    ema_a = copy.deepcopy(model)
    ema_b = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    decay = 0.9999
    label = f"EMA SiT-{config} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M)"
    pairs = [
        ("per-param loop (original)", "_foreach_mul_ + _foreach_add_", lambda: ema_foreach(ema_b, model, decay)),
        ("per-param loop (original)", "_foreach_lerp_", lambda: ema_foreach(ema_b, model, decay, lerp=True)),
        ("per-param loop (original)", "library update_ema", lambda: update_ema(ema_b, model, decay)),
    ]
    for before_name, after_name, after_fn in pairs[:1] if args.quick else pairs:
        before, after = measure_pair(lambda: ema_loop(ema_a, model, decay), after_fn, device, args.repeats, 1)
        # Numerics: one update from identical EMA states.
        with torch.no_grad():
            for a, b in zip(ema_a.parameters(), ema_b.parameters()):
                b.copy_(a)
        ema_loop(ema_a, model, decay)
        after_fn()
        add_pair(table, label, before_name, after_name, before, after, params_diff(ema_a, ema_b))


def adamw_rows(table: Table, args, device: torch.device) -> None:
    """AdamW step of a SiT's parameters: for-loop vs foreach vs fused (each variant built, timed, freed in turn)."""
    config = "tiny" if args.quick else args.ema_config
    model, _ = build_sit(config, device, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    grads = [torch.randn(p.shape, generator=generator).to(device) * 1e-3 for p in model.parameters()]
    variants = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    results, finals = {}, {}
    for name, flags in variants.items():
        replica = copy.deepcopy(model)
        try:
            optimizer = torch.optim.AdamW(replica.parameters(), lr=1e-4, weight_decay=0.0, **flags)
        except (RuntimeError, ValueError) as error:  # fused AdamW needs a recent torch on CPU
            table.notes.append(f"AdamW {name} unavailable on {device.type}: {error}")
            continue
        for p, g in zip(replica.parameters(), grads):
            p.grad = g.clone()
        results[name] = measure(optimizer.step, device, repeats=args.repeats, warmup=args.warmup)
        finals[name] = [p.detach().clone() for p in replica.parameters()]
        del replica, optimizer
    label = f"AdamW step SiT-{config}"
    for name in ("foreach", "fused"):
        if name in results:
            diff = max(max_abs_diff(a, b) for a, b in zip(finals["for-loop"], finals[name]))
            add_pair(table, label, "for-loop (foreach=False)", name, results["for-loop"], results[name], diff)


def channels_last_rows(table: Table, args, device: torch.device) -> None:
    """VAE with NCHW vs channels_last weights and inputs: tiny VAE fwd+bwd, and SD-VAE (f8d4) forward."""
    batch = 1 if args.quick else args.train_batch_size
    cases = [("tiny VAE fwd+bwd", build_component(RECIPE, "vae"), batch, 64, True)]
    if not args.quick:
        from diffusers_repae.models.vae import build_vae

        cases.append(("SD-VAE f8d4 forward 64px", build_vae("f8d4"), 1, 64, False))
    for label, vae, batch, size, train in cases:
        vae = vae.to(device)
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(batch, 3, size, size, generator=generator).to(device)
        reference = copy.deepcopy(vae)
        fast = copy.deepcopy(vae).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def run(model, inp, train=train):
            def fn():
                if train:
                    out = model(inp).sample
                    out.float().pow(2).mean().backward()
                    model.zero_grad(set_to_none=True)
                    return out.detach()
                with torch.no_grad():
                    return model(inp).sample

            return fn

        before, after = measure_pair(run(reference, x), run(fast, x_cl), device, args.repeats, args.warmup)
        with torch.no_grad():
            diff = max_abs_diff(reference(x, sample_posterior=False).sample, fast(x_cl, sample_posterior=False).sample)
        add_pair(table, label, "NCHW (contiguous)", "channels_last", before, after, diff)


def optimisation_table(args, device: torch.device) -> Table:
    table = Table(
        f"Training optimisations ({device.type})",
        ["optimisation", "before", "after", "before_ms", "after_ms", "speedup", "max_abs_diff"],
    )
    repa_loss_rows(table, args, device)
    ema_rows(table, args, device)
    adamw_rows(table, args, device)
    channels_last_rows(table, args, device)
    table.notes.append("before/after interleaved (b, a, b, a, ...) and median of repeats, except AdamW (one variant")
    table.notes.append("at a time, to keep one SiT copy of optimiser state in memory). max_abs_diff: outputs/params.")
    return table


def run(args: argparse.Namespace, device: torch.device) -> list[Table]:
    return [phase_table(args, device), optimisation_table(args, device)]


if __name__ == "__main__":
    suite_main(__doc__, add_train_step_args, run)

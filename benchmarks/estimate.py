"""FLOP-based ESTIMATE (not a measurement) of SiT-XL/2 and full REPA-E training throughput on one H100.

FLOPs per 256 px image are counted with FlopCounterMode on meta-device models (exact shapes, no compute);
throughput = MFU x 989 TFLOP/s (H100 SXM dense bf16) / FLOPs per image, for an assumed MFU.

    .venv/bin/python benchmarks/estimate.py [--mfu 0.35,0.40]
"""

from __future__ import annotations

import argparse

import torch

from common import Table, add_estimate_args, count_flops, meta_flops, suite_main
from diffusers_repae import build_component
from diffusers_repae.models.discriminator import PatchGANDiscriminator
from diffusers_repae.models.vae import build_vae

H100_BF16_DENSE = 989e12
STEPS, BATCH = 400_000, 256  # REPA-E's schedule (SPEC section 7)


def align_pass_flops(recipe: str = "sit-xl-2-sdvae") -> int:
    """Frozen SiT to block ``encoder_depth`` + projector, gradients only w.r.t. the latent (the VAE update)."""
    with torch.device("meta"):
        model = build_component(recipe, "transformer").eval().requires_grad_(False)
        projector = build_component(recipe, "projector").eval().requires_grad_(False)
        x = torch.empty(1, 4, 32, 32, requires_grad=True)
        t, y = torch.empty(1), torch.zeros(1, dtype=torch.long)
    depth = projector.config.encoder_depth

    def run():
        hidden = model(x, t, y, return_hidden_states_at=depth, align_only=True).hidden_states
        projector(hidden)[0].sum().backward()

    return count_flops(run)


def vae_flops(size: int = 256) -> int:
    """SD-VAE (f8d4): encode, sample, decode, backward (weights and input path)."""
    with torch.device("meta"):
        vae = build_vae("f8d4")
        x = torch.empty(1, 3, size, size)
    return count_flops(lambda: vae(x, sample_posterior=True).sample.sum().backward())


def discriminator_flops(size: int = 256) -> int:
    """PatchGAN: generator term (D frozen, grad to x_hat) + D update on real and fake."""
    with torch.device("meta"):
        disc = PatchGANDiscriminator()
        real, fake = torch.empty(1, 3, size, size), torch.empty(1, 3, size, size, requires_grad=True)

    def run():
        disc.requires_grad_(False)
        disc(fake).sum().backward()
        disc.requires_grad_(True)
        (disc(real).sum() + disc(fake.detach()).sum()).backward()

    return count_flops(run)


def dinov2_flops() -> int | None:
    """DINOv2-B/14 forward at 224 px (the alignment target), from a transformers config; None if unavailable."""
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError:
        return None
    config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    config.image_size, config.patch_size = 224, 14
    with torch.device("meta"):
        model = Dinov2Model(config).eval()
        images = torch.empty(1, 3, 224, 224)
    with torch.no_grad():
        return count_flops(lambda: model(pixel_values=images))


def estimate_table(mfus: list[float]) -> Table:
    _, sit_step = meta_flops("XL", 1)
    parts = [
        ("SiT-XL/2 train step (fwd + bwd, projector)", sit_step),
        ("SiT-XL/2 align pass for the VAE (frozen, to block 8)", align_pass_flops()),
        ("SD-VAE f8d4 encode + decode, fwd + bwd", vae_flops()),
        ("PatchGAN discriminator (G term + D update)", discriminator_flops()),
        ("DINOv2-B/14 forward (no grad)", dinov2_flops()),
    ]
    parts = [(name, flops) for name, flops in parts if flops is not None]
    columns = ["item", "GFLOP_per_img"] + [f"img_per_s@MFU{m:.0%}" for m in mfus]
    columns.append(f"H100_days_{STEPS // 1000}k_steps_bs{BATCH}@MFU{mfus[-1]:.0%}")
    table = Table("ESTIMATE: training throughput on one H100 (SiT-XL/2, 256 px)", columns)

    def add(name: str, flops: int, with_throughput: bool) -> None:
        row = {"item": name, "GFLOP_per_img": flops / 1e9}
        if with_throughput:
            for m in mfus:
                row[f"img_per_s@MFU{m:.0%}"] = m * H100_BF16_DENSE / flops
            row[columns[-1]] = STEPS * BATCH * flops / (mfus[-1] * H100_BF16_DENSE) / 86400
        table.add(**row)

    for name, flops in parts:
        add(name, flops, with_throughput=False)
    add("= LDM / REPA step (SiT only, cached latents)", sit_step, with_throughput=True)
    add("= REPA-E end-to-end step (all of the above)", sum(f for _, f in parts), with_throughput=True)
    table.notes.append(
        "ESTIMATE, not a measurement: FLOPs per image from FlopCounterMode (meta device); throughput = MFU x "
        "989 TFLOP/s (H100 SXM dense bf16) / FLOPs. MFU 35-40% is an assumption typical of well-tuned bf16 "
        "DiT/SiT training; fp16 mixed precision with many small VAE convolutions may reach less."
    )
    table.notes.append("LPIPS (VGG16, ~4% more) and data loading are not included.")
    return table


def run(args: argparse.Namespace, device: torch.device) -> list[Table]:
    return [estimate_table([float(m) for m in args.mfu.split(",")])]


if __name__ == "__main__":
    suite_main(__doc__, add_estimate_args, run)

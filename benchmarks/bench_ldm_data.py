"""LDM-only training inputs: what a latent cache saves against encoding every batch with the frozen VAE.

Per batch, train_ldm.py needs raw latents (cache: re-sample ``mean + std * n``; on the fly: VAE encode + sample)
and vision-encoder tokens of the images (computed on the fly in both cases). This times the three pieces on the
tiny-cpu recipe's VAE and, for scale, on the full SD-VAE (f8d4) at 256 px.

    .venv/bin/python benchmarks/bench_ldm_data.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

from common import Table, add_ldm_data_args, measure, suite_main
from diffusers_repae import build_component, build_vae
from diffusers_repae.training.encoders import load_vision_encoders
from diffusers_repae.training.ldm_step import batch_latents


def time_inputs(vae, resolution: int, batch: int, num_tokens: int, device, repeats: int, warmup: int) -> dict:
    """Seconds per batch: cached latents, VAE encoding, and the EfficientNet-Lite0 tokens of the images."""
    vae = vae.to(device).eval()
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    with torch.no_grad():
        posterior = vae.encode(images.float() / 127.5 - 1).latent_dist
    cached = {"mean": posterior.mean, "std": posterior.std}
    generator = torch.Generator().manual_seed(0)
    encoder = load_vision_encoders("efficientnet-lite0", resolution, num_tokens, device)[0]
    return {
        "cache": measure(lambda: batch_latents(cached, vae, generator), device, repeats, warmup).median,
        "encode": measure(
            lambda: batch_latents({"pixel_values": images}, vae, generator), device, repeats, warmup
        ).median,
        "encoder": measure(lambda: encoder(images), device, repeats, warmup).median,
    }


def run(args: argparse.Namespace, device: torch.device) -> list[Table]:
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = 0 if args.quick else 1
    configs = [("tiny-cpu VAE (f4, 64 px)", build_component("tiny-cpu", "vae"), 64, 16, 64, repeats, warmup)]
    if not args.quick:  # a 256 px SD-VAE encode takes ~20 s on a 2-core CPU: one untimed-warm-up-free call there
        on_cpu = device.type == "cpu"
        sd = ("SD-VAE f8d4 (256 px)", build_vae("f8d4"), 256, 4 if on_cpu else 64, 256)
        configs.append((*sd, 1 if on_cpu else repeats, 0 if on_cpu else warmup))
    table = Table(
        "LDM-only inputs per batch: latent cache vs VAE encoding on the fly",
        ["vae", "batch", "cached latents ms", "VAE encode ms", "encoder ms", "step inputs: cache vs on the fly"],
        notes=[
            "encoder = EfficientNet-Lite0 tokens of the images, needed on both routes (train_ldm.py computes them "
            "on the fly); the cache removes the VAE encoder pass, the dominant input cost.",
        ],
    )
    for name, vae, resolution, batch, tokens, config_repeats, config_warmup in configs:
        t = time_inputs(vae, resolution, batch, tokens, device, config_repeats, config_warmup)
        ratio = (t["encode"] + t["encoder"]) / (t["cache"] + t["encoder"])
        table.add(
            vae=name,
            batch=batch,
            **{
                "cached latents ms": 1e3 * t["cache"],
                "VAE encode ms": 1e3 * t["encode"],
                "encoder ms": 1e3 * t["encoder"],
                "step inputs: cache vs on the fly": f"{ratio:.1f}x",
            },
        )
    return [table]


if __name__ == "__main__":
    suite_main(__doc__, add_ldm_data_args, run)

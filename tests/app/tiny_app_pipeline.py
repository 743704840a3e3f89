"""The tiny pipeline of the app tests (a module of its own: test files import it, conftest.py is not importable)."""

import torch
from diffusers import AutoencoderKL

from diffusers_repae import FlowMatchEulerMaruyamaScheduler, RepaEPipeline, SiTTransformer2DModel

IMAGE_SIZE = 32  # 8x8 latents, a VAE with 3 levels (2 halvings)


def tiny_pipeline(num_classes: int = 1000, id2label: dict | None = None) -> RepaEPipeline:
    """A 2-block SiT of width 32 on 8x8x4 latents and a 3-level VAE: 32 px images in well under a second.

    1000 classes by default, so the pipeline has the ImageNet names: the page's class picker at its real size.
    """
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=2,
        num_classes=num_classes,
    )
    with torch.no_grad():  # adaLN-Zero makes a fresh SiT output exactly 0: perturb everything
        for param in sit.parameters():
            param.normal_(std=0.05)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        latents_mean=[0.1, -0.1, 0.0, 0.2],
        latents_std=[1.2, 0.8, 1.0, 1.5],
    )
    return RepaEPipeline(
        sit.eval(),
        vae.eval(),
        FlowMatchEulerMaruyamaScheduler(),
        id2label=id2label,
        default_num_inference_steps=4,
        default_guidance_scale=1.5,
        default_guidance_interval=[0.0, 0.8],
    )

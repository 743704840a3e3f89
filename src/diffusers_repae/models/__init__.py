from .discriminator import PatchGANDiscriminator
from .latent_norm import LatentBatchNorm
from .projector import REPAProjector
from .transformer_sit import SiTTransformer2DModel, SiTTransformer2DModelOutput, sincos_pos_embed_2d
from .vae import VAE_PRESETS, build_vae, denormalize_latents, normalize_latents, vae_config

__all__ = [
    "LatentBatchNorm",
    "PatchGANDiscriminator",
    "REPAProjector",
    "SiTTransformer2DModel",
    "SiTTransformer2DModelOutput",
    "VAE_PRESETS",
    "build_vae",
    "denormalize_latents",
    "normalize_latents",
    "sincos_pos_embed_2d",
    "vae_config",
]

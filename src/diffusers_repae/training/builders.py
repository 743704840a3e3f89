"""The models and losses a training run starts from: the VAE loss, the starting VAE and discriminator."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..errors import UserError
from ..models.discriminator import PatchGANDiscriminator
from ..recipes import build_component, resolve_recipe
from ..weight_files import load_weights_into, loading, read_state_dict
from .losses import VAEReconstructionLoss, load_lpips

logger = logging.getLogger(__name__)


def build_vae_loss(
    device: torch.device,
    l1_weight: float = 1.0,
    lpips_weight: float = 1.0,
    kl_weight: float = 1e-6,
    disc_weight: float = 0.1,
    disc_start: int = 0,
    disc_factor: float = 1.0,
    adaptive_disc_weight: bool = False,
    lpips_input_range: str = "correct",
    lpips_vgg_path: str | None = None,
) -> VAEReconstructionLoss:
    """The VAE loss with these weights (REPA-E's by default; the `add_vae_loss_args` flags), with LPIPS loaded (or
    a clear error when it cannot be)."""
    lpips = None
    if lpips_weight != 0:
        try:
            lpips = load_lpips(lpips_vgg_path).to(device)
        except UserError:  # a --lpips_vgg_path of the wrong kind: its own line
            raise
        except Exception as error:  # the download of torchvision's VGG16 fails offline
            raise RuntimeError(
                "could not load LPIPS' VGG16 backbone; pass --lpips_vgg_path to a local torchvision vgg16 state "
                "dict, or drop the perceptual term with --no_lpips."
            ) from error
    else:
        logger.warning("LPIPS perceptual loss DISABLED (--lpips_weight 0 / --no_lpips).")
    return VAEReconstructionLoss(
        lpips, l1_weight, lpips_weight, kl_weight, disc_weight, disc_start, disc_factor,
        adaptive_disc_weight, lpips_input_range,
    )  # fmt: skip


def load_starting_vae(vae: str | None, recipe: str | Path) -> AutoencoderKL:
    """``vae`` (``--vae``: an AutoencoderKL folder, a pipeline folder or a recipe name) or the ``recipe``'s VAE
    with random weights."""
    if vae is None:
        return build_component(recipe, "vae")
    path = Path(vae)
    if (path / "vae" / "config.json").is_file():
        with loading("--vae", path, "AutoencoderKL"):
            return AutoencoderKL.from_pretrained(path, subfolder="vae")
    if (path / "config.json").is_file():
        with loading("--vae", path, "AutoencoderKL"):
            return AutoencoderKL.from_pretrained(path)
    try:
        return build_component(resolve_recipe(vae), "vae")  # a recipe name: random weights of that config
    except ValueError as error:
        raise ValueError(f"--vae {vae!r} is neither an AutoencoderKL folder nor a recipe.") from error


def load_starting_discriminator(path: str | None, ndf: int = 64, n_layers: int = 3) -> PatchGANDiscriminator:
    """``path`` (``--discriminator_checkpoint``: folder or .safetensors) or a fresh PatchGAN of ``ndf`` channels
    and ``n_layers`` strided blocks."""
    if path is None:
        return PatchGANDiscriminator(ndf=ndf, n_layers=n_layers)
    expected = f"a PatchGANDiscriminator (ndf {ndf}, {n_layers} layers: --disc_ndf, --disc_layers)"
    if Path(path).is_dir():
        with loading("--discriminator_checkpoint", path, "PatchGANDiscriminator"):
            return PatchGANDiscriminator.from_pretrained(path)
    if Path(path).is_file():  # .safetensors, or a tensors-only torch file (never unpickled beyond tensors)
        state = read_state_dict(path, "--discriminator_checkpoint", f"the weights of {expected}")
        disc = PatchGANDiscriminator(ndf=ndf, n_layers=n_layers)
        return load_weights_into(disc, state, "--discriminator_checkpoint", path, f"the weights of {expected}")
    raise UserError(f"--discriminator_checkpoint {path!r} is neither a folder nor a .safetensors file.")


def latent_size(vae, resolution: int) -> int:
    """Side of the VAE latent for square images of ``resolution`` px."""
    return resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def enable_gradient_checkpointing(enabled: bool, *models: torch.nn.Module) -> None:
    """``--gradient_checkpointing``: diffusers' ``enable_gradient_checkpointing`` on each model that trains."""
    if enabled:
        for model in models:
            model.enable_gradient_checkpointing()

"""LDM-layout KL autoencoders (SD-VAE, VA-VAE, IN-VAE, REPA-E's E2E-VAEs) -> ``diffusers.AutoencoderKL``.

Why not ``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint``: it matches keys by substring,
maps only the mid-block attention and silently drops every key it does not know, so f16d32's per-level
attention (and any typo) would vanish without a word. Here the mapping is a bijection computed from the
diffusers model's own parameter names, which lets the converter report every missing, unexpected or
mis-shaped key and lets ``--verify`` compare each converted tensor with its source.

Original layout (latent diffusion ``Encoder``/``Decoder``): level ``i`` of ``encoder.down.{i}`` and
``decoder.up.{i}`` is the same resolution level (0 = full resolution), so diffusers' ``up_blocks`` run in the
reverse order: ``decoder.up_blocks.{k}`` <- ``decoder.up.{levels - 1 - k}`` (the decoder starts at the lowest
resolution). Attention blocks use 1x1 convolutions for q/k/v/proj_out, diffusers uses Linear layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from diffusers import AutoencoderKL

from ..models.vae import VAE_PRESETS
from .loading import ConversionError, check_state_dict

# Keys that original VAE files carry but that are not part of the autoencoder: the training loss (LPIPS and
# discriminator) of latent-diffusion checkpoints, VA-VAE's vision-foundation projection, EMA bookkeeping.
KNOWN_NON_VAE_PREFIXES = ("loss.", "linear_proj.", "foundation_model.", "discriminator.", "model_ema.")

_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTENTION_LINEAR = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _rename_resnet(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_RESNET_RENAMES.get(layer, layer)}.{param}"


def _rename_attention(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_ATTENTION_RENAMES[layer]}.{param}"


def diffusers_to_ldm_key(key: str, num_levels: int) -> str:
    """The original latent-diffusion name of one ``AutoencoderKL`` parameter."""
    if key.startswith(("quant_conv.", "post_quant_conv.")) or re.match(r"(encoder|decoder)\.conv_(in|out)\.", key):
        return key
    if match := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{match[1]}.norm_out.{match[2]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_rename_resnet(match[3])}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{match[1]}.mid.attn_1.{_rename_attention(match[2])}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        level, rest = int(match[1]), match[2]
        prefix = f"encoder.down.{level}"
    elif match := re.match(r"decoder\.up_blocks\.(\d+)\.(.+)", key):
        level, rest = num_levels - 1 - int(match[1]), match[2]
        prefix = f"decoder.up.{level}"
    else:
        raise ConversionError(f"no original name known for the AutoencoderKL parameter {key!r}.")
    if sub := re.match(r"resnets\.(\d+)\.(.+)", rest):
        return f"{prefix}.block.{sub[1]}.{_rename_resnet(sub[2])}"
    if sub := re.match(r"attentions\.(\d+)\.(.+)", rest):
        return f"{prefix}.attn.{sub[1]}.{_rename_attention(sub[2])}"
    if sub := re.match(r"(downsamplers|upsamplers)\.0\.conv\.(.+)", rest):
        return f"{prefix}.{'downsample' if sub[1] == 'downsamplers' else 'upsample'}.conv.{sub[2]}"
    raise ConversionError(f"no original name known for the AutoencoderKL parameter {key!r}.")


def vae_key_map(vae: AutoencoderKL) -> dict[str, str]:
    """``{diffusers_key: original_key}`` for every parameter of ``vae``."""
    num_levels = len(vae.config.block_out_channels)
    return {key: diffusers_to_ldm_key(key, num_levels) for key in vae.state_dict()}


def split_known_extras(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(autoencoder tensors, skipped key names)``: drop the keys known not to belong to the autoencoder."""
    kept = {key: value for key, value in state_dict.items() if not key.startswith(KNOWN_NON_VAE_PREFIXES)}
    skipped = sorted(key for key in state_dict if key.startswith(KNOWN_NON_VAE_PREFIXES))
    return kept, skipped


def _count(state_dict: Mapping, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({match[1] for key in state_dict if (match := regex.match(key))})


def infer_vae_config(state_dict: Mapping[str, torch.Tensor], arch: str) -> dict:
    """An ``AutoencoderKL`` config: the ``arch`` preset with the sizes read off the tensor shapes.

    The preset fixes the block pattern (where attention sits, counted from the lowest resolution) and the
    normalisation; levels, widths, res-blocks per level and latent channels come from the shapes, so tiny
    test VAEs and the real ones go through the same code.
    """
    if arch not in VAE_PRESETS:
        raise ConversionError(f"--arch must be one of {sorted(VAE_PRESETS)}, got {arch!r}.")
    if "encoder.down.0.block.0.conv1.weight" not in state_dict or "post_quant_conv.weight" not in state_dict:
        sample = ", ".join(sorted(state_dict)[:8])
        raise ConversionError(
            "not a latent-diffusion (LDM) layout VAE: expected keys like 'encoder.down.0.block.0.conv1.weight' "
            f"and 'post_quant_conv.weight', found e.g. {sample}."
        )
    preset = VAE_PRESETS[arch]
    num_levels = _count(state_dict, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight$")
    widths = [int(state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(num_levels)]

    def lowest_first(types: list[str], levels: int) -> list[bool]:
        """Which levels have attention, lowest resolution first, the preset's pattern cut/padded to ``levels``."""
        return ([t.startswith("Attn") for t in types] + [False] * levels)[:levels]

    down_attn = lowest_first(preset["down_block_types"][::-1], num_levels)[::-1]
    up_attn = lowest_first(preset["up_block_types"], num_levels)
    return {
        **preset,
        "in_channels": int(state_dict["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state_dict["decoder.conv_out.weight"].shape[0]),
        "block_out_channels": widths,
        "layers_per_block": _count(state_dict, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight$"),
        "latent_channels": int(state_dict["post_quant_conv.weight"].shape[0]),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in down_attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in up_attn],
    }


def convert_vae_state_dict(original: Mapping[str, torch.Tensor], vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """Original LDM tensors -> ``vae``'s state dict; raises on any missing/unexpected key or wrong shape."""
    key_map = vae_key_map(vae)
    target = vae.state_dict()
    expected = {}
    for new_key, old_key in key_map.items():
        shape = tuple(target[new_key].shape)
        expected[old_key] = shape + (1, 1) if _ATTENTION_LINEAR.search(new_key) else shape
    check_state_dict(original, expected, "the VAE state dict")
    return {new_key: original[old_key].reshape(target[new_key].shape).clone() for new_key, old_key in key_map.items()}


def load_vae(original: Mapping[str, torch.Tensor], config: dict) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` built from ``config`` holding the converted original weights."""
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(convert_vae_state_dict(original, vae), strict=True)
    return vae.eval()


def stats_from_file(stats: Mapping[str, torch.Tensor], latent_channels: int) -> tuple[list[float], list[float]]:
    """``NAME-latents-stats.pt`` (``latents_scale = 1/sqrt(var)``, ``latents_bias = mean``) -> (mean, std)."""
    missing = [key for key in ("latents_scale", "latents_bias") if key not in stats]
    if missing:
        raise ConversionError(
            f"latent statistics file lacks {missing}; expected 'latents_scale' and 'latents_bias' of shape "
            f"[1, C, 1, 1], found keys {sorted(stats)}."
        )
    scale, bias = stats["latents_scale"].double().flatten(), stats["latents_bias"].double().flatten()
    if scale.numel() != latent_channels or bias.numel() != latent_channels:
        raise ConversionError(
            f"latent statistics have {scale.numel()} (scale) / {bias.numel()} (bias) channels but the VAE has "
            f"{latent_channels} latent channels: is it the stats file of another VAE?"
        )
    if not bool((scale > 0).all()):
        raise ConversionError("latents_scale must be positive (it is 1/sqrt(running_var)).")
    return bias.tolist(), (1.0 / scale).tolist()


def convert_vae_checkpoint(
    checkpoint: Mapping, arch: str, latents_stats: Mapping[str, torch.Tensor] | None = None
) -> tuple[AutoencoderKL, dict[str, torch.Tensor], list[str]]:
    """A VAE file's contents -> ``(AutoencoderKL, {diffusers key: source tensor}, skipped keys)``.

    The statistics file, when given, becomes ``latents_mean/latents_std`` with ``scaling_factor = 1.0``.
    """
    from .loading import extract_state_dict

    state_dict, skipped = split_known_extras(extract_state_dict(checkpoint))
    config = infer_vae_config(state_dict, arch)
    if latents_stats is not None:
        mean, std = stats_from_file(latents_stats, config["latent_channels"])
        config.update(latents_mean=mean, latents_std=std, scaling_factor=1.0)
    vae = load_vae(state_dict, config)
    sources = {new: state_dict[old] for new, old in vae_key_map(vae).items()}
    return vae, sources, skipped

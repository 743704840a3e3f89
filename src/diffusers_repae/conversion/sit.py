"""Original REPA / REPA-E SiT state dicts -> ``SiTTransformer2DModel`` + ``REPAProjector`` + latent statistics.

The original SiT module holds the denoiser, the REPA projectors and (REPA-E) the latent BatchNorm in one
state dict; here they are three things: the transformer, the projector (training only) and the VAE config's
``latents_mean/latents_std``. ``pos_embed`` is fixed and derived from the config, so it is not loaded but
checked against the buffer the model computes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..models.latent_norm import LatentBatchNorm
from ..models.projector import REPAProjector
from ..models.transformer_sit import SiTTransformer2DModel, fuse_attention_keys, split_fused_attention_keys
from ..recipes import list_recipes, load_component_config
from .loading import ConversionError, check_state_dict

POS_EMBED_ATOL = 1e-6

_FIXED_RENAMES = {
    "x_embedder.proj.": "patch_embed.",
    "t_embedder.mlp.0.": "time_embedding.linear_1.",
    "t_embedder.mlp.2.": "time_embedding.linear_2.",
    "y_embedder.embedding_table.": "class_embedding.",
    "final_layer.adaLN_modulation.1.": "adaln_out.",
    "final_layer.linear.": "proj_out.",
}
_BLOCK_RENAMES = {"adaLN_modulation.1.": "adaln_modulation.", "attn.proj.": "attn.to_out.0."}


def original_to_diffusers_key(key: str) -> str | None:
    """Our transformer's name for an original SiT key; ``None`` for keys that are not transformer weights.

    The fused ``attn.qkv.*`` keeps its name here (one original tensor is three of ours): `convert_sit_state_dict`
    splits it into ``attn.to_q`` / ``to_k`` / ``to_v``. ``attn.proj.*`` becomes ``attn.to_out.0.*``.
    """
    for old, new in _FIXED_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if match := re.match(r"blocks\.(\d+)\.(.+)", key):
        rest = match[2]
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
        return f"transformer_blocks.{match[1]}.{rest}"
    return None


def diffusers_to_original_key(key: str) -> str:
    """Inverse of `original_to_diffusers_key` for every parameter of ``SiTTransformer2DModel``; ``attn.to_q`` /
    ``to_k`` / ``to_v`` all name the fused ``attn.qkv`` (see `original_sit_state_dict` for the tensors)."""
    key = re.sub(r"\.attn\.(to_q|to_k|to_v)\.", ".attn.qkv.", key)
    for old, new in _FIXED_RENAMES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    if match := re.match(r"transformer_blocks\.(\d+)\.(.+)", key):
        rest = match[2]
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(new):
                rest = old + rest[len(new) :]
        return f"blocks.{match[1]}.{rest}"
    raise ConversionError(f"no original name known for the SiT parameter {key!r}.")


def convert_sit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original SiT's transformer weights (``split.transformer``) in our layout: renamed, the fused ``qkv``
    split into ``to_q`` / ``to_k`` / ``to_v`` (q, k, v stacked in that order along dim 0). Other keys are dropped."""
    renamed = {new: value for key, value in state_dict.items() if (new := original_to_diffusers_key(key)) is not None}
    return split_fused_attention_keys(renamed)


def original_sit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our transformer's weights in the original's layout (fused ``qkv``, ``proj``): the inverse of
    `convert_sit_state_dict`, for shape checks and for exporting back."""
    return {diffusers_to_original_key(key): value for key, value in fuse_attention_keys(dict(state_dict)).items()}


@dataclass
class SplitSiT:
    """An original SiT state dict split by destination."""

    transformer: dict[str, torch.Tensor] = field(default_factory=dict)  # original keys
    projector: dict[str, torch.Tensor] = field(default_factory=dict)  # projectors.{k}.{0,2,4}.*
    bn: dict[str, torch.Tensor] = field(default_factory=dict)  # running_mean, running_var, num_batches_tracked
    pos_embed: torch.Tensor | None = None


def split_sit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SplitSiT:
    split = SplitSiT()
    for key, value in state_dict.items():
        if key == "pos_embed":
            split.pos_embed = value
        elif key.startswith("projectors."):
            split.projector[key] = value
        elif key.startswith("bn."):
            split.bn[key[len("bn.") :]] = value
        else:
            split.transformer[key] = value
    return split


# The original's model table (SiT-{S,B,L,XL}/{1,2,4,8}): variant -> (depth, hidden size, attention heads).
SIT_VARIANTS: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def variant_heads(num_layers: int, hidden_size: int) -> int | None:
    """Attention heads of the original SiT variant with this depth and width (each variant's pair is unique)."""
    for depth, width, heads in SIT_VARIANTS.values():
        if (depth, width) == (num_layers, hidden_size):
            return heads
    return None


def parse_model_name(name: str) -> tuple[str, int]:
    """``"SiT-XL/2"`` -> ``("XL", 2)``."""
    match = re.fullmatch(r"SiT-(S|B|L|XL)/(\d+)", str(name))
    if not match:
        raise ConversionError(
            f"--model must look like 'SiT-XL/2' (variant S, B, L or XL, then the patch size), got {name!r}."
        )
    return match[1], int(match[2])


def find_recipe(transformer_config: Mapping, preferred: tuple[str, ...] = ()) -> str | None:
    """A shipped recipe whose transformer has these shapes: the first of ``preferred`` that does, else one of the
    same latent size, else any."""
    size = transformer_config.get("sample_size")
    keys = ("hidden_size", "num_layers", "patch_size", "in_channels")
    matches = [
        name
        for name in list_recipes()
        if all(load_component_config(name, "transformer").get(k) == transformer_config[k] for k in keys)
    ]
    for name in preferred:
        if name in matches:
            return name
    # shapes alone can fit several recipes (tiny-cpu and emoji-cpu): the one trained at the same latent size first
    same_size = [m for m in matches if load_component_config(m, "transformer").get("sample_size") == size]
    return (same_size or matches or [None])[0]


def infer_sit_config(
    split: SplitSiT,
    args: Mapping,
    model_name: str | None = None,
    num_attention_heads: int | None = None,
    recipe: str | None = None,
) -> dict:
    """``SiTTransformer2DModel`` config from the tensor shapes, the training ``args`` and explicit overrides.

    Shapes give width, depth, patch, channels, classes and grid; the number of heads is not in any shape, so it
    comes from ``num_attention_heads``, else from the original's model table (`SIT_VARIANTS`, by depth and width:
    any ``SiT-{S,B,L,XL}/{1,2,4,8}``), else from the recipe matching these shapes, else it is an error.
    """
    sd = split.transformer
    if "x_embedder.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise ConversionError(
            "not an original SiT state dict: expected keys 'x_embedder.proj.weight' and 'blocks.0.attn.qkv.weight', "
            f"found e.g. {', '.join(sorted(sd)[:8])}."
        )
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    name = model_name or args.get("model")
    if name is not None:
        _, name_patch = parse_model_name(name)
        if name_patch != patch:
            raise ConversionError(
                f"model name {name!r} says patch size {name_patch} but x_embedder.proj.weight has a {patch}x{patch} "
                "kernel; pass the right --model."
            )
    num_layers = len({m[1] for key in sd if (m := re.match(r"blocks\.(\d+)\.", key))})
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    num_classes = int(args.get("num_classes", rows - 1))
    if rows != num_classes + 1:
        raise ConversionError(
            f"y_embedder.embedding_table has {rows} rows but num_classes is {num_classes}: the model needs the null "
            "class row (training with cfg-prob > 0) for classifier-free guidance."
        )
    if split.pos_embed is None:
        raise ConversionError("cannot infer the latent size: the SiT state dict has no 'pos_embed'.")
    sample_size = math.isqrt(split.pos_embed.shape[1]) * patch
    config = {
        "sample_size": int(sample_size),
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "hidden_size": int(hidden),
        "num_layers": num_layers,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        "num_classes": num_classes,
        "class_dropout_prob": float(args.get("cfg_prob", 0.1)),
        "qk_norm": "blocks.0.attn.q_norm.weight" in sd,
    }
    if num_attention_heads is None:
        num_attention_heads = variant_heads(num_layers, int(hidden))
    if num_attention_heads is None:
        source = recipe or find_recipe(config)
        if source is None:
            raise ConversionError(
                f"cannot infer the number of attention heads of a SiT with hidden_size {hidden} and {num_layers} "
                f"blocks (model {name!r}): no shipped recipe matches; pass --num_attention_heads."
            )
        num_attention_heads = load_component_config(source, "transformer")["num_attention_heads"]
    config["num_attention_heads"] = int(num_attention_heads)
    return config


def load_transformer(split: SplitSiT, config: Mapping) -> SiTTransformer2DModel:
    """A ``SiTTransformer2DModel`` with the converted weights; checks every key and the fixed ``pos_embed``."""
    model = SiTTransformer2DModel.from_config(dict(config))
    target = model.state_dict()
    expected = {key: value.shape for key, value in original_sit_state_dict(target).items()}
    check_state_dict(split.transformer, expected, "the SiT state dict")
    model.load_state_dict(convert_sit_state_dict(split.transformer), strict=True)
    if split.pos_embed is not None:
        if tuple(split.pos_embed.shape) != tuple(model.pos_embed.shape):
            raise ConversionError(
                f"pos_embed: checkpoint {tuple(split.pos_embed.shape)} vs expected {tuple(model.pos_embed.shape)}."
            )
        diff = (split.pos_embed.float() - model.pos_embed).abs().max().item()
        if diff > POS_EMBED_ATOL:
            raise ConversionError(
                f"the checkpoint's pos_embed differs from the 2-D sin-cos embedding by {diff:.3g} "
                f"(> {POS_EMBED_ATOL}): not a standard SiT, or wrong sample_size/patch_size."
            )
    return model.eval()


def projector_config(split: SplitSiT, hidden_size: int, encoder_depth: int | None) -> dict:
    """``REPAProjector`` config from the projector shapes; ``encoder_depth`` must be given (args or flag)."""
    heads = sorted({int(m[1]) for key in split.projector if (m := re.match(r"projectors\.(\d+)\.", key))})
    if not heads:
        raise ConversionError("the checkpoint has no REPA projectors (keys 'projectors.{k}.*').")
    if encoder_depth is None:
        raise ConversionError(
            "cannot infer the REPA encoder depth (not in the checkpoint's args); pass --encoder_depth."
        )
    return {
        "hidden_size": hidden_size,
        "z_dims": [int(split.projector[f"projectors.{k}.4.weight"].shape[0]) for k in heads],
        "projector_dim": int(split.projector["projectors.0.0.weight"].shape[0]),
        "encoder_depth": int(encoder_depth),
    }


def load_projector(split: SplitSiT, config: Mapping) -> REPAProjector:
    projector = REPAProjector.from_config(dict(config))
    expected = {key: value.shape for key, value in projector.state_dict().items()}
    check_state_dict(split.projector, expected, "the REPA projector state dict")
    projector.load_state_dict(split.projector, strict=True)
    return projector.eval()


def stats_from_bn(split: SplitSiT, latent_channels: int) -> tuple[list[float], list[float]]:
    """``(latents_mean, latents_std)`` from the SiT's latent BatchNorm buffers (``std = sqrt(running_var)``)."""
    if "running_mean" not in split.bn or "running_var" not in split.bn:
        raise ConversionError("the SiT state dict has no latent BatchNorm (keys 'bn.running_mean', 'bn.running_var').")
    norm = LatentBatchNorm(latent_channels)
    expected = {key: value.shape for key, value in norm.state_dict().items()}
    check_state_dict(split.bn, expected, "the latent BatchNorm buffers (bn.*)")
    norm.load_state_dict(split.bn)
    return norm.to_latents_stats()

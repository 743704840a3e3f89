"""Whole original training checkpoints (train_repae / train_ldm_only) -> the components of a RepaEPipeline.

The library part of ``conversion/convert_repae_to_diffusers.py``: no CLI parsing here. Every converted tensor is
remembered with its source tensor so that `verify_folder` can compare them after a reload.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..models.discriminator import PatchGANDiscriminator
from ..models.projector import REPAProjector
from ..models.transformer_sit import SiTTransformer2DModel
from ..recipes import build_component, resolve_recipe
from ..schedulers import scheduler_for_path_type
from .loading import (
    ConversionError,
    check_state_dict,
    extract_state_dict,
    group_by_prefix,
    namespace_to_dict,
    strip_wrapper_prefixes,
)
from .sit import (
    SplitSiT,
    convert_sit_state_dict,
    find_recipe,
    infer_sit_config,
    load_projector,
    load_transformer,
    parse_model_name,
    projector_config,
    split_sit_state_dict,
    stats_from_bn,
)
from .vae import infer_vae_config, load_vae, split_known_extras, stats_from_file, vae_key_map

# REPA-E's VAE families, as they appear in the file names of the released VAEs (``sdvae-f8d4.pt`` ...) and in
# the recipe names (``sit-xl-2-sdvae``). Longest first: "e2e-vavae" must win over "vavae".
VAE_FAMILIES = ("e2e-vavae", "e2e-invae", "e2e-sdvae", "vavae", "invae", "sdvae")


@dataclass
class ConvertedCheckpoint:
    """Everything a conversion produced, plus the source tensors for verification."""

    transformer: SiTTransformer2DModel
    vae: AutoencoderKL
    scheduler: object
    pipeline_settings: dict
    recipe: str | None
    steps: int | None
    used_ema: bool
    args: dict
    # component -> {diffusers key: source tensor}; "latents_mean"/"latents_std" as float64 tensors
    sources: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # training state (filled only when asked for)
    projector: REPAProjector | None = None
    ema_projector: REPAProjector | None = None
    raw_transformer: SiTTransformer2DModel | None = None
    raw_bn: dict[str, torch.Tensor] | None = None
    discriminator: PatchGANDiscriminator | dict[str, torch.Tensor] | None = None


def vae_family(*names: str | None) -> str | None:
    """The VAE family named in a checkpoint path or arg (``pretrained/vavae/vavae-f16d32.pt`` -> ``vavae``)."""
    for name in names:
        if not name:
            continue
        lowered = Path(str(name)).name.lower().replace("_", "-")
        for family in VAE_FAMILIES:
            if family in lowered:
                return family
    return None


def pick_recipe(transformer_config: Mapping, model_name: str | None, family: str | None, ldm_only: bool) -> str | None:
    """The shipped recipe for this model name and VAE family (``SiT-XL/2`` + ``sdvae`` -> ``sit-xl-2-sdvae``)."""
    preferred: list[str] = []
    if model_name is not None and family is not None:
        variant, patch = parse_model_name(model_name)
        stem = f"sit-{variant.lower()}-{patch}-{family}"
        preferred = [f"{stem}-ldm", stem] if ldm_only else [stem, f"{stem}-ldm"]
    return find_recipe(transformer_config, tuple(preferred))


def sit_sources(split: SplitSiT) -> dict[str, torch.Tensor]:
    """``{transformer key: original tensor}``, kept for verification."""
    return convert_sit_state_dict(split.transformer)


def discriminator_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> PatchGANDiscriminator | dict:
    """The PatchGAN with these weights when the layout is the standard one, else the raw tensors (kept as is)."""
    state_dict = strip_wrapper_prefixes(state_dict)
    convs = sorted(
        int(m[1]) for key in state_dict if (m := re.match(r"main\.(\d+)\.weight$", key)) and state_dict[key].ndim == 4
    )
    if not convs:
        return dict(state_dict)
    first = state_dict[f"main.{convs[0]}.weight"]
    config = {"in_channels": int(first.shape[1]), "ndf": int(first.shape[0]), "n_layers": len(convs) - 2}
    try:
        model = PatchGANDiscriminator.from_config(config)
        check_state_dict(state_dict, {k: v.shape for k, v in model.state_dict().items()}, "the discriminator")
    except (ConversionError, ValueError):
        return dict(state_dict)
    model.load_state_dict(state_dict)
    return model.eval()


def convert_training_checkpoint(
    checkpoint: Mapping,
    *,
    use_ema: bool = True,
    model_name: str | None = None,
    encoder_depth: int | None = None,
    num_attention_heads: int | None = None,
    vae_checkpoint: Mapping | None = None,
    vae_checkpoint_name: str | None = None,
    vae_arch: str | None = None,
    latents_stats: Mapping[str, torch.Tensor] | None = None,
    recipe: str | None = None,
    with_training_state: bool = False,
) -> ConvertedCheckpoint:
    """A train_repae checkpoint (with ``vae``) or a train_ldm_only one (VAE and stats given separately)."""
    checkpoint = group_by_prefix(checkpoint, ("model", "ema", "vae", "discriminator"))
    for key in ("model", "ema"):
        if key not in checkpoint:
            raise ConversionError(
                f"not a REPA-E training checkpoint: no {key!r} entry (found {sorted(checkpoint)}). "
                "For a VAE file use conversion/convert_vae_to_diffusers.py."
            )
    args = namespace_to_dict(checkpoint.get("args"))
    ldm_only = "vae" not in checkpoint
    notes: list[str] = []
    model_name = model_name or args.get("model")
    encoder_depth = encoder_depth if encoder_depth is not None else args.get("encoder_depth")

    # 1. The SiT (EMA by default) and its statistics
    source = "ema" if use_ema else "model"
    split = split_sit_state_dict(strip_wrapper_prefixes(checkpoint[source]))
    sit_config = infer_sit_config(split, args, model_name=model_name, num_attention_heads=num_attention_heads)
    family = vae_family(vae_checkpoint_name, args.get("vae_ckpt"), args.get("vae_path"))
    if recipe is None:
        recipe = pick_recipe(sit_config, model_name, family, ldm_only)
    if num_attention_heads is None and recipe is not None:
        sit_config = infer_sit_config(split, args, model_name=model_name, recipe=recipe)
    transformer = load_transformer(split, sit_config)

    # 2. The VAE
    arch = vae_arch or args.get("vae")
    if arch is None:
        raise ConversionError("cannot tell the VAE architecture (no 'vae' in the checkpoint's args); pass --vae_arch.")
    if ldm_only:
        if vae_checkpoint is None:
            raise ConversionError(
                "this is a train_ldm_only checkpoint (no 'vae' entry): pass the frozen VAE with --vae_checkpoint "
                "and its statistics with --latents_stats."
            )
        vae_sd = extract_state_dict(vae_checkpoint)
    else:
        vae_sd = strip_wrapper_prefixes(checkpoint["vae"])
        if vae_checkpoint is not None:
            notes.append("--vae_checkpoint ignored: the checkpoint carries its own (end-to-end tuned) VAE")
    vae_sd, skipped = split_known_extras(vae_sd)
    if skipped:
        notes.append(f"skipped {len(skipped)} VAE keys that are not part of the autoencoder: {', '.join(skipped)}")
    vae_config = infer_vae_config(vae_sd, arch)

    # 3. Latent statistics: the stats file when given, else the (EMA) BatchNorm of the SiT
    channels = vae_config["latent_channels"]
    if latents_stats is not None:
        mean, std = stats_from_file(latents_stats, channels)
        notes.append("latent statistics from the --latents_stats file")
    elif not ldm_only and split.bn:
        mean, std = stats_from_bn(split, channels)
        notes.append(f"latent statistics from the {'EMA' if use_ema else 'raw'} SiT's BatchNorm (bn.running_*)")
    else:
        raise ConversionError(
            "no latent statistics: a train_ldm_only checkpoint (or a SiT without 'bn.*') needs --latents_stats "
            "(the VAE's NAME-latents-stats.pt)."
        )
    vae = load_vae(vae_sd, {**vae_config, "latents_mean": mean, "latents_std": std, "scaling_factor": 1.0})

    # 4. Scheduler and sampling defaults from the recipe
    settings: dict = {}
    if recipe is not None:
        from ..pipelines import RepaEPipeline

        scheduler = build_component(recipe, "scheduler")
        index = json.loads((resolve_recipe(recipe) / "model_index.json").read_text())
        settings = {key: index[key] for key in RepaEPipeline._recipe_settings() if index.get(key) is not None}
    else:
        from ..schedulers import FlowMatchEulerMaruyamaScheduler

        scheduler = FlowMatchEulerMaruyamaScheduler()
        notes.append("no shipped recipe matches this model: default Euler-Maruyama scheduler, no guidance default")
    scheduler = scheduler_for_path_type(scheduler, args.get("path_type", "linear"))  # the SDE's score needs it
    if "id2label" not in settings and sit_config["num_classes"] == 1000:
        from ..pipelines import load_imagenet_id2label

        settings["id2label"] = load_imagenet_id2label()

    converted = ConvertedCheckpoint(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        pipeline_settings=settings,
        recipe=recipe,
        steps=int(checkpoint["steps"]) if "steps" in checkpoint else None,
        used_ema=use_ema,
        args=args,
        notes=notes,
    )
    converted.sources["transformer"] = sit_sources(split)
    converted.sources["pos_embed"] = {"pos_embed": split.pos_embed} if split.pos_embed is not None else {}
    converted.sources["vae"] = {new: vae_sd[old] for new, old in vae_key_map(vae).items()}
    converted.sources["latents"] = {
        "latents_mean": torch.tensor(mean, dtype=torch.float64),
        "latents_std": torch.tensor(std, dtype=torch.float64),
    }

    if with_training_state:
        _add_training_state(converted, checkpoint, split, encoder_depth, sit_config, use_ema)
    return converted


def _add_training_state(
    converted: ConvertedCheckpoint,
    checkpoint: Mapping,
    split: SplitSiT,
    encoder_depth: int | None,
    sit_config: dict,
    use_ema: bool,
) -> None:
    """Raw SiT, its BatchNorm, both projectors and the discriminator: what training needs to continue."""
    raw = split if not use_ema else split_sit_state_dict(strip_wrapper_prefixes(checkpoint["model"]))
    ema = split if use_ema else split_sit_state_dict(strip_wrapper_prefixes(checkpoint["ema"]))
    config = projector_config(raw, sit_config["hidden_size"], encoder_depth)
    converted.raw_transformer = load_transformer(raw, sit_config)
    converted.projector = load_projector(raw, config)
    converted.ema_projector = load_projector(ema, config)
    converted.raw_bn = dict(raw.bn)
    converted.sources["raw_transformer"] = sit_sources(raw)
    converted.sources["projector"] = dict(raw.projector)
    converted.sources["ema_projector"] = dict(ema.projector)
    if "discriminator" in checkpoint and checkpoint["discriminator"]:
        converted.discriminator = discriminator_from_state_dict(checkpoint["discriminator"])
        converted.sources["discriminator"] = strip_wrapper_prefixes(checkpoint["discriminator"])

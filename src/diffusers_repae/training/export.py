"""What a finished run writes: the VAE with its latent statistics, the recipe's sampling settings, the Hub upload."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.latent_norm import LatentBatchNorm
from ..pipelines.hub import push_folder_to_hub
from ..recipes import resolve_recipe

# RepaEPipeline's registered sampling settings, as recipes' model_index.json stores them.
SAMPLING_DEFAULT_KEYS = ("default_num_inference_steps", "default_guidance_scale", "default_guidance_interval")


def vae_with_stats(vae, norm: torch.nn.Module):
    """Writes a (EMA) latent BatchNorm's statistics into the VAE config (``latents_mean``, ``latents_std``)."""
    exported = LatentBatchNorm(norm.num_features)
    exported.load_state_dict(norm.state_dict())
    mean, std = exported.to_latents_stats()
    vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=1.0)
    return vae


def recipe_sampling_defaults(recipe: str | Path) -> dict:
    """The recipe's recommended sampling settings, as ``RepaEPipeline`` keyword arguments."""
    index = json.loads((resolve_recipe(recipe) / "model_index.json").read_text())
    return {key: index[key] for key in SAMPLING_DEFAULT_KEYS if key in index}


def push_output_to_hub(
    output_dir: str | Path, repo_id: str | None = None, token: str | None = None, logging_dir: str = "logs"
) -> str:
    """``--push_to_hub``: upload what the run exported (not checkpoints, ``logging_dir`` or hidden files) to
    ``repo_id`` (default: the folder's name); the repo id."""
    skip = ["checkpoint-*", "checkpoint-*/**", f"{logging_dir}/**", ".*", ".*/**"]
    repo_id = repo_id or Path(output_dir).resolve().name
    return push_folder_to_hub(output_dir, repo_id, token, commit_message="End of training", ignore_patterns=skip)

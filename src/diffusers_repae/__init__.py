"""diffusers-repae: REPA-E end-to-end VAE + latent diffusion transformer training as a diffusers integration."""

from .models import (
    LatentBatchNorm,
    PatchGANDiscriminator,
    REPAProjector,
    SiTTransformer2DModel,
    SiTTransformer2DModelOutput,
    build_vae,
    denormalize_latents,
    normalize_latents,
    vae_config,
)
from .pipelines import RepaEPipeline, load_imagenet_id2label, push_folder_to_hub
from .recipes import build_component, build_from_recipe, list_recipes, load_component_config, resolve_recipe
from .schedulers import (
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchHeunScheduler,
    repae_ode_sigmas,
    scheduler_for_sampler,
    set_repae_timesteps,
)

__version__ = "0.1.0"


def _require_extra(extra: str, *modules: str) -> None:
    """Raise a ModuleNotFoundError naming the pip extra when a subpackage's optional dependencies are missing."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"this part of diffusers_repae needs the [{extra}] extra ({', '.join(missing)} missing): "
            f"pip install 'diffusers-repae[{extra}]'",
            name=missing[0],
        )


__all__ = [
    "FlowMatchEulerMaruyamaScheduler",
    "FlowMatchHeunScheduler",
    "RepaEPipeline",
    "load_imagenet_id2label",
    "push_folder_to_hub",
    "repae_ode_sigmas",
    "scheduler_for_sampler",
    "set_repae_timesteps",
    "LatentBatchNorm",
    "PatchGANDiscriminator",
    "REPAProjector",
    "SiTTransformer2DModel",
    "SiTTransformer2DModelOutput",
    "build_component",
    "build_from_recipe",
    "build_vae",
    "denormalize_latents",
    "list_recipes",
    "load_component_config",
    "normalize_latents",
    "resolve_recipe",
    "vae_config",
]

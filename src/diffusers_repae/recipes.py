"""Recipes: folders in ``RepaEPipeline.save_pretrained`` layout minus weights (the repository's ``pipelines/``).

A recipe is the single source of truth for a model's architecture: training and conversion build their
models from it instead of if-chains over model names.
"""

from __future__ import annotations

import importlib
import json
from importlib import resources
from pathlib import Path

# The repository's top-level pipelines/ folder, installed as this package (setup.py maps it into the wheel, and
# editable installs map the folder itself): one copy in git, found the same way from a wheel or a checkout.
RECIPES_PACKAGE = "diffusers_repae.recipe_folders"
# The recipe of `make demo` (training/demo.py) and of the study (benchmarks/ablation.py): OpenMoji on a CPU.
DEMO_RECIPE = "emoji-cpu"


def recipes_dir() -> Path:
    """The folder holding the shipped recipes (looked up when asked, not at import)."""
    return Path(str(resources.files(RECIPES_PACKAGE)))


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package (the repository's ``pipelines/``)."""
    return sorted(p.name for p in recipes_dir().iterdir() if (p / "model_index.json").is_file())


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe name (``tiny-cpu``) or any folder in pipeline layout -> its path."""
    path = Path(name_or_path)
    if (path / "model_index.json").is_file():
        return path
    candidate = recipes_dir() / str(name_or_path)
    if (candidate / "model_index.json").is_file():
        return candidate
    raise ValueError(
        f"recipe {str(name_or_path)!r} is neither a folder with model_index.json nor one of {list_recipes()}."
    )


def load_component_config(recipe: str | Path, component: str) -> dict:
    """The JSON config of one component (``transformer``, ``vae``, ``scheduler``, ``projector``)."""
    folder = resolve_recipe(recipe) / component
    for filename in ("config.json", "scheduler_config.json"):
        if (folder / filename).is_file():
            return json.loads((folder / filename).read_text())
    raise FileNotFoundError(f"recipe {str(recipe)!r} has no config for component {component!r} in {folder}.")


def _component_class(config: dict):
    """The class named by a config's ``_class_name``, from this package first, then diffusers."""
    name = config["_class_name"]
    for module in ("diffusers_repae", "diffusers"):
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    raise ValueError(f"unknown component class {name!r}.")


def build_component(recipe: str | Path, component: str, **overrides):
    """One randomly initialised component (or the scheduler) from a recipe, with optional config overrides."""
    config = load_component_config(recipe, component)
    config.update(overrides)
    cls = _component_class(config)
    return cls.from_config(config)


def build_from_recipe(recipe: str | Path, with_projector: bool = False) -> dict:
    """Randomly initialised ``transformer``, ``vae`` and ``scheduler`` (and ``projector``) of a recipe.

    Models come in eval mode, as ``from_pretrained`` returns them (diffusers' VAE decoder is not bit-identical
    between train and eval mode), so a recipe pipeline samples exactly like its saved-and-reloaded copy.
    """
    names = ("transformer", "vae", "scheduler", "projector") if with_projector else ("transformer", "vae", "scheduler")
    components = {name: build_component(recipe, name) for name in names}
    for component in components.values():
        if hasattr(component, "eval"):
            component.eval()
    return components

"""Every recipe in pipelines/ builds, is internally consistent, and round-trips through save/load."""

import json

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights

from diffusers_repae import (
    RepaEPipeline,
    SiTTransformer2DModel,
    build_component,
    list_recipes,
    load_component_config,
    resolve_recipe,
)

RECIPES = list_recipes()


def test_the_promised_recipes_exist():
    for name in ["sit-xl-2-sdvae", "sit-xl-1-vavae", "sit-xl-1-invae", "sit-b-2-sdvae", "tiny-cpu"]:
        assert name in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_and_is_consistent(name):
    folder = resolve_recipe(name)
    for part in ["model_index.json", "README.md", "transformer/config.json", "vae/config.json"]:
        assert (folder / part).is_file(), part
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "RepaEPipeline"
    with init_empty_weights():  # XL models: build the module tree without allocating 675M parameters
        sit = build_component(name, "transformer")
        vae = build_component(name, "vae")
        projector = build_component(name, "projector")
    assert vae.config.latent_channels == sit.config.in_channels
    assert vae.config.scaling_factor == 1.0
    assert projector.config.hidden_size == sit.config.hidden_size
    assert 1 <= projector.config.encoder_depth <= sit.config.num_layers
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    assert sit.config.sample_size * downsample == vae.config.sample_size  # latent grid * VAE factor = image size


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_configs_round_trip(name, tmp_path):
    for component in ["transformer", "vae", "projector"]:
        with init_empty_weights():
            model = build_component(name, component)
        model.save_config(tmp_path / component)
        saved = json.loads((tmp_path / component / "config.json").read_text())
        original = load_component_config(name, component)
        for key, value in original.items():
            if not key.startswith("_"):
                assert saved[key] == value, (component, key)


def test_tiny_recipe_weights_round_trip(tmp_path):
    sit = build_component("tiny-cpu", "transformer")
    with torch.no_grad():
        for param in sit.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    sit.save_pretrained(tmp_path)
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path)
    x = torch.randn(2, sit.config.in_channels, sit.config.sample_size, sit.config.sample_size)
    with torch.no_grad():
        assert torch.equal(sit.eval()(x, 0.4, 1).sample, loaded.eval()(x, 0.4, 1).sample)


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a folder"):
        resolve_recipe("sit-q-3-nothing")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_scheduler_builds_with_its_recommended_settings(name):
    scheduler = build_component(name, "scheduler")
    index = json.loads((resolve_recipe(name) / "model_index.json").read_text())
    assert type(scheduler).__name__ == index["scheduler"][1]
    scheduler.set_timesteps(index["default_num_inference_steps"])
    assert len(scheduler.timesteps) == index["default_num_inference_steps"]
    low, high = index["default_guidance_interval"]
    assert 0.0 <= low <= high <= 1.0 and index["default_guidance_scale"] >= 1.0


def test_tiny_recipe_pipeline_round_trips_bit_identically(tmp_path):
    pipe = RepaEPipeline.from_recipe("tiny-cpu")
    with torch.no_grad():
        for param in pipe.transformer.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    kwargs = dict(class_labels=[0, 3], num_inference_steps=3, output_type="np")
    first = pipe(generator=torch.Generator().manual_seed(7), **kwargs).images
    pipe.save_pretrained(tmp_path)
    loaded = RepaEPipeline.from_pretrained(tmp_path)
    assert loaded.config.default_guidance_scale == pipe.config.default_guidance_scale
    second = loaded(generator=torch.Generator().manual_seed(7), **kwargs).images
    assert first.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(first, second)

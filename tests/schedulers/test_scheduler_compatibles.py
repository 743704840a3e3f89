"""``scheduler.compatibles``: this package's schedulers list diffusers' flow-matching ones and each other, and every
listed class built with ``from_config(pipe.scheduler.config)`` samples in the pipeline."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from diffusers_repae import (
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchHeunScheduler,
    RepaEPipeline,
    SiTTransformer2DModel,
)

EXPECTED = {
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchHeunScheduler,
}


@pytest.mark.parametrize("scheduler_cls", [FlowMatchEulerMaruyamaScheduler, FlowMatchHeunScheduler])
def test_compatibles_list_diffusers_flow_schedulers_and_ours(scheduler_cls):
    scheduler = scheduler_cls()
    compatibles = scheduler.compatibles
    assert set(compatibles) == EXPECTED and len(compatibles) == len(EXPECTED)
    assert scheduler_cls in compatibles


def test_every_compatible_scheduler_samples_in_the_pipeline(caplog):
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=4, patch_size=2, hidden_size=32, num_layers=1, num_attention_heads=2, num_classes=3
    )
    vae = AutoencoderKL(
        block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    pipe = RepaEPipeline(sit.eval(), vae.eval(), FlowMatchEulerMaruyamaScheduler(t_last=0.05))
    pipe.set_progress_bar_config(disable=True)
    original = pipe.scheduler
    assert pipe.scheduler.compatibles
    for scheduler_cls in original.compatibles:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipe.scheduler = scheduler_cls.from_config(original.config)
        assert type(pipe.scheduler) is scheduler_cls
        if scheduler_cls in (FlowMatchEulerMaruyamaScheduler, FlowMatchHeunScheduler):  # diffusers' own still warn
            assert not [r for r in caplog.records if "not expected" in r.getMessage()], scheduler_cls
        latents = pipe([0, 2], num_inference_steps=3, output_type="latent").images
        assert latents.shape == (2, 4, 4, 4) and torch.isfinite(latents).all()
        back = FlowMatchEulerMaruyamaScheduler.from_config(pipe.scheduler.config)
        assert back.config.num_train_timesteps == original.config.num_train_timesteps

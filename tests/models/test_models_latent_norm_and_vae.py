"""LatentBatchNorm <-> VAE config exchange, VAE presets and latent (de)normalisation."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from diffusers_repae import LatentBatchNorm, build_vae, denormalize_latents, normalize_latents, vae_config


def trained_bn(channels=4) -> LatentBatchNorm:
    bn = LatentBatchNorm(channels, momentum=0.3).train()
    for _ in range(5):
        bn(torch.randn(8, channels, 4, 4) * torch.rand(1, channels, 1, 1) * 3 + torch.randn(1, channels, 1, 1))
    return bn


def test_bn_is_the_spec_batchnorm():
    bn = LatentBatchNorm(4, momentum=0.25)
    assert bn.eps == 1e-4 and bn.momentum == 0.25 and not bn.affine and bn.track_running_stats
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(bn.train()(x), (x - mean) / torch.sqrt(var + 1e-4))


def test_bn_to_vae_config_and_back_is_exact(tmp_path):
    bn = trained_bn(channels=32)  # enough values for torch's vectorised sqrt path to be exercised
    mean, std = bn.to_latents_stats()
    # The decode statistic is sqrt(running_var) with no eps, equal to the correctly rounded float32 sqrt
    # (numpy's; torch's vectorised CPU sqrt may be one ulp off).
    assert torch.equal(torch.tensor(std, dtype=torch.float32), torch.from_numpy(np.sqrt(bn.running_var.numpy())))
    assert torch.equal(torch.tensor(mean, dtype=torch.float32), bn.running_mean)
    vae = AutoencoderKL(
        **vae_config(
            "f8d4",
            block_out_channels=[32, 32],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
            latent_channels=32,
            latents_mean=mean,
            latents_std=std,
        )
    )
    vae.save_pretrained(tmp_path)
    reloaded = AutoencoderKL.from_pretrained(tmp_path)
    restored = LatentBatchNorm.from_vae_config(reloaded.config)
    assert torch.equal(restored.running_mean, bn.running_mean)
    assert torch.equal(restored.running_var, bn.running_var)


def test_eval_bn_equals_normalize_latents_up_to_eps():
    bn = trained_bn().eval()
    mean, std = bn.to_latents_stats()
    vae = build_vae(
        "f8d4",
        block_out_channels=[32],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latents_mean=mean,
        latents_std=std,
    )
    z = torch.randn(2, 4, 5, 5) * 3
    expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(normalize_latents(vae, z), expected.float())
    torch.testing.assert_close(denormalize_latents(vae, normalize_latents(vae, z)), z, atol=1e-5, rtol=1e-5)
    # The BN adds eps=1e-4 to the variance; decoding does not (SPEC section 3).
    expected_bn = (z - bn.running_mean.view(1, 4, 1, 1)) / torch.sqrt(bn.running_var.view(1, 4, 1, 1) + 1e-4)
    torch.testing.assert_close(bn(z), expected_bn)


def test_normalize_falls_back_to_scaling_and_shift_factor():
    vae = build_vae(
        "f8d4",
        block_out_channels=[32],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        scaling_factor=0.18215,
        shift_factor=0.1,
    )
    z = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(normalize_latents(vae, z), (z - 0.1) * 0.18215)
    torch.testing.assert_close(denormalize_latents(vae, normalize_latents(vae, z)), z, atol=1e-6, rtol=1e-5)


def test_load_stats_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="latents_mean/latents_std must have 4"):
        LatentBatchNorm(4).load_latents_stats([0.0] * 3, [1.0] * 3)


def test_f8d4_preset_matches_spec():
    config = vae_config("f8d4")
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["latent_channels"] == 4
    assert config["scaling_factor"] == 1.0 and config["layers_per_block"] == 2


def test_f16d32_preset_shapes_and_attention():
    vae = build_vae("f16d32").eval()
    # Attention at the lowest resolution: 2 blocks in the last encoder level, 3 in the first decoder level.
    assert len(vae.encoder.down_blocks[-1].attentions) == 2
    assert len(vae.decoder.up_blocks[0].attentions) == 3
    assert all(not hasattr(block, "attentions") or block.attentions is None for block in vae.encoder.down_blocks[:-1])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert posterior.mean.shape == (1, 32, 4, 4)
        assert vae.decode(posterior.mean).sample.shape == (1, 3, 64, 64)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="arch must be one of"):
        vae_config("f4d3")

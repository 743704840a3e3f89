"""Vision encoders: tiny random DINOv2 (with/without registers) through the loader, and the bundled EfficientNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from diffusers_repae.training.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    ENCODER_SPECS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    efficientnet_lite0_weights_path,
    load_vision_encoders,
)

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=70
)  # 5x5 stored position grid, resampled to the 4x4 grid of a 56 px input


def _save_tiny(tmp_path, registers: bool):
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **TINY))
    else:
        model = Dinov2Model(Dinov2Config(**TINY))
    folder = tmp_path / ("reg" if registers else "plain")
    model.save_pretrained(folder)
    return folder


def _reference_tokens(folder, registers: bool, images: torch.Tensor, grid: int) -> torch.Tensor:
    """SPEC section 5 written out: x/255, ImageNet mean/std, bicubic resize, antialiased bicubic position table."""
    cls = Dinov2WithRegistersModel if registers else Dinov2Model
    model = cls.from_pretrained(folder).eval()
    x = images.float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(14 * grid, 14 * grid), mode="bicubic", align_corners=False)
    table = model.embeddings.position_embeddings.data
    patches = table[:, 1:].reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    new_table = torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    model.embeddings.position_embeddings = torch.nn.Parameter(new_table)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    prefix = 1 + (4 if registers else 0)
    assert hidden.shape[1] == prefix + grid * grid
    return hidden[:, prefix:]


@pytest.mark.parametrize("registers", [False, True])
def test_tiny_dinov2_tokens_match_spec_computation(tmp_path, registers):
    folder = _save_tiny(tmp_path, registers)
    name = "dinov2-vit-b-reg" if registers else "dinov2-vit-b"
    # resolution 64 -> 224 * 64 / 256 = 56 px input -> 4x4 patches of 14 -> 16 tokens.
    (encoder,) = load_vision_encoders(name, resolution=64, num_tokens=16, local_paths={name: folder})
    assert encoder.name == name and encoder.z_dim == 32 and encoder.input_size == 56
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 32) and not tokens.requires_grad
    torch.testing.assert_close(tokens, _reference_tokens(folder, registers, images, grid=4), atol=1e-5, rtol=1e-5)


def test_antialiased_table_differs_from_transformers_on_the_fly_interpolation(tmp_path):
    """Why we resample ourselves: transformers' bicubic without antialias gives other features when shrinking."""
    folder = _save_tiny(tmp_path, registers=False)
    paths = {"dinov2-vit-s": folder}
    (encoder,) = load_vision_encoders("dinov2-vit-s", resolution=64, num_tokens=16, local_paths=paths)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    plain = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        on_the_fly = plain(pixel_values=encoder.preprocess(images)).last_hidden_state[:, 1:]
    assert on_the_fly.shape == encoder(images).shape
    assert not torch.allclose(on_the_fly, encoder(images), atol=1e-4)


def test_token_mismatch_and_unknown_names_raise(tmp_path):
    folder = _save_tiny(tmp_path, registers=False)
    with pytest.raises(ValueError, match="num_tokens=64"):
        load_vision_encoders("dinov2-vit-b", resolution=64, num_tokens=64, local_paths={"dinov2-vit-b": folder})
    with pytest.raises(ValueError, match="mocov3-vit-b"):
        load_vision_encoders("mocov3-vit-b", resolution=256, num_tokens=256)
    with pytest.raises(ValueError, match="at least one"):
        load_vision_encoders(" , ", resolution=256, num_tokens=256)
    assert ENCODER_SPECS["dinov2-vit-b"].hub_id == "facebook/dinov2-base"
    assert ENCODER_SPECS["dinov2-vit-l-reg"].hub_id == "facebook/dinov2-with-registers-large"


def test_efficientnet_lite0_bundled_weights_grid_and_preprocessing():
    assert efficientnet_lite0_weights_path().is_file()
    encoders = load_vision_encoders("efficientnet-lite0,efficientnet-lite0", resolution=64, num_tokens=64)
    assert len(encoders) == 2
    encoder = encoders[0]
    assert encoder.input_size == 128 and encoder.z_dim == 112  # 8x8 grid at stride 16
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = encoder(images)
    assert tokens.shape == (2, 64, 112)
    # Independent: (x - 127) / 128, bicubic to 128 px, and a hook on the last 112-channel (stride-16) block.
    model = encoder.model
    last = max(i for i, block in enumerate(model._blocks) if block._block_args.output_filters == 112)
    captured = {}
    handle = model._blocks[last].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    x = F.interpolate((images.float() - 127.0) / 128.0, size=(128, 128), mode="bicubic", align_corners=False)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert captured["x"].shape == (2, 112, 8, 8)
    torch.testing.assert_close(tokens, captured["x"].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="square"):
        load_vision_encoders("efficientnet-lite0", resolution=64, num_tokens=60)


@pytest.mark.parametrize("name", ["clip-vit-L", "mae-vit-l", "jepa-vit-h"])
def test_other_transformers_encoders_from_tiny_local_folders(tmp_path, name):
    from transformers import CLIPVisionConfig, CLIPVisionModel, IJepaConfig, IJepaModel, ViTMAEConfig, ViTMAEModel

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    if name == "clip-vit-L":
        model = CLIPVisionModel(CLIPVisionConfig(patch_size=14, image_size=70, **small))
    elif name == "mae-vit-l":
        model = ViTMAEModel(ViTMAEConfig(patch_size=16, image_size=48, **small))  # 3x3 table -> 4x4 grid
    else:
        model = IJepaModel(IJepaConfig(patch_size=14, image_size=70, **small))
    model.save_pretrained(tmp_path / "enc")
    (encoder,) = load_vision_encoders(name, resolution=64, num_tokens=16, local_paths={name: tmp_path / "enc"})
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(encoder(images), tokens)  # MAE: no random masking or shuffling
    # MAE runs at the training resolution; CLIP and I-JEPA at 224 * 64 / 256 = 56 px.
    assert encoder.input_size == (64 if name == "mae-vit-l" else 56)
    mean, std = (CLIP_MEAN, CLIP_STD) if name == "clip-vit-L" else (IMAGENET_MEAN, IMAGENET_STD)
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if encoder.input_size != 64:
        x = F.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False)
    torch.testing.assert_close(encoder.preprocess(images), x)


def _tiny_mae(folder):
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = ViTMAEModel(ViTMAEConfig(patch_size=16, image_size=48, **small))  # 3x3 table -> 4x4 grid at 64 px
    with torch.no_grad():  # a visible final LayerNorm, so taking the tokens before or after it differs
        model.layernorm.weight.normal_(1.0, 0.5)
        model.layernorm.bias.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return ViTMAEModel.from_pretrained(folder).eval()


def test_mae_targets_are_the_last_block_tokens_before_the_final_layernorm(tmp_path):
    """Issue 13 item 4, the original's rule: last block's tokens, CLS dropped, no final LayerNorm, no masking."""
    model = _tiny_mae(tmp_path / "mae")
    (encoder,) = load_vision_encoders(
        "mae-vit-l", resolution=64, num_tokens=16, local_paths={"mae-vit-l": tmp_path / "mae"}
    )
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    embeddings = model.embeddings
    table = embeddings.position_embeddings.data  # [1, 1 + 9, 32]: CLS row, then the 3x3 grid
    grid = table[:, 1:].reshape(1, 3, 3, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    patches = embeddings.patch_embeddings.projection(x).flatten(2).transpose(1, 2)  # row-major, in order
    hidden = patches + grid.permute(0, 2, 3, 1).reshape(1, 16, 32)
    cls = embeddings.cls_token + table[:, :1]
    hidden = torch.cat([cls.expand(2, -1, -1), hidden], dim=1)
    with torch.no_grad():
        for layer in model.layers:
            out = layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
    expected = hidden[:, 1:]
    tokens = encoder(images)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    after_norm = model.layernorm(expected)
    assert (tokens - after_norm).abs().max() > 0.1  # the LayerNorm would have changed them


def test_encoders_run_under_the_training_autocast(tmp_path):
    """Issue 13 item 10: targets computed under the mixed-precision autocast, as the original; returned as fp32."""
    _tiny_mae(tmp_path / "mae")
    paths = {"mae-vit-l": tmp_path / "mae"}
    (encoder,) = load_vision_encoders("mae-vit-l", 64, 16, local_paths=paths, autocast_dtype=torch.bfloat16)
    (plain,) = load_vision_encoders("mae-vit-l", 64, 16, local_paths=paths)
    seen = []
    first_linear = next(m for m in encoder.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    hook = first_linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = encoder(images)
    hook.remove()
    assert seen == [torch.bfloat16] and tokens.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the rule: the same model call inside autocast
        expected = plain._tokens(images).float()
    torch.testing.assert_close(tokens, expected, atol=0, rtol=0)
    assert (tokens - plain(images)).abs().max() > 1e-4  # autocast did change the numbers

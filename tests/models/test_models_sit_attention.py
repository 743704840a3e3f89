"""SiT attention with diffusers' names (to_q, to_k, to_v, to_out.0): the old fused layout (attn.qkv, attn.proj) still
loads from folders and state dicts, diffusers' attention tooling reaches it, and the original's initialisation holds.

Every old-layout state dict here is built in the test itself (torch.cat of the new weights), not by the library's
converter, so a wrong split in the loader shows up as different outputs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_repae import SiTTransformer2DModel

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sit(**overrides) -> SiTTransformer2DModel:
    """Random non-trivial weights: the zero-initialised adaLN and output layers would hide attention errors."""
    torch.manual_seed(0)
    config = dict(sample_size=8, patch_size=2, hidden_size=32, num_layers=3, num_attention_heads=4, num_classes=5)
    sit = SiTTransformer2DModel(**(config | overrides))
    with torch.no_grad():
        for param in sit.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return sit.eval()


def old_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout this package wrote before the rename: one fused ``attn.qkv`` (q, k, v stacked) and ``attn.proj``."""
    old = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.attn\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
        if match is None:
            old[key] = value.clone()
        elif match[2] == "to_out.0":
            old[f"{match[1]}proj.{match[3]}"] = value.clone()
        elif match[2] == "to_q":
            parts = [state_dict[f"{match[1]}{name}.{match[3]}"] for name in ("to_q", "to_k", "to_v")]
            old[f"{match[1]}qkv.{match[3]}"] = torch.cat(parts).clone()
    return old


def velocity(sit, generator_seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    with torch.no_grad():
        return sit(x, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 3, 5])).sample


def test_attention_uses_diffusers_names():
    sit = tiny_sit()
    keys = list(sit.state_dict())
    assert not [k for k in keys if re.search(r"\.attn\.(qkv|proj)\.", k)]
    for block in sit.transformer_blocks:
        attn = block.attn
        assert isinstance(attn.to_out, nn.ModuleList) and isinstance(attn.to_out[0], nn.Linear)
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            assert isinstance(linear, nn.Linear) and tuple(linear.weight.shape) == (32, 32)
    assert "transformer_blocks.2.attn.to_out.0.weight" in keys and "transformer_blocks.0.attn.to_k.bias" in keys


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_folder_saved_with_the_old_layout_loads_identically(tmp_path, low_cpu_mem_usage):
    sit = tiny_sit(qk_norm=True)
    sit.save_pretrained(tmp_path)
    old = old_layout(load_file(tmp_path / WEIGHTS))
    assert "transformer_blocks.1.attn.qkv.weight" in old and "transformer_blocks.1.attn.q_norm.weight" in old
    save_file(old, tmp_path / WEIGHTS, metadata={"format": "pt"})

    loaded = SiTTransformer2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    for key, value in sit.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(velocity(loaded), velocity(sit), atol=0, rtol=0)


def test_sharded_folder_saved_with_the_old_layout_loads_identically(tmp_path):
    """diffusers skips its key-fixing hook for shards; the model renames those itself."""
    sit = tiny_sit()
    old = old_layout(sit.state_dict())
    keys = sorted(old)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: old[k].contiguous() for k in shard_keys}, tmp_path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, name))
    total = sum(v.numel() * v.element_size() for v in old.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp_path / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(dict(sit.config) | {"_class_name": "SiTTransformer2DModel"}))

    loaded = SiTTransformer2DModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(velocity(loaded), velocity(sit), atol=0, rtol=0)


def test_load_state_dict_accepts_the_old_layout():
    """E.g. a training checkpoint written before the rename, restored with plain ``load_state_dict``."""
    sit = tiny_sit()
    fresh = tiny_sit(num_layers=3)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    result = fresh.load_state_dict(old_layout(sit.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(velocity(fresh), velocity(sit), atol=0, rtol=0)


def test_split_projections_compute_the_fused_attention():
    """An independent fused computation (the original's: one [3D, D] matmul, heads split after) equals ours."""
    sit = tiny_sit()
    attn = sit.transformer_blocks[1].attn
    x = torch.randn(2, 16, 32)
    w = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    b = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
    q, k, v = (x @ w.T + b).reshape(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(2, 16, 32) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_fuse_qkv_projections_and_set_attn_processor():
    sit = tiny_sit()
    plain = velocity(sit)
    sit.fuse_qkv_projections()
    assert all(tuple(b.attn.to_qkv.weight.shape) == (96, 32) for b in sit.transformer_blocks)
    torch.testing.assert_close(velocity(sit), plain, atol=1e-5, rtol=1e-5)
    sit.unfuse_qkv_projections()
    assert not any(hasattr(b.attn, "to_qkv") for b in sit.transformer_blocks)

    processors = sit.attn_processors
    assert sorted(processors) == [f"transformer_blocks.{i}.attn.processor" for i in range(3)]
    calls = []

    class Recording(type(processors["transformer_blocks.0.attn.processor"])):
        def __call__(self, attn, hidden_states):
            calls.append(attn)
            return super().__call__(attn, hidden_states)

    sit.set_attn_processor(Recording())
    torch.testing.assert_close(velocity(sit), plain, atol=0, rtol=0)
    assert calls == [b.attn for b in sit.transformer_blocks]


def test_initialisation_is_the_originals_xavier_over_the_fused_matrix():
    """xavier_uniform over the original's [3D, D] qkv has bound sqrt(6 / 4D); three [D, D] draws would reach
    sqrt(6 / 2D), 41% wider. Biases zero, as in the original."""
    dim = 64
    sit = SiTTransformer2DModel(sample_size=4, patch_size=2, hidden_size=dim, num_layers=2, num_attention_heads=4)
    fused_bound, square_bound = math.sqrt(6 / (4 * dim)), math.sqrt(6 / (2 * dim))
    for block in sit.transformer_blocks:
        qkv = torch.cat([block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight])
        assert 0.95 * fused_bound < qkv.abs().max() <= fused_bound
        assert 0.95 * square_bound < block.attn.to_out[0].weight.abs().max() <= square_bound
        assert all(getattr(block.attn, n).bias.abs().sum() == 0 for n in ("to_q", "to_k", "to_v"))
        assert torch.std(qkv).item() == pytest.approx(fused_bound / math.sqrt(3), rel=0.05)

"""SiT's modern diffusers hooks: attention dispatch backends, regional compilation, layerwise casting."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from torch import nn

from diffusers_repae import SiTTransformer2DModel
from diffusers_repae.models.transformer_sit import SiTAttention


def tiny_sit(qk_norm: bool = False) -> SiTTransformer2DModel:
    model = SiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=3, num_attention_heads=4, num_classes=5
    )
    if qk_norm:
        model = SiTTransformer2DModel.from_config({**model.config, "qk_norm": True})
    with torch.no_grad():  # adaLN-Zero makes a fresh model output exactly 0: perturb everything
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def inputs(batch: int = 2):
    return torch.randn(batch, 4, 8, 8), torch.rand(batch), torch.randint(0, 6, (batch,))


@pytest.fixture(autouse=True)
def _restore_backend():
    """`set_attention_backend` also sets diffusers' process-wide active backend: put it back after each test."""
    active = _AttentionBackendRegistry._active_backend
    backends = dict(_AttentionBackendRegistry._backends)
    yield
    _AttentionBackendRegistry._active_backend = active
    _AttentionBackendRegistry._backends.clear()
    _AttentionBackendRegistry._backends.update(backends)


def direct_sdpa_attention(attn: SiTAttention, x: torch.Tensor) -> torch.Tensor:
    """The pre-dispatch implementation: q, k, v -> [B, H, S, hd] -> F.scaled_dot_product_attention -> to_out.0."""
    b, s, d = x.shape
    q, k, v = (
        lin(x).reshape(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)
        for lin in (attn.to_q, attn.to_k, attn.to_v)
    )
    out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v)
    return attn.to_out[0](out.transpose(1, 2).reshape(b, s, d))


def explicit_softmax_attention(attn: SiTAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v written out, per head."""
    b, s, d = x.shape
    w = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])  # the original's fused qkv
    bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
    q, k, v = (x @ w.T + bias).split(d, dim=-1)
    q, k, v = (z.reshape(b, s, attn.num_heads, attn.head_dim).transpose(1, 2) for z in (q, k, v))
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, s, d)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


@pytest.mark.parametrize("qk_norm", [False, True])
def test_default_dispatch_is_bit_identical_to_direct_sdpa(qk_norm):
    attn = tiny_sit(qk_norm=qk_norm).transformer_blocks[1].attn
    x = torch.randn(3, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), direct_sdpa_attention(attn, x), atol=0, rtol=0)
        torch.testing.assert_close(attn(x), explicit_softmax_attention(attn, x), atol=1e-5, rtol=1e-5)


def count_backend_calls(name: AttentionBackendName) -> list[int]:
    """Wrap a registered backend so each call is counted (restored by the autouse fixture)."""
    calls = []
    original = _AttentionBackendRegistry._backends[name]

    def counting(**kwargs):
        calls.append(1)
        return original(**kwargs)

    _AttentionBackendRegistry._backends[name] = counting
    return calls


def test_set_attention_backend_routes_every_block_and_resets():
    model = tiny_sit(qk_norm=True)
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, t, y).sample
    calls = count_backend_calls(AttentionBackendName._NATIVE_MATH)
    model.set_attention_backend("_native_math")
    assert all(b.attn.processor._attention_backend == "_native_math" for b in model.transformer_blocks)
    with torch.no_grad():
        out = model(x, t, y).sample
    assert len(calls) == model.config.num_layers
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)

    model.reset_attention_backend()
    _AttentionBackendRegistry._active_backend = AttentionBackendName.NATIVE
    assert all(b.attn.processor._attention_backend is None for b in model.transformer_blocks)
    with torch.no_grad():
        model(x, t, y)
    assert len(calls) == model.config.num_layers  # back on the default backend


def test_attention_backend_context_manager_is_honoured():
    model = tiny_sit()
    x, t, y = inputs()
    calls = count_backend_calls(AttentionBackendName._NATIVE_MATH)
    with torch.no_grad(), attention_backend("_native_math"):
        model(x, t, y)
    assert len(calls) == model.config.num_layers


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="must be one of"):
        tiny_sit().set_attention_backend("no-such-kernel")


def test_compile_repeated_blocks_one_graph_per_block_type():
    model = tiny_sit()
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, t, y).sample
    torch._dynamo.reset()
    # The "eager" backend traces with dynamo (fullgraph: no graph break allowed in a block) without a C++ compiler.
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
    with torch.no_grad():
        out = model(x, t, y).sample
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


SKIPPED = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")  # diffusers' documented default


def test_layerwise_casting_float8_storage_matches_rounded_weights():
    model = tiny_sit()
    x, t, y = inputs()
    # Independent expectation: the same model with every castable weight rounded through float8 by hand.
    rounded = tiny_sit()
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, module in rounded.named_modules():
            castable = isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding))
            if castable and not any(re.search(pattern, name) for pattern in SKIPPED):
                for param in module.parameters(recurse=False):
                    param.copy_(param.to(torch.float8_e4m3fn).float())
        expected = rounded(x, t, y).sample

    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.class_embedding.weight.dtype == torch.float8_e4m3fn
    assert model.dtype == torch.float32  # the compute dtype: what the pipeline feeds the model
    with torch.no_grad():
        out = model(x, t, y).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_layerwise_casting_in_the_pipeline():
    from diffusers import AutoencoderKL

    from diffusers_repae import FlowMatchEulerMaruyamaScheduler, RepaEPipeline

    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    pipe = RepaEPipeline(tiny_sit(), vae, FlowMatchEulerMaruyamaScheduler(), default_num_inference_steps=2)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    latents = pipe(class_labels=[1, 2], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()

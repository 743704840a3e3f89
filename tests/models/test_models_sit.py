"""SiTTransformer2DModel against SPEC section 2, written out independently here."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_repae import SiTTransformer2DModel


def tiny_sit(patch_size=2, sample_size=8, **kwargs) -> SiTTransformer2DModel:
    config = dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=4,
        hidden_size=64,
        num_layers=3,
        num_attention_heads=4,
        num_classes=5,
    )
    config.update(kwargs)
    model = SiTTransformer2DModel(**config)
    # adaLN-Zero makes a fresh model output exactly 0; perturb so every path matters.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def reference_timestep_embedding(t: torch.Tensor) -> torch.Tensor:
    """SPEC: 256-dim, frequencies exp(-ln(10000) * i / 128), i = 0..127, as [cos, sin]."""
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 128) for i in range(128)], dtype=torch.float64)
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def reference_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """SPEC: token (r, c) in row-major order; first D/2 features encode c, last D/2 encode r."""
    out = torch.zeros(grid * grid, dim, dtype=torch.float64)
    quarter = dim // 4
    for r in range(grid):
        for c in range(grid):
            token = r * grid + c
            for i in range(quarter):
                w = 10000 ** (-i / quarter)
                out[token, i] = math.sin(c * w)
                out[token, quarter + i] = math.cos(c * w)
                out[token, 2 * quarter + i] = math.sin(r * w)
                out[token, 3 * quarter + i] = math.cos(r * w)
    return out


def reference_forward(model: SiTTransformer2DModel, x, t, y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The SiT forward written from the spec, reading the model's weights by hand."""
    cfg = model.config
    p, d, heads = cfg.patch_size, cfg.hidden_size, cfg.num_attention_heads
    b, ch, h, w = x.shape
    g = h // p
    # Patch embedding as an explicit matmul over (channel, row, column) patches.
    patches = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
    tokens = patches @ model.patch_embed.weight.reshape(d, -1).T + model.patch_embed.bias
    tokens = tokens + reference_pos_embed(d, g).float()
    temb = model.time_embedding.linear_1(reference_timestep_embedding(t).float())
    temb = model.time_embedding.linear_2(F.silu(temb))
    c = F.silu(temb + model.class_embedding.weight[y])

    def layer_norm(v):
        mu = v.mean(-1, keepdim=True)
        var = v.var(-1, keepdim=True, unbiased=False)
        return (v - mu) / torch.sqrt(var + 1e-6)

    hidden = []
    for block in model.transformer_blocks:
        mod = c @ block.adaln_modulation.weight.T + block.adaln_modulation.bias
        s1, sc1, g1, s2, sc2, g2 = mod.split(d, dim=1)
        a = layer_norm(tokens) * (1 + sc1[:, None]) + s1[:, None]
        q, k, v = (a @ lin.weight.T + lin.bias for lin in (block.attn.to_q, block.attn.to_k, block.attn.to_v))
        split = lambda z: z.reshape(b, g * g, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, g * g, d) @ block.attn.to_out[0].weight.T + block.attn.to_out[0].bias
        tokens = tokens + g1[:, None] * att
        m = layer_norm(tokens) * (1 + sc2[:, None]) + s2[:, None]
        m = block.mlp.fc1(m)
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))
        tokens = tokens + g2[:, None] * block.mlp.fc2(m)
        hidden.append(tokens)
    shift, scale = (c @ model.adaln_out.weight.T + model.adaln_out.bias).split(d, dim=1)
    out = (layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None]) @ model.proj_out.weight.T + model.proj_out.bias
    # Outputs ordered (patch row, patch column, channel), channel fastest.
    out = out.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, g * p, g * p)
    return out, hidden


def test_timestep_embedding_matches_spec_formula():
    model = tiny_sit()
    t = torch.tensor([0.0, 0.25, 0.731, 1.0])
    ours = model.time_proj(t)
    torch.testing.assert_close(ours.double(), reference_timestep_embedding(t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim,grid", [(64, 4), (32, 3)])
def test_pos_embed_matches_spec_formula(dim, grid):
    model = SiTTransformer2DModel(sample_size=grid, patch_size=1, hidden_size=dim, num_layers=1, num_attention_heads=2)
    torch.testing.assert_close(model.pos_embed[0].double(), reference_pos_embed(dim, grid), atol=1e-6, rtol=0)


@pytest.mark.parametrize("patch_size,sample_size", [(1, 4), (2, 8)])
def test_forward_matches_reference_and_shapes(patch_size, sample_size):
    model = tiny_sit(patch_size=patch_size, sample_size=sample_size)
    x = torch.randn(3, 4, sample_size, sample_size)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([0, 4, 5])  # 5 is the null class
    with torch.no_grad():
        out = model(x, t, y).sample
        expected, _ = reference_forward(model, x, t, y)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_fresh_model_is_zero_initialised_where_spec_says():
    model = SiTTransformer2DModel(sample_size=4, patch_size=2, hidden_size=32, num_layers=2, num_attention_heads=2)
    for block in model.transformer_blocks:
        assert block.adaln_modulation.weight.abs().sum() == 0 and block.adaln_modulation.bias.abs().sum() == 0
    assert model.proj_out.weight.abs().sum() == 0 and model.adaln_out.weight.abs().sum() == 0
    assert all(getattr(model.transformer_blocks[0].attn, n).bias.abs().sum() == 0 for n in ("to_q", "to_k", "to_v"))
    assert 0.01 < model.class_embedding.weight.std() < 0.03
    assert model.class_embedding.num_embeddings == model.config.num_classes + 1
    out = model(torch.randn(2, 4, 4, 4), 0.5, 1).sample
    assert torch.count_nonzero(out) == 0


def test_block_k_hidden_states_and_align_only_pass():
    model = tiny_sit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([1, 2])
    calls = []
    hooks = [block.register_forward_hook(lambda *_: calls.append(1)) for block in model.transformer_blocks]
    with torch.no_grad():
        full = model(x, t, y, return_hidden_states_at=2)
        full_blocks = len(calls)
        calls.clear()
        align = model(x, t, y, return_hidden_states_at=2, align_only=True)
    for hook in hooks:
        hook.remove()
    _, reference_hidden = reference_forward(model, x, t, y)
    torch.testing.assert_close(full.hidden_states, reference_hidden[1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(align.hidden_states, full.hidden_states, atol=0, rtol=0)
    assert align.sample is None
    assert full_blocks == 3 and len(calls) == 2


def test_gradient_checkpointing_matches_plain_forward_and_backward():
    model = tiny_sit().train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([1, 2])

    def run():
        model.zero_grad()
        out = model(x, t, y, return_hidden_states_at=1)
        (out.sample.square().mean() + out.hidden_states.mean()).backward()
        return out.sample.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_out, plain_grads = run()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt_out, ckpt_grads = run()
    torch.testing.assert_close(ckpt_out, plain_out, atol=0, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_label_dropout_only_in_training_and_when_asked():
    model = tiny_sit(class_dropout_prob=1.0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([1, 2])
    null = torch.full_like(y, model.config.num_classes)
    with torch.no_grad():
        conditional, unconditional = model(x, t, y).sample, model(x, t, null).sample
        assert torch.equal(model(x, t, y, drop_labels=True).sample, conditional)  # eval mode: never dropped
        model.train()
        assert torch.equal(model(x, t, y).sample, conditional)  # training, not asked
        torch.testing.assert_close(model(x, t, y, drop_labels=True).sample, unconditional, atol=0, rtol=0)


def test_deterministic_and_save_load_round_trip_bit_identical(tmp_path):
    model = tiny_sit(qk_norm=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([1, 2])
    with torch.no_grad():
        first, second = model(x, t, y).sample, model(x, t, y).sample
    assert torch.equal(first, second)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y).sample, first)
    assert torch.equal(loaded.pos_embed, model.pos_embed)


def test_bad_block_index_is_a_clear_error():
    model = tiny_sit()
    with pytest.raises(ValueError, match="return_hidden_states_at"):
        model(torch.randn(1, 4, 8, 8), 0.5, 0, return_hidden_states_at=4)
    with pytest.raises(ValueError, match="align_only"):
        model(torch.randn(1, 4, 8, 8), 0.5, 0, align_only=True)


def test_residual_stream_stays_fp32_under_autocast_like_the_original():
    """Issue 13 item 2: the original adds an fp32 ``pos_embed`` parameter to the patch tokens, which promotes the
    token stream to fp32 under autocast; matmuls run in half precision, every residual sum in fp32."""
    import reference_original as original

    class FusedAttention(original.Attention):  # timm's fused path, which the original SiT runs
        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    from diffusers_repae.conversion.sit import convert_sit_state_dict

    reference = original.OriginalSiT(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    for block in reference.blocks:
        fused = FusedAttention(64, 4)
        fused.load_state_dict(block.attn.state_dict())
        block.attn = fused
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name != "pos_embed":
                param.normal_(std=0.1)
    model = SiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=3, num_attention_heads=4, num_classes=10
    ).eval()
    model.load_state_dict(convert_sit_state_dict(reference.state_dict()))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([1, 10])

    block_dtypes = []
    hooks = [b.register_forward_hook(lambda m, i, o: block_dtypes.append(o.dtype)) for b in model.transformer_blocks]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, return_hidden_states_at=2)
        expected, _ = reference(x, t, y)
        reference.pos_embed.data = reference.pos_embed.data.bfloat16()  # what a half-precision stream gives
        half_stream, _ = reference(x, t, y)
    for hook in hooks:
        hook.remove()
    assert block_dtypes == [torch.float32] * 3 and out.hidden_states.dtype == torch.float32
    torch.testing.assert_close(out.sample.float(), expected.float(), atol=1e-6, rtol=0)
    assert (half_stream.float() - expected.float()).abs().max() > 1e-3  # the check can tell the two apart
    # without autocast, half-precision weights keep one dtype throughout (no fp32 promotion, no dtype clash)
    with torch.no_grad():
        assert model.to(torch.bfloat16)(x.bfloat16(), t, y).sample.dtype == torch.bfloat16

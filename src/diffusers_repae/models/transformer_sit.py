"""SiT: the latent diffusion transformer of REPA / REPA-E (SPEC section 2).

A pure velocity predictor in normalised latent space. Training-only pieces (latent BatchNorm, REPA
projectors, losses) live outside; the model only offers the hidden states after block ``k`` and a way
to stop there (the align-only pass of end-to-end training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE-style fixed 2-D sin-cos embedding, ``[grid_size**2, embed_dim]``, tokens in row-major order.

    The first half of the features encodes the column, the second half the row; each half is
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000 ** (-i / (embed_dim / 4))`` and integer positions.
    Computed in float64 like the original (numpy) and returned as float32.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SiTAttnProcessor:
    """Fused qkv projection, optional per-head q/k LayerNorm, attention through diffusers' dispatcher, output proj.

    Going through `dispatch_attention_fn` is what makes ``model.set_attention_backend("flash")`` (or the
    ``attention_backend`` context manager) choose the kernel; the default "native" backend is torch SDPA on the
    same tensors, so the numbers are those of a direct ``F.scaled_dot_product_attention`` call.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: SiTAttention, hidden_states: torch.Tensor) -> torch.Tensor:
        # [B, S, 3 * D] -> three [B, S, H, head_dim] views (q, k, v stacked in that order): the dispatch layout.
        query, key, value = attn.qkv(hidden_states).unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(2)
        out = dispatch_attention_fn(
            attn.q_norm(query),
            attn.k_norm(key),
            value,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.proj(out.flatten(2, 3).to(query.dtype))


class SiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with one fused qkv projection (q, k, v stacked in that order).

    An `AttentionModuleMixin` with a processor, like diffusers' own attention modules, so the model-level
    ``set_attention_backend`` / ``reset_attention_backend`` reach it. The weights keep their original names
    (``qkv``, ``proj``, ``q_norm``, ``k_norm``), so converted checkpoints and LoRA targets are unchanged.
    """

    _default_processor_cls = SiTAttnProcessor
    _available_processors = [SiTAttnProcessor]
    _supports_qkv_fusion = False  # the projection is fused already

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, processor: SiTAttnProcessor | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} must be divisible by num_attention_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # timm's Attention (used by the original) normalises q and k per head with an affine LayerNorm.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.processor(self, x)


class SiTMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block. ``cond`` is the already SiLU-activated conditioning vector."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SiTAttention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SiTMLP(dim, int(dim * mlp_ratio))
        self.adaln_modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln_modulation(cond).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` for any device; False for those autocast does not know (e.g. ``meta``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


@dataclass
class SiTTransformer2DModelOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch, channels, height, width)` or `None`):
            Predicted velocity ``eps - x`` in normalised latent space; `None` for an align-only pass.
        hidden_states (`torch.Tensor` of shape `(batch, tokens, hidden_size)` or `None`):
            Tokens after block ``return_hidden_states_at`` when it was asked for.
    """

    sample: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class SiTTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    SiT (Scalable Interpolant Transformer), class-conditional, as trained by REPA and REPA-E.

    Args:
        sample_size (`int`, defaults to 32): Side of the (square) latent the position embedding is built for.
        patch_size (`int`, defaults to 2): Side of a latent patch (1 for f16d32 latents, 2 for f8d4).
        in_channels (`int`, defaults to 4): Latent channels; the model predicts as many.
        hidden_size (`int`, defaults to 1152): Token width D.
        num_layers (`int`, defaults to 28): Number of transformer blocks.
        num_attention_heads (`int`, defaults to 16): Attention heads per block.
        mlp_ratio (`float`, defaults to 4.0): MLP width as a multiple of ``hidden_size``.
        num_classes (`int`, defaults to 1000): Real classes; label ``num_classes`` is the null class used by
            classifier-free guidance, so the label table has ``num_classes + 1`` rows.
        class_dropout_prob (`float`, defaults to 0.1): Probability of replacing a label by the null class when
            ``forward(..., drop_labels=True)`` runs in training mode.
        qk_norm (`bool`, defaults to False): Affine LayerNorm on queries and keys per head.

    LoRA adapters attach through diffusers' `PeftAdapterMixin` (``add_adapter``, ``save_lora_adapter``,
    ``load_lora_adapter``); the natural targets are ``qkv``, ``proj``, ``fc1``, ``fc2`` and ``adaln_modulation``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SiTBlock"]
    _repeated_blocks = ["SiTBlock"]  # compile_repeated_blocks(): one compiled block graph reused by every layer

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        qk_norm: bool = False,
    ):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} must be a multiple of patch_size {patch_size}.")
        self.gradient_checkpointing = False
        self.out_channels = in_channels
        grid_size = sample_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Fixed, derived from the config: a non-persistent buffer, so it is never stored in weight files.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid_size).unsqueeze(0), persistent=False)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(256, hidden_size)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)
        self.transformer_blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_attention_heads, mlp_ratio, qk_norm) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaln_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original SiT initialisation: xavier Linear layers, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        conv = self.patch_embed.weight.data
        nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.class_embedding.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_2.weight, std=0.02)
        for linear in [block.adaln_modulation for block in self.transformer_blocks] + [self.adaln_out, self.proj_out]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def embed_conditioning(
        self,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        drop_labels: bool = False,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``SiLU(t_emb + y_emb)``: computed once per forward and shared by every block's modulation.

        ``dtype`` is the compute dtype of the sinusoidal features (the forward passes its input's); by default the
        model's, which under ``enable_layerwise_casting`` is the compute dtype, not the float8 storage dtype.
        """
        if drop_labels and self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
            class_labels = torch.where(drop, torch.full_like(class_labels, self.config.num_classes), class_labels)
        t_freq = self.time_proj(timestep).to(self.dtype if dtype is None else dtype)
        return F.silu(self.time_embedding(t_freq) + self.class_embedding(class_labels))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, G*G, p*p*C]`` (patch row, patch column, channel) -> ``[B, C, G*p, G*p]``."""
        p, c = self.config.patch_size, self.out_channels
        grid = int(math.isqrt(tokens.shape[1]))
        x = tokens.reshape(tokens.shape[0], grid, grid, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(tokens.shape[0], c, grid * p, grid * p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | int,
        return_hidden_states_at: int | None = None,
        align_only: bool = False,
        drop_labels: bool = False,
        return_dict: bool = True,
    ) -> SiTTransformer2DModelOutput | tuple:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`):
                Noisy latent ``x_t = (1 - t) x + t eps`` in normalised latent space.
            timestep (`torch.Tensor` of shape `(batch,)` or a float): t in [0, 1]; t = 1 is pure noise.
            class_labels (`torch.LongTensor` of shape `(batch,)` or an int): labels; ``num_classes`` is null.
            return_hidden_states_at (`int`, *optional*): also return the tokens after this many blocks
                (1-based, REPA's ``encoder_depth``).
            align_only (`bool`): stop after block ``return_hidden_states_at`` and skip the output layer.
            drop_labels (`bool`): apply the ``class_dropout_prob`` label dropout (only in training mode).
            return_dict (`bool`): return a [`SiTTransformer2DModelOutput`] instead of a tuple.

        Returns:
            ``(sample, hidden_states)``: the velocity ``[batch, in_channels, H, W]`` (None when ``align_only``)
            and the requested hidden states ``[batch, tokens, hidden_size]`` (None unless asked for).
        """
        num_layers = self.config.num_layers
        if return_hidden_states_at is not None and not 1 <= return_hidden_states_at <= num_layers:
            raise ValueError(
                f"return_hidden_states_at must be in [1, {num_layers}] (num_layers), got {return_hidden_states_at}."
            )
        if align_only and return_hidden_states_at is None:
            raise ValueError("align_only=True needs return_hidden_states_at (the block to stop after).")

        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device).float().reshape(-1).expand(batch)
        class_labels = torch.as_tensor(class_labels, device=hidden_states.device).long().reshape(-1).expand(batch)
        cond = self.embed_conditioning(timestep, class_labels, drop_labels=drop_labels, dtype=hidden_states.dtype)

        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        # As in the original, where pos_embed is an fp32 parameter: under autocast the fp32 buffer promotes the
        # token stream, so every residual sum stays fp32 while the blocks' matmuls run in half precision.
        pos_embed = self.pos_embed if _autocast_enabled(x.device.type) else self.pos_embed.to(x.dtype)
        x = x + pos_embed
        last_block = return_hidden_states_at if align_only else num_layers
        aligned = None
        for index, block in enumerate(self.transformer_blocks[:last_block]):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond)
            else:
                x = block(x, cond)
            if index + 1 == return_hidden_states_at:
                aligned = x

        sample = None
        if not align_only:
            shift, scale = self.adaln_out(cond).chunk(2, dim=1)
            sample = self.unpatchify(self.proj_out(modulate(self.norm_out(x), shift, scale)))
        if not return_dict:
            return (sample, aligned)
        return SiTTransformer2DModelOutput(sample=sample, hidden_states=aligned)

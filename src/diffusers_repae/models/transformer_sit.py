"""SiT: the latent diffusion transformer of REPA / REPA-E (SPEC section 2).

A pure velocity predictor in normalised latent space. Training-only pieces (latent BatchNorm, REPA
projectors, losses) live outside; the model only offers the hidden states after block ``k`` and a way
to stop there (the align-only pass of end-to-end training).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.model_loading_utils import load_state_dict
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from torch import nn

logger = logging.get_logger(__name__)


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
    """q, k, v projections, optional per-head q/k LayerNorm, attention through diffusers' dispatcher, output Linear.

    Going through `dispatch_attention_fn` is what makes ``model.set_attention_backend("flash")`` (or the
    ``attention_backend`` context manager) choose the kernel; the default "native" backend is torch SDPA on the
    same tensors, so the numbers are those of a direct ``F.scaled_dot_product_attention`` call. After
    ``fuse_qkv_projections()`` the three projections run as one ``to_qkv`` matmul, as in the original.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: SiTAttention, hidden_states: torch.Tensor) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # [B, S, D] -> [B, S, H, head_dim]: the dispatch layout.
        query, key, value = (z.unflatten(-1, (attn.num_heads, attn.head_dim)) for z in (query, key, value))
        out = dispatch_attention_fn(
            attn.q_norm(query),
            attn.k_norm(key),
            value,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.to_out[0](out.flatten(2, 3).to(query.dtype))


# Names of the original's fused attention weights inside a block's ``attn``, and ours.
_FUSED_QKV = "qkv."
_SPLIT_QKV = ("to_q.", "to_k.", "to_v.")
_OLD_OUT, _NEW_OUT = "proj.", "to_out.0."


def split_fused_attention_keys(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename the original's attention weights in place: ``{prefix}qkv.*`` (q, k, v stacked along dim 0) becomes
    ``to_q.*`` / ``to_k.*`` / ``to_v.*`` and ``{prefix}proj.*`` becomes ``to_out.0.*``; returns ``state_dict``.

    ``prefix`` is one attention module's (``"transformer_blocks.3.attn."``); with the default ``""`` every key
    ending in ``attn.qkv.*`` / ``attn.proj.*`` is renamed (a whole SiT's state dict, or a LoRA file's).
    LoRA keys split the same way: a fused layer's ``lora_B`` / ``lora_magnitude_vector`` stack q, k, v along their
    first dimension, and the shared ``lora_A`` goes to all three, which gives exactly the same update.
    """
    owner = re.escape(prefix) if prefix else r"(?:.*\.)?attn\."
    pattern = re.compile(rf"^({owner})(qkv|proj)\.(.+)$")
    for key in [k for k in state_dict if pattern.match(k)]:
        head, kind, rest = pattern.match(key).groups()
        value = state_dict.pop(key)
        if kind == "proj":
            state_dict[f"{head}{_NEW_OUT}{rest}"] = value
        elif ".lora_A." in f".{rest}":
            for name in _SPLIT_QKV:
                state_dict[f"{head}{name}{rest}"] = value
        else:
            if value.shape[0] % 3 != 0:
                raise ValueError(f"{key}: a fused q, k, v tensor needs a first dimension divisible by 3.")
            for name, part in zip(_SPLIT_QKV, value.chunk(3, dim=0)):
                state_dict[f"{head}{name}{rest}"] = part
    return state_dict


def fuse_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `split_fused_attention_keys` for weights (not LoRA): a new dict in the original's layout."""
    fused: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(r"^(.*\battn\.)(to_q|to_k|to_v|to_out\.0)\.(.+)$", key)
        if match is None:
            fused[key] = value
        elif match[2] == "to_out.0":
            fused[f"{match[1]}{_OLD_OUT}{match[3]}"] = value
        elif match[2] == "to_q":
            parts = [state_dict[f"{match[1]}{name}{match[3]}"] for name in _SPLIT_QKV]
            fused[f"{match[1]}{_FUSED_QKV}{match[3]}"] = torch.cat(parts, dim=0)
    return fused


def standard_attention_names(name: str) -> list[str]:
    """A module name or pattern (a LoRA target, a ``rank_pattern`` key) with the original's ``qkv`` / ``proj``
    components in diffusers' names: ``"qkv"`` -> ``["to_q", "to_k", "to_v"]``, ``"attn.proj"`` ->
    ``["attn.to_out.0"]``; other names are returned as they are."""
    if re.search(r"(^|[.^])qkv($|\.)", name):
        return [re.sub(r"(^|[.^])qkv($|\.)", rf"\g<1>{new}\g<2>", name) for new in ("to_q", "to_k", "to_v")]
    return [re.sub(r"(^|[.^])proj($|\.)", r"\g<1>to_out.0\g<2>", name)]


def standard_lora_metadata(metadata: dict | None) -> dict | None:
    """A LoRA's ``LoraConfig`` (diffusers' ``lora_adapter_metadata``, keys optionally prefixed ``"transformer."``)
    with `standard_attention_names` applied to its target modules and per-module patterns."""
    if not metadata:
        return metadata
    metadata = dict(metadata)
    for key, value in metadata.items():
        field = key.rpartition(".")[2]
        if field in ("target_modules", "exclude_modules") and isinstance(value, str):
            if re.search(r"\b(qkv|proj)\b", value):
                raise ValueError(
                    f"this LoRA's {field} is the pattern {value!r}, written for the original attention names: "
                    "SiTAttention's qkv is now to_q / to_k / to_v and proj is to_out.0; rewrite the pattern."
                )
        elif field in ("target_modules", "exclude_modules") and isinstance(value, (list, tuple, set)):
            metadata[key] = list(dict.fromkeys(new for name in value for new in standard_attention_names(name)))
        elif field in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
            metadata[key] = {new: rank for name, rank in value.items() for new in standard_attention_names(name)}
    return metadata


def _accept_fused_layout(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of `SiTAttention`: a state dict with the original's ``qkv`` / ``proj`` names (e.g.
    a training checkpoint written before the rename) is split and renamed in place before torch matches keys."""
    if f"{prefix}qkv.weight" in state_dict or f"{prefix}proj.weight" in state_dict:
        split_fused_attention_keys(state_dict, prefix)


class SiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with diffusers' names: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.

    An `AttentionModuleMixin` with a processor, like diffusers' own attention modules, so the model-level
    ``set_attention_backend``, ``set_attn_processor`` and ``fuse_qkv_projections`` reach it, and LoRA targets are
    diffusers' usual ``to_q, to_k, to_v, to_out.0``. The original fuses q, k, v into one ``qkv`` Linear and calls
    the output ``proj``: `split_fused_attention_keys` maps those names, and `load_state_dict` accepts them (a
    pre-hook), so folders saved before the rename still load.
    """

    _default_processor_cls = SiTAttnProcessor
    _available_processors = [SiTAttnProcessor]
    _supports_qkv_fusion = True
    is_cross_attention = False  # read by AttentionModuleMixin.fuse_projections
    use_bias = True

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, processor: SiTAttnProcessor | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} must be divisible by num_attention_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        # timm's Attention (used by the original) normalises q and k per head with an affine LayerNorm.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())
        self.register_load_state_dict_pre_hook(_accept_fused_layout)

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


def _check_config(mlp_ratio: float, class_dropout_prob: float, **sizes: int) -> None:
    """Nonsense in a (hand-edited) transformer config.json is one ValueError naming the field, instead of a
    failure deep inside torch (a negative number of layers, a zero size)."""
    for field, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"transformer config.json: {field} must be an integer >= 1, got {value!r}.")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < math.inf:
        raise ValueError(f"transformer config.json: mlp_ratio must be a finite number > 0, got {mlp_ratio!r}.")
    if isinstance(class_dropout_prob, bool) or not isinstance(class_dropout_prob, (int, float)):
        raise ValueError(f"transformer config.json: class_dropout_prob must be a number, got {class_dropout_prob!r}.")
    if not 0 <= class_dropout_prob <= 1:  # 1: every label dropped in training (unconditional)
        raise ValueError(f"transformer config.json: class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}.")


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


class SiTTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
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
    ``load_lora_adapter``); the natural targets are ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (diffusers' names),
    ``fc1``, ``fc2`` and ``adaln_modulation``. Weights saved with the original's attention names (``attn.qkv``,
    ``attn.proj``, as this package wrote them before adopting diffusers') still load: `from_pretrained` and
    ``load_state_dict`` split and rename them.
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
        _check_config(
            sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            num_layers=num_layers, num_attention_heads=num_attention_heads, num_classes=num_classes,
            mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
        )  # fmt: skip
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
        attention_linears = set()
        for module in self.modules():
            if isinstance(module, SiTAttention):
                # The original's one fused qkv Linear: xavier over the [3D, D] matrix (a narrower range than three
                # [D, D] draws), drawn in one go so that a seed gives the original's numbers.
                weight = module.to_q.weight
                fused = torch.empty(3 * weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
                nn.init.xavier_uniform_(fused)
                for linear, part in zip((module.to_q, module.to_k, module.to_v), fused.chunk(3, dim=0)):
                    linear.weight.data.copy_(part)
                    nn.init.zeros_(linear.bias)
                attention_linears.update([module.to_q, module.to_k, module.to_v])
            elif isinstance(module, nn.Linear) and module not in attention_linears:
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

    def _fix_state_dict_keys_on_load(self, state_dict):
        """diffusers' hook for renamed weights (single-file checkpoints): also the original's ``attn.qkv`` /
        ``attn.proj`` -> ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``."""
        super()._fix_state_dict_keys_on_load(state_dict)
        return split_fused_attention_keys(state_dict)

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                               loaded_keys, *args, **kwargs):  # fmt: skip
        """A sharded folder in the old attention layout: diffusers skips `_fix_state_dict_keys_on_load` for shards,
        so the shards are read into one state dict and renamed here (a one-off cost; re-save to avoid it)."""
        old_layout = any(re.search(r"\battn\.(qkv|proj)\.", key) for key in loaded_keys)
        if state_dict is None and old_layout and kwargs.get("tp_shard_specs") is None:
            logger.warning(f"{pretrained_model_name_or_path}: old attention names (attn.qkv/proj); re-save to update.")
            state_dict = {}
            for shard in resolved_model_file:
                state_dict.update(load_state_dict(shard))
            loaded_keys = list(split_fused_attention_keys(state_dict))
        return super()._load_pretrained_model(
            model, state_dict, resolved_model_file, pretrained_model_name_or_path, loaded_keys, *args, **kwargs
        )

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        """diffusers' `PeftAdapterMixin.load_lora_adapter`; an adapter trained on the original attention names
        (``qkv``, ``attn.proj``, as this package named them before adopting diffusers') is renamed first. A fused
        ``qkv`` LoRA splits exactly: ``lora_B`` rows per q, k, v, the shared ``lora_A`` copied to each."""
        metadata = kwargs.pop("metadata", None)
        state_dict = pretrained_model_name_or_path_or_dict
        if not isinstance(state_dict, dict):
            from ..loaders.lora_pipeline import FETCH_KWARGS, RepaELoraLoaderMixin

            fetch = {key: kwargs.pop(key) for key in FETCH_KWARGS if key in kwargs}
            state_dict, stored = RepaELoraLoaderMixin.lora_state_dict(state_dict, return_lora_metadata=True, **fetch)
            metadata = metadata if metadata is not None else stored
        state_dict = split_fused_attention_keys(dict(state_dict))
        return super().load_lora_adapter(
            state_dict, prefix=prefix, hotswap=hotswap, metadata=standard_lora_metadata(metadata), **kwargs
        )

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

"""REPA projector heads: map SiT tokens after block ``encoder_depth`` to each vision encoder's feature space."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear -> SiLU -> Linear (keys ``0``, ``2``, ``4`` as in the original)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class REPAProjector(ModelMixin, ConfigMixin):
    r"""
    One token-wise MLP head per vision encoder (SPEC section 2). Needed for training only, never for sampling.

    Args:
        hidden_size (`int`): Width of the SiT tokens it reads.
        z_dims (`list[int]`): Feature width of each vision encoder, in the order of ``--enc_type``.
        projector_dim (`int`, defaults to 2048): Hidden width of each MLP.
        encoder_depth (`int`, defaults to 8): The SiT block (1-based) whose output is projected.
    """

    @register_to_config
    def __init__(
        self, hidden_size: int = 1152, z_dims: list[int] = (768,), projector_dim: int = 2048, encoder_depth: int = 8
    ):
        super().__init__()
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        for module in self.modules():
            if isinstance(module, nn.Linear):  # the original SiT's xavier init reaches its projectors too
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """``[batch, tokens, hidden_size]`` -> one ``[batch, tokens, z_dim]`` per encoder."""
        return [projector(hidden_states) for projector in self.projectors]

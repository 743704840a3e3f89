"""EMA of a model *including its buffers* (REPA-E averages the latent BatchNorm statistics too).

diffusers' ``EMAModel`` averages parameters only and ignores buffers, so it cannot carry the BatchNorm
running statistics REPA-E decodes with; this is the smallest replacement that does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999, trainable_only: bool = False) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters and floating buffers; integer buffers are copied.

    Names must match (wrap/unwrap models first: no ``module.`` / ``_orig_mod.`` prefixes). ``decay=0`` copies.
    ``trainable_only`` (fine-tuning) follows only the parameters that require grad in ``model`` and moves them by
    ``ema + (1 - decay) (model - ema)``, which leaves every value the training did not change bit-identical
    (frozen weights, masked label rows); the default is the original's formula for every parameter.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    model_params = dict(model.named_parameters())
    ema_params, sources = [], []
    for name, ema_param in ema_model.named_parameters():
        if trainable_only and not model_params[name].requires_grad:
            continue
        ema_params.append(ema_param)
        sources.append(model_params[name].detach().to(ema_param.dtype))
    if trainable_only:
        if ema_params:
            torch._foreach_lerp_(ema_params, sources, 1.0 - decay)  # exact where model == ema
    else:
        # One multi-tensor kernel per op instead of two launches per tensor (SiT-XL/2: ~290 tensors); same
        # arithmetic as the per-tensor mul_/add_, so bit-identical (benchmarks/bench_train_step.py measures it).
        torch._foreach_mul_(ema_params, decay)
        torch._foreach_add_(ema_params, sources, alpha=1.0 - decay)
    model_buffers = dict(model.named_buffers())
    persistent = ema_model.state_dict().keys()  # derived buffers (e.g. the SiT's fixed pos_embed) stay untouched
    for name, ema_buffer in ema_model.named_buffers():
        if name not in persistent:
            continue
        source = model_buffers[name].detach()
        if ema_buffer.is_floating_point():
            ema_buffer.mul_(decay).add_(source.to(ema_buffer.dtype), alpha=1.0 - decay)
        else:
            ema_buffer.copy_(source)


class ModelEMA:
    """A frozen, eval-mode copy of a model, updated by `update_ema`; checkpointable through ``state_dict``.

    Register it with ``accelerator.register_for_checkpointing`` so ``save_state`` / ``load_state`` carry it.
    ``warmup`` (fine-tuning) uses the decay ``min(decay, (1 + n) / (10 + n))`` at the n-th update (n from 0), so a
    short run's EMA follows the training instead of staying at the starting weights, and follows only trainable
    parameters (``update_ema(trainable_only=True)``). Without it every update uses ``decay``, as the original.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}.")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next `step` uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def step(self, model: nn.Module, decay: float | None = None) -> None:
        decay = self.current_decay() if decay is None else decay
        update_ema(self.model, model, decay, trainable_only=self.warmup)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.decay = state_dict["decay"]
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.model.load_state_dict(state_dict["model"])

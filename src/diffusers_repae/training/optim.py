"""Optimisers and learning-rate schedules of the training scripts: AdamW, schedules per optimiser, LR factors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler


def make_adamw(
    params,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    use_8bit: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params`` (the shared ``--adam_*`` flags' values).

    ``fused=True``: one kernel for the whole update, 4x faster than the for-loop implementation on a SiT-B/2
    step (benchmarks/bench_sit.py) and within 1.5e-8 of it after one step. ``use_8bit`` (``--use_8bit_adam``):
    bitsandbytes' ``AdamW8bit`` (optional dependency, imported only then).
    """
    optimizer_class, extra = torch.optim.AdamW, {"fused": True}
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` (CUDA), or "
                "drop the flag."
            ) from None
        optimizer_class, extra = bnb.optim.AdamW8bit, {}
    return optimizer_class(
        [p for p in params if p.requires_grad],
        lr=lr,
        betas=tuple(betas),
        weight_decay=weight_decay,
        eps=eps,
        **extra,
    )


def make_lr_schedulers(
    optimizers: dict[str, torch.optim.Optimizer],
    name: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    global_step: int = 0,
    factors: dict[str, Callable[[int], float]] | None = None,
) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
    """The schedule ``name`` (``--lr_scheduler``) with ``warmup_steps`` of warm-up over ``total_steps`` on each
    optimiser (``diffusers.optimization.get_scheduler``), counted in optimizer steps and positioned at
    ``global_step``; ``factors[name](step)``, where given, multiplies that optimiser's schedule (a phase of the run
    that anneals one model, say).

    The schedules are pure functions of the step, so a resumed run rebuilds them at its step instead of storing
    them: the base rate is the optimiser's ``initial_lr`` (saved with its state), the current one follows.
    """
    factors = factors or {}
    unknown = set(factors) - set(optimizers)
    if unknown:
        raise ValueError(f"lr_factors for unknown optimisers {sorted(unknown)}; known: {sorted(optimizers)}")
    schedulers = {}
    for key, optimizer in optimizers.items():
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        schedule = _schedule_multiplier(name, warmup_steps, total_steps, optimizer.param_groups[0]["initial_lr"])
        factor = factors.get(key, _unit_factor)
        schedulers[key] = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step, schedule=schedule, factor=factor: schedule(step) * factor(step), global_step - 1
        )
    return schedulers


def linear_decay_factor(start: int, end: int) -> Callable[[int], float]:
    """A learning-rate multiplier for ``factors``: 1 before step ``start``, then linear to 0 at step ``end``."""

    def factor(step: int) -> float:
        if step < start:
            return 1.0
        return max(0.0, (end - step) / max(1, end - start))

    return factor


def _unit_factor(step: int) -> float:
    return 1.0


def _schedule_multiplier(
    name: str, warmup_steps: int, total_steps: int | None, base_lr: float
) -> Callable[[int], float]:
    """The schedule's multiplier of ``base_lr`` at a step, read off the scheduler diffusers builds for it
    (some schedules, such as polynomial, depend on the base rate)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = get_scheduler(name, probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return scheduler.lr_lambdas[0]

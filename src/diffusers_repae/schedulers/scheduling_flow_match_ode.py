"""REPA-E's ODE samplers (SPEC section 8): Euler and Heun on the uniform grid ``linspace(1, 0, N + 1)``.

Euler reuses diffusers' own ``FlowMatchEulerDiscreteScheduler`` with explicit sigmas (``repae_ode_sigmas``).
Heun needs a scheduler of its own: diffusers' ``FlowMatchHeunDiscreteScheduler`` has no ``sigmas`` argument and
always ends its grid at ``1 / num_train_timesteps`` instead of 0, so it cannot walk REPA-E's grid.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .scheduling_flow_match_euler_maruyama import (
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchSchedulerOutput,
    _StepIndexMixin,
    check_num_inference_steps,
)


def repae_ode_sigmas(num_inference_steps: int) -> np.ndarray:
    """The N start times of REPA-E's ODE steps, ``linspace(1, 0, N + 1)[:-1]`` (the scheduler appends the 0).

    Computed with ``torch.linspace`` in float64 like the original (numpy's linspace differs in the last bit).
    """
    check_num_inference_steps(num_inference_steps)
    return torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)[:-1].numpy()


class FlowMatchHeunScheduler(_StepIndexMixin, SchedulerMixin, ConfigMixin):
    r"""
    Heun (2nd order) on the grid ``t_i = linspace(1, 0, N + 1)``, as in REPA-E's ``euler_sampler(heun=True)``.

    Every step but the last evaluates the velocity twice: ``x' = x + dt v(x, t_i)``, then
    ``x <- x + dt (v(x, t_i) + v(x', t_{i+1})) / 2``. The last step (to t = 0) is plain Euler, so N steps cost
    ``2N - 1`` model evaluations. ``timesteps`` follow diffusers' Heun layout ``[t_0, t_1, t_1, t_2, t_2, ...]``
    (times ``num_train_timesteps``), ``sigmas[i]`` is the time of evaluation ``i`` (float64) and ends with 0.
    ``step`` works in the dtype of ``sample``.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Scale of ``timesteps`` (``t * num_train_timesteps``).
    """

    order = 2
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.prev_derivative: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self.dt: float | None = None
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (Euler) step, False when it is the Heun correction."""
        return self.prev_derivative is None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        check_num_inference_steps(num_inference_steps)
        grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        evaluated = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2)])
        self.sigmas = torch.cat([evaluated, grid[-1:]])
        self.timesteps = (evaluated * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self._reset_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> FlowMatchSchedulerOutput | tuple:
        """
        Predictor or corrector half of a Heun step (``generator`` is accepted for interface parity and unused).

        Args:
            model_output (`torch.Tensor`): Velocity at (``sample``, ``sigmas[step_index]``).
            timestep (`float` or `torch.Tensor`): The current entry of ``timesteps``.
            sample (`torch.Tensor`): The state the velocity was evaluated at.
            return_dict (`bool`): Return a [`FlowMatchSchedulerOutput`] instead of a tuple.
        """
        if self.step_index is None:
            self._init_step_index(timestep)
        velocity = model_output.to(sample.dtype)
        if self.state_in_first_order:
            dt = float(self.sigmas[self.step_index + 1]) - float(self.sigmas[self.step_index])
            prev_sample = sample + dt * velocity
            if float(self.sigmas[self.step_index + 1]) > 0.0:  # not the last step: remember for the correction
                self.prev_derivative, self.sample, self.dt = velocity, sample, dt
        else:
            prev_sample = self.sample + self.dt * (0.5 * self.prev_derivative + 0.5 * velocity)
            self.prev_derivative, self.sample, self.dt = None, None, None
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchSchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# The names a pipeline argument or a CLI flag may use.
SAMPLERS: dict[str, type] = {
    "euler": FlowMatchEulerDiscreteScheduler,
    "heun": FlowMatchHeunScheduler,
    "sde": FlowMatchEulerMaruyamaScheduler,
}


def scheduler_for_sampler(sampler: str, config: dict | None = None):
    """A fresh scheduler for ``"euler"``, ``"heun"`` or ``"sde"``, built the diffusers way from ``config``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
    cls = SAMPLERS[sampler]
    config = {"num_train_timesteps": 1000, **dict(config or {})}
    if cls is FlowMatchEulerDiscreteScheduler:
        # REPA-E's grid is unshifted; a stale `shift`/dynamic shifting from another scheduler must not warp it.
        config.update(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=False)
    return cls.from_config(config)


def set_repae_timesteps(scheduler, num_inference_steps: int, device: str | torch.device | None = None) -> None:
    """Put REPA-E's time grid on any supported scheduler (this package's, or diffusers' flow-match Euler)."""
    check_num_inference_steps(num_inference_steps)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if scheduler.config.use_dynamic_shifting:
            raise ValueError("scheduler.config.use_dynamic_shifting must be False for REPA-E's linear time grid.")
        scheduler.set_timesteps(sigmas=repae_ode_sigmas(num_inference_steps), device=device)
    elif isinstance(scheduler, (FlowMatchHeunScheduler, FlowMatchEulerMaruyamaScheduler)):
        scheduler.set_timesteps(num_inference_steps, device=device)
    else:
        raise ValueError(
            f"scheduler must be a FlowMatchEulerDiscreteScheduler, FlowMatchHeunScheduler or "
            f"FlowMatchEulerMaruyamaScheduler, got {type(scheduler).__name__}."
        )

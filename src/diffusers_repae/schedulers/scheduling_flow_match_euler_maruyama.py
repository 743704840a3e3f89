"""REPA-E's stochastic sampler (SPEC section 8) as a diffusers scheduler.

Linear flow path ``x_t = (1 - t) x + t eps`` with t = 1 pure noise; the model predicts the velocity
``v = eps - x``. The reverse SDE uses diffusion ``w(t) = 2 t`` and the score recovered from the velocity,
``s = -((1 - t) v + x) / t``, so the drift is ``d = v - w s / 2``. For the cosine path ``x_t = alpha_t x + sigma_t
eps`` (``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``) the score is the original's general form
``s = (r v - x) / (sigma^2 - r sigma' sigma)`` with ``r = alpha / alpha'``. Each of the first ``N - 1`` steps on
the grid ``linspace(1, t_last, N)`` is ``x <- x + d dt + sqrt(w) sqrt(|dt|) n``; the last step from ``t_last`` to 0
is the deterministic ``x + d dt`` (the score blows up at t = 0, hence the stop at ``t_last``).

Why not diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``: that one predicts ``x0`` and
re-noises it to the next sigma (``x' = (1 - t') x0 + t' n``), i.e. it throws the whole state's noise away each step
(an "ancestral" sampler). It has no score-based drift correction, no ``sqrt(|dt|)`` Brownian increment, no stop at
``t_last`` and no deterministic final step, so it samples a different process and does not reproduce REPA-E's
numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .grids import given_start_times


@dataclass
class FlowMatchSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor` of shape `(batch, channels, height, width)`):
            The state at the next (smaller) time, to be fed to the model at the next step.
    """

    prev_sample: torch.Tensor


# Schedulers of the same model (velocity on the linear flow path, t = 1 noise): diffusers' own and this package's.
# ``SchedulerClass.from_config(pipe.scheduler.config)`` with any of them gives a working sampler.
FLOW_MATCH_COMPATIBLES = [
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchEulerMaruyamaScheduler",
    "FlowMatchHeunScheduler",
]


class _StepIndexMixin:
    """diffusers' step-index bookkeeping (``step_index``, ``begin_index``), shared by this package's schedulers."""

    _step_index: int | None = None
    _begin_index: int | None = None

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """diffusers' ``compatibles`` looks ``_compatibles`` up in the diffusers package only; this package's names
        are found among this mixin's subclasses (so also in a saved folder's ``trust_remote_code`` copy).

        ``compatibles`` is also what makes ``from_config`` of a compatible scheduler's config (Heun from
        Euler-Maruyama's, as documented) drop that scheduler's own settings quietly instead of warning.
        """
        ours = {c.__name__: c for c in _StepIndexMixin.__subclasses__()} | {cls.__name__: cls}
        names = dict.fromkeys([cls.__name__, *cls._compatibles])
        return [
            ours[name] if name in ours else getattr(diffusers, name)
            for name in names
            if name in ours or hasattr(diffusers, name)
        ]

    @property
    def step_index(self) -> int | None:
        """Index of the current timestep in ``timesteps``; increases by one after each ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First timestep index, set by the pipeline with ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        indices = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of this scheduler's timesteps.")
        return int(indices[0].item())

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self.timesteps is None:
            raise ValueError("call `set_timesteps` before `step`.")
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self.begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching models take the state as is (kept for the diffusers scheduler interface)."""
        return sample


# (alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) of ``x_t = alpha_t x + sigma_t eps`` (SPEC section 1).
PATH_COEFFICIENTS = {
    "linear": lambda t: (1.0 - t, t, -1.0, 1.0),
    "cosine": lambda t: (
        math.cos(t * math.pi / 2),
        math.sin(t * math.pi / 2),
        -math.pi / 2 * math.sin(t * math.pi / 2),
        math.pi / 2 * math.cos(t * math.pi / 2),
    ),
}


def score_from_velocity(velocity: torch.Tensor, sample: torch.Tensor, t: float, path_type: str) -> torch.Tensor:
    """The score of ``x_t`` from the velocity, as the original: ``(r v - x) / (sigma^2 - r sigma' sigma)``,
    ``r = alpha / alpha'``. Linear path: ``-((1 - t) v + x) / t``; cosine: ``-(2 / pi) cot(pi t / 2) v - x``."""
    alpha, sigma, d_alpha, d_sigma = PATH_COEFFICIENTS[path_type](t)
    ratio = alpha / d_alpha
    variance = sigma**2 - ratio * d_sigma * sigma
    return (ratio * velocity - sample) / variance


def check_num_inference_steps(num_inference_steps: int) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")


class FlowMatchEulerMaruyamaScheduler(_StepIndexMixin, SchedulerMixin, ConfigMixin):
    r"""
    Euler-Maruyama sampler of REPA-E / REPA / SiT (velocity prediction, t = 1 is noise), linear or cosine path.

    ``set_timesteps(N)`` builds the time grid ``linspace(1, t_last, N)`` followed by 0, so there are N model
    evaluations. ``timesteps`` are ``t * num_train_timesteps`` (diffusers convention); ``sigmas`` hold the times
    themselves in float64 (with the final 0), which is what a pipeline should hand to a model that takes t in
    [0, 1]. ``step`` works in the dtype of ``sample`` (use float64 to match the original exactly) and draws the
    Brownian increments with ``randn_tensor(..., generator=generator, dtype=sample.dtype)``.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Scale of ``timesteps`` (``t * num_train_timesteps``).
        t_last (`float`, defaults to 0.04): Last time of the stochastic grid; the final step to 0 is deterministic.
        path_type (`str`, defaults to `"linear"`): The interpolant the model was trained on (``train_*.py
            --path_type``), ``"linear"`` or ``"cosine"``: it decides the score recovered from the velocity.
    """

    _compatibles = [name for name in FLOW_MATCH_COMPATIBLES if name != "FlowMatchEulerMaruyamaScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, t_last: float = 0.04, path_type: str = "linear"):
        if not 0.0 < t_last < 1.0:
            raise ValueError(f"t_last must be in (0, 1), got {t_last}.")
        if path_type not in PATH_COEFFICIENTS:
            raise ValueError(f"path_type must be one of {sorted(PATH_COEFFICIENTS)}, got {path_type!r}.")
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index = None
        self._begin_index = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        timesteps: list[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Grid ``linspace(1, t_last, N)`` then 0 (float64 ``sigmas`` on CPU, float32 ``timesteps`` on ``device``).

        ``sigmas`` (or ``timesteps = sigmas * num_train_timesteps``): the N evaluation times instead, all > 0, the
        last one taking the deterministic final step to 0 (diffusers' flow-match convention).
        """
        grid = given_start_times(num_inference_steps, sigmas, timesteps, self.config.num_train_timesteps)
        if grid is None:
            check_num_inference_steps(num_inference_steps)
            grid = torch.linspace(1.0, self.config.t_last, num_inference_steps, dtype=torch.float64)
        num_inference_steps = len(grid)
        self.sigmas = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
        self.timesteps = (grid * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> FlowMatchSchedulerOutput | tuple:
        """
        One Euler-Maruyama step from ``sigmas[i]`` to ``sigmas[i + 1]``.

        Args:
            model_output (`torch.Tensor`): Velocity ``v(x, t)`` (already guided, if guidance is used).
            timestep (`float` or `torch.Tensor`): The current entry of ``timesteps``.
            sample (`torch.Tensor`): The current state x; its dtype is the computation dtype.
            generator (`torch.Generator` or a list of one per sample, *optional*): Source of the Brownian noise.
            return_dict (`bool`): Return a [`FlowMatchSchedulerOutput`] instead of a tuple.
        """
        if self.step_index is None:
            self._init_step_index(timestep)
        t = float(self.sigmas[self.step_index])
        t_next = float(self.sigmas[self.step_index + 1])
        dt = t_next - t
        velocity = model_output.to(sample.dtype)
        diffusion = 2.0 * t
        score = score_from_velocity(velocity, sample, t, self.config.path_type)
        drift = velocity - 0.5 * diffusion * score
        prev_sample = sample + drift * dt
        if t_next > 0.0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + math.sqrt(diffusion) * (noise * math.sqrt(abs(dt)))
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchSchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def scheduler_for_path_type(scheduler, path_type: str):
    """The sampler of a model trained on ``path_type``: the SDE's score depends on the path, so an Euler-Maruyama
    scheduler is rebuilt with it in its config (saved with the pipeline); ODE samplers only integrate the velocity
    and are returned as they are."""
    if isinstance(scheduler, FlowMatchEulerMaruyamaScheduler) and scheduler.config.path_type != path_type:
        config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
        return FlowMatchEulerMaruyamaScheduler.from_config({**config, "path_type": path_type})
    return scheduler

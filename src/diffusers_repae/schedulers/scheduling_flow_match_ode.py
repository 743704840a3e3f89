"""REPA-E's ODE samplers (SPEC section 8): Euler and Heun on the uniform grid ``linspace(1, 0, N + 1)``.

Euler reuses diffusers' own ``FlowMatchEulerDiscreteScheduler`` with explicit sigmas (``repae_ode_sigmas``).
Heun needs a scheduler of its own: diffusers' ``FlowMatchHeunDiscreteScheduler`` has no ``sigmas`` argument and
always ends its grid at ``1 / num_train_timesteps`` instead of 0, so it cannot walk REPA-E's grid.

Any other diffusers flow-matching scheduler plugs in through ``set_repae_timesteps``: the REPA-E grid is handed
over as ``set_timesteps(sigmas=...)`` where the scheduler takes it (UniPC with flow sigmas), and the scheduler's
own flow grid is used where it does not (DPM-Solver++ with flow sigmas, which has no ``sigmas`` argument).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .grids import given_start_times
from .scheduling_flow_match_euler_maruyama import (
    FLOW_MATCH_COMPATIBLES,
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

    _compatibles = [name for name in FLOW_MATCH_COMPATIBLES if name != "FlowMatchHeunScheduler"]
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

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        timesteps: list[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """REPA-E's grid ``linspace(1, 0, N + 1)``, or the N step start times given as ``sigmas`` (or as
        ``timesteps = sigmas * num_train_timesteps``) followed by 0, diffusers' flow-match convention."""
        starts = given_start_times(num_inference_steps, sigmas, timesteps, self.config.num_train_timesteps)
        if starts is None:
            check_num_inference_steps(num_inference_steps)
            grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        else:
            grid = torch.cat([starts, torch.zeros(1, dtype=torch.float64)])
            num_inference_steps = len(starts)
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
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}

# The flow-matching settings of diffusers' multistep solvers: velocity ``eps - x`` on the linear path, no shift.
MULTISTEP_FLOW_CONFIG = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 1.0}


def scheduler_for_sampler(sampler: str, config: dict | None = None):
    """A fresh scheduler for ``"euler"``, ``"heun"``, ``"sde"``, ``"dpmsolver++"`` (2nd order DPM-Solver++) or
    ``"unipc"`` (UniPC-bh2), built the diffusers way from ``config``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
    cls = SAMPLERS[sampler]
    config = {"num_train_timesteps": 1000, **dict(config or {})}
    if cls is FlowMatchEulerDiscreteScheduler:
        # REPA-E's grid is unshifted; a stale `shift`/dynamic shifting from another scheduler must not warp it.
        config.update(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=False)
    elif cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        if config.get("path_type", "linear") != "linear":
            # their flow_prediction means x0 = x_t - t v: the linear path's; the ODE samplers use v as it is
            raise ValueError(
                f"sampler {sampler!r} assumes the linear path; this model was trained on path_type "
                f"{config['path_type']!r}: use 'euler', 'heun' or 'sde'."
            )
        config.update(MULTISTEP_FLOW_CONFIG, use_dynamic_shifting=False, solver_order=2)
        if cls is DPMSolverMultistepScheduler:
            config.update(algorithm_type="dpmsolver++")
    # only what this class takes: another scheduler's keys (t_last, path_type) would make diffusers warn
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config({key: value for key, value in config.items() if key in accepted})


def is_flow_matching(scheduler) -> bool:
    """True for schedulers of the linear flow path with velocity prediction: diffusers' ``FlowMatch*`` classes,
    this package's, and multistep solvers configured with ``use_flow_sigmas`` and ``flow_prediction``."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return True
    config = scheduler.config
    return bool(config.get("use_flow_sigmas", False)) and config.get("prediction_type") == "flow_prediction"


def repae_sigmas(scheduler, num_inference_steps: int) -> np.ndarray:
    """REPA-E's N evaluation times for ``scheduler``: ``linspace(1, t_last, N)`` for the Euler-Maruyama SDE,
    ``linspace(1, 0, N + 1)[:-1]`` (the ODE grid) for every other sampler. float64."""
    if isinstance(scheduler, FlowMatchEulerMaruyamaScheduler):
        check_num_inference_steps(num_inference_steps)
        return torch.linspace(1.0, scheduler.config.t_last, num_inference_steps, dtype=torch.float64).numpy()
    return repae_ode_sigmas(num_inference_steps)


def set_repae_timesteps(scheduler, num_inference_steps: int, device: str | torch.device | None = None) -> None:
    """Put REPA-E's time grid on a flow-matching scheduler through ``set_timesteps(sigmas=...)``.

    Schedulers without a ``sigmas`` argument (diffusers' DPM-Solver++, flow-match Heun) get
    ``set_timesteps(num_inference_steps)`` and walk their own flow grid. Non-flow schedulers (epsilon / v
    prediction on a DDPM noise schedule) are refused: the SiT predicts the flow velocity ``eps - x``.
    """
    check_num_inference_steps(num_inference_steps)
    if not is_flow_matching(scheduler):
        raise ValueError(
            f"scheduler: {type(scheduler).__name__} is not a flow-matching scheduler; allowed: diffusers' FlowMatch* "
            "schedulers, this package's, or DPMSolverMultistepScheduler / UniPCMultistepScheduler with "
            "use_flow_sigmas=True and prediction_type='flow_prediction' (see scheduler_for_sampler)."
        )
    if scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError(
            "scheduler.config.use_dynamic_shifting must be False: REPA-E's time grid is not resolution-shifted."
        )
    if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(sigmas=repae_sigmas(scheduler, num_inference_steps), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)

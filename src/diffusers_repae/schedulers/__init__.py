from .scheduling_flow_match_euler_maruyama import FlowMatchEulerMaruyamaScheduler, FlowMatchSchedulerOutput
from .scheduling_flow_match_ode import (
    SAMPLERS,
    FlowMatchHeunScheduler,
    repae_ode_sigmas,
    scheduler_for_sampler,
    set_repae_timesteps,
)

__all__ = [
    "SAMPLERS",
    "FlowMatchEulerMaruyamaScheduler",
    "FlowMatchHeunScheduler",
    "FlowMatchSchedulerOutput",
    "repae_ode_sigmas",
    "scheduler_for_sampler",
    "set_repae_timesteps",
]

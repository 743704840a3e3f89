from .scheduling_flow_match_euler_maruyama import (
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchSchedulerOutput,
    scheduler_for_path_type,
)
from .scheduling_flow_match_ode import (
    SAMPLERS,
    FlowMatchHeunScheduler,
    is_flow_matching,
    repae_ode_sigmas,
    repae_sigmas,
    scheduler_for_sampler,
    set_repae_timesteps,
)

__all__ = [
    "SAMPLERS",
    "FlowMatchEulerMaruyamaScheduler",
    "FlowMatchHeunScheduler",
    "FlowMatchSchedulerOutput",
    "is_flow_matching",
    "repae_ode_sigmas",
    "repae_sigmas",
    "scheduler_for_path_type",
    "scheduler_for_sampler",
    "set_repae_timesteps",
]

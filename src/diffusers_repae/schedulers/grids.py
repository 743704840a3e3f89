"""Custom time grids for this package's schedulers: ``set_timesteps(sigmas=...)`` / ``set_timesteps(timesteps=...)``.

diffusers' convention (``FlowMatchEulerDiscreteScheduler``): ``sigmas`` are the N times at which the model is
evaluated, decreasing; the scheduler appends the terminal 0 itself. ``timesteps`` are the same times multiplied by
``num_train_timesteps``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def given_start_times(
    num_inference_steps: int | None,
    sigmas: Sequence[float] | np.ndarray | torch.Tensor | None,
    timesteps: Sequence[float] | np.ndarray | torch.Tensor | None,
    num_train_timesteps: int,
) -> torch.Tensor | None:
    """The N step start times (float64, CPU) from ``sigmas`` or ``timesteps``; None when neither is given.

    Checked: one of the two, 1-D, non-empty, as long as ``num_inference_steps`` when that is given too, strictly
    decreasing, in (0, 1] (the final step to 0 is the scheduler's own).
    """
    if sigmas is None and timesteps is None:
        return None
    if sigmas is not None and timesteps is not None:
        raise ValueError("set_timesteps: pass either sigmas or timesteps, not both.")
    name, values = ("sigmas", sigmas) if sigmas is not None else ("timesteps", timesteps)
    times = torch.as_tensor(np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, np.float64))
    if name == "timesteps":
        times = times / num_train_timesteps
    if not bool(torch.isfinite(times).all()):
        raise ValueError(f"set_timesteps: {name} must be finite numbers, got {times.tolist()[:8]}.")
    if times.ndim != 1 or len(times) == 0:
        raise ValueError(f"set_timesteps: {name} must be a non-empty 1-D sequence, got shape {tuple(times.shape)}.")
    if num_inference_steps is not None and num_inference_steps != len(times):
        raise ValueError(
            f"set_timesteps: num_inference_steps={num_inference_steps} but {len(times)} {name} were given; "
            "allowed: num_inference_steps=None or the same length."
        )
    if not (times[0] <= 1.0 and times[-1] > 0.0 and bool((times[1:] < times[:-1]).all())):
        raise ValueError(
            f"set_timesteps: {name} must be strictly decreasing times in (0, 1]"
            + (" (after dividing by num_train_timesteps)" if name == "timesteps" else "")
            + f"; the terminal 0 is appended by the scheduler. Got {times.tolist()[:8]}..."
        )
    return times

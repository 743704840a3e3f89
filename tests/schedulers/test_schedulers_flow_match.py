"""Schedulers against SPEC section 8, written out here: grids, single steps, whole ODE/SDE runs on Gaussian data."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_repae import (
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchHeunScheduler,
    load_component_config,
    repae_ode_sigmas,
    scheduler_for_sampler,
    set_repae_timesteps,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- an analytic field
# Data x0 ~ N(MU, S^2) per coordinate, x_t = (1 - t) x0 + t eps. Then x_t ~ N((1 - t) MU, var_t) with
# var_t = (1 - t)^2 S^2 + t^2, and the exact velocity E[eps - x0 | x_t] is linear in x_t.
MU, S = 1.5, 0.5


def gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    var_t = (1 - t) ** 2 * S**2 + t**2
    centred = x - (1 - t) * MU
    mean_eps = t / var_t * centred
    mean_x0 = MU + (1 - t) * S**2 / var_t * centred
    return mean_eps - mean_x0


def run(scheduler, velocity_fn, x: torch.Tensor, steps: int, generator=None) -> tuple[torch.Tensor, int]:
    """A pipeline-style loop: the model time is ``scheduler.sigmas[i]``; returns (sample, model evaluations)."""
    set_repae_timesteps(scheduler, steps)
    scheduler.set_begin_index(0)
    for i, timestep in enumerate(scheduler.timesteps):
        t = float(scheduler.sigmas[i])
        x = scheduler.step(velocity_fn(x, t), timestep, x, generator=generator).prev_sample
    return x, len(scheduler.timesteps)


# ---------------------------------------------------------------------------------------------------- the grids
@pytest.mark.parametrize("steps", [1, 2, 7, 250])
def test_sde_grid_is_linspace_to_t_last_then_zero(steps):
    scheduler = FlowMatchEulerMaruyamaScheduler()
    scheduler.set_timesteps(steps)
    expected = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert scheduler.sigmas.dtype == torch.float64
    assert torch.equal(scheduler.sigmas, expected)
    assert torch.allclose(scheduler.timesteps.double(), expected[:-1] * 1000, rtol=1e-6)
    assert len(scheduler.timesteps) == steps and scheduler.order == 1


def test_sde_t_last_is_configurable_and_validated():
    scheduler = FlowMatchEulerMaruyamaScheduler(t_last=0.1)
    scheduler.set_timesteps(3)
    assert scheduler.sigmas.tolist() == pytest.approx([1.0, 0.55, 0.1, 0.0])
    with pytest.raises(ValueError, match="t_last"):
        FlowMatchEulerMaruyamaScheduler(t_last=0.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)


def test_recipe_scheduler_config_loads():
    config = load_component_config("sit-xl-2-sdvae", "scheduler")
    scheduler = FlowMatchEulerMaruyamaScheduler.from_config(config)
    assert scheduler.config.t_last == 0.04 and scheduler.config.num_train_timesteps == 1000


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ode_grids(steps):
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    assert torch.equal(torch.from_numpy(repae_ode_sigmas(steps)), grid[:-1])

    euler = scheduler_for_sampler("euler", FlowMatchEulerMaruyamaScheduler().config)
    set_repae_timesteps(euler, steps)
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler)
    assert torch.allclose(euler.sigmas.double(), grid, atol=1e-7)

    heun = FlowMatchHeunScheduler()
    heun.set_timesteps(steps)
    # evaluations at t_0, then (t_i for the correction, t_i for the next predictor) for every inner point
    evaluated = [grid[0].item()] + [g for g in grid[1:-1].tolist() for _ in range(2)]
    assert heun.sigmas[:-1].tolist() == evaluated and heun.sigmas[-1].item() == 0.0
    assert len(heun.timesteps) == 2 * steps - 1


def test_swapping_the_diffusers_way():
    sde = FlowMatchEulerMaruyamaScheduler()
    assert isinstance(FlowMatchHeunScheduler.from_config(sde.config), FlowMatchHeunScheduler)
    assert isinstance(FlowMatchEulerDiscreteScheduler.from_config(sde.config), FlowMatchEulerDiscreteScheduler)
    back = FlowMatchEulerMaruyamaScheduler.from_config(FlowMatchHeunScheduler.from_config(sde.config).config)
    assert back.config.t_last == 0.04
    with pytest.raises(ValueError, match="sampler"):
        scheduler_for_sampler("ddim")


# --------------------------------------------------------------------------------------------- single steps
def test_sde_step_is_the_spec_formula():
    scheduler = FlowMatchEulerMaruyamaScheduler()
    scheduler.set_timesteps(5)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    v = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    t, t_next = 1.0 - 0.96 / 4 * 2, 1.0 - 0.96 / 4 * 3  # third step of linspace(1, 0.04, 5)
    scheduler.set_begin_index(2)
    out = scheduler.step(v, scheduler.timesteps[2], x, generator=torch.Generator().manual_seed(7)).prev_sample

    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w = 2 * t
    score = -((1 - t) * v + x) / t
    drift = v - 0.5 * w * score
    dt = t_next - t
    expected = x + drift * dt + math.sqrt(w) * math.sqrt(abs(dt)) * noise
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_sde_last_step_is_deterministic():
    scheduler = FlowMatchEulerMaruyamaScheduler()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    v = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    outs = []
    for seed in (0, 1):
        scheduler.set_timesteps(3)
        scheduler.set_begin_index(2)  # the step from t_last to 0
        outs.append(scheduler.step(v, scheduler.timesteps[2], x, generator=torch.Generator().manual_seed(seed)))
    t = 0.04
    expected = x + (v + ((1 - t) * v + x)) * (0.0 - t)  # d = v - t * s with s = -((1 - t) v + x) / t
    torch.testing.assert_close(outs[0].prev_sample, outs[1].prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(outs[0].prev_sample, expected, rtol=0, atol=1e-12)


def test_heun_matches_a_handwritten_loop():
    x0 = torch.randn(64, 2, 1, 1, dtype=torch.float64)
    steps = 6
    out, evaluations = run(FlowMatchHeunScheduler(), gaussian_velocity, x0.clone(), steps)

    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = x0.clone()
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = gaussian_velocity(x, t)
        x_euler = x + (t_next - t) * v
        if i < steps - 1:
            x_euler = x + (t_next - t) * (0.5 * v + 0.5 * gaussian_velocity(x_euler, t_next))
        x = x_euler
    assert evaluations == 2 * steps - 1
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)


def test_euler_matches_a_handwritten_loop():
    x0 = torch.randn(64, 2, 1, 1, dtype=torch.float64)
    out, evaluations = run(scheduler_for_sampler("euler"), gaussian_velocity, x0.clone(), 5)
    x = x0.clone()
    grid = torch.linspace(1.0, 0.0, 6, dtype=torch.float64).tolist()
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * gaussian_velocity(x, t)
    assert evaluations == 5
    # diffusers' Euler scheduler keeps its sigmas and state update in float32.
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- whole runs on Gaussian data
@pytest.mark.parametrize(
    ("sampler", "steps", "tol"),
    [("euler", 200, 0.015), ("heun", 40, 0.015), ("sde", 250, 0.015)],
)
def test_samplers_reproduce_the_gaussian_target(sampler, steps, tol):
    """Mean and std of 20k samples match N(MU, S^2): Monte-Carlo errors S / sqrt(n) = 0.0035 (mean) and
    S / sqrt(2n) = 0.0025 (std), so ``tol`` is about 4 standard errors; discretisation adds < 0.005 here."""
    n = 20_000
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    samples, _ = run(scheduler_for_sampler(sampler), gaussian_velocity, noise, steps, generator=generator)
    assert abs(samples.mean().item() - MU) < tol
    assert abs(samples.std().item() - S) < tol


def test_sde_without_noise_would_be_wrong():
    """Sanity check of the test itself: a drift-only SDE run (no Brownian term) misses the target std."""
    n = 20_000
    scheduler = FlowMatchEulerMaruyamaScheduler()
    x = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler.set_timesteps(250)
    for i in range(250):
        t, t_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        v = gaussian_velocity(x, t)
        x = x + (v + ((1 - t) * v + x)) * (t_next - t)
    assert abs(x.std().item() - S) > 0.1


# ------------------------------------------------------------------------------- the cosine path (issue 13 item 8)
def cosine_gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """Exact E[v | x_t] for x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps, v = d/dt x_t, with x0 ~ N(MU, S^2)."""
    a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    da, ds = -math.pi / 2 * s, math.pi / 2 * a
    var_t = a**2 * S**2 + s**2
    centred = x - a * MU
    return da * (MU + a * S**2 / var_t * centred) + ds * (s / var_t * centred)


def test_sde_step_cosine_path_score():
    """On the cosine path alpha / alpha' = -(2 / pi) cot(pi t / 2) and sigma^2 + cos^2 = 1, so the original's score
    (r v - x) / (sigma^2 - r sigma' sigma) is -(2 / pi) cot(pi t / 2) v - x."""
    scheduler = FlowMatchEulerMaruyamaScheduler(path_type="cosine")
    scheduler.set_timesteps(5)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    v = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    t, t_next = 1.0 - 0.96 / 4 * 3, 0.04  # fourth step of linspace(1, 0.04, 5)
    scheduler.set_begin_index(3)
    out = scheduler.step(v, scheduler.timesteps[3], x, generator=torch.Generator().manual_seed(3)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    score = -(2 / math.pi) / math.tan(math.pi * t / 2) * v - x
    w, dt = 2 * t, t_next - t
    expected = x + (v - 0.5 * w * score) * dt + math.sqrt(w) * math.sqrt(abs(dt)) * noise
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_sde_cosine_path_reproduces_the_gaussian_target_and_is_stored_in_the_config(tmp_path):
    n = 20_000
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    scheduler = FlowMatchEulerMaruyamaScheduler(path_type="cosine")
    samples, _ = run(scheduler, cosine_gaussian_velocity, noise.clone(), 250, generator=generator)
    assert abs(samples.mean().item() - MU) < 0.015 and abs(samples.std().item() - S) < 0.015
    # the linear path's score on a cosine-trained field samples something else
    wrong, _ = run(FlowMatchEulerMaruyamaScheduler(), cosine_gaussian_velocity, noise.clone(), 250, generator)
    assert abs(wrong.mean().item() - MU) > 0.05 or abs(wrong.std().item() - S) > 0.05
    scheduler.save_pretrained(tmp_path)
    assert FlowMatchEulerMaruyamaScheduler.from_pretrained(tmp_path).config.path_type == "cosine"
    assert scheduler_for_sampler("sde", scheduler.config).config.path_type == "cosine"
    with pytest.raises(ValueError, match="path_type"):
        FlowMatchEulerMaruyamaScheduler(path_type="vp")

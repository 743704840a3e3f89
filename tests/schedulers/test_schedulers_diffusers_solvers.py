"""Any diffusers flow-matching scheduler drives sampling; this package's schedulers take `sigmas=` / `timesteps=`.

The field is the exact velocity of Gaussian data x0 ~ N(MU, S^2) on the path x_t = (1 - t) x0 + t eps. Its ODE
maps the noise z to x_t = (1 - t) MU + sqrt((1 - t)^2 S^2 + t^2) z, so the exact sample of a deterministic solver
started at z is MU + S z: every solver is checked per sample against that closed form.
"""

import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusers_repae import FlowMatchEulerMaruyamaScheduler, FlowMatchHeunScheduler, RepaEPipeline
from diffusers_repae.models.transformer_sit import SiTTransformer2DModel, SiTTransformer2DModelOutput
from diffusers_repae.schedulers import scheduler_for_sampler, set_repae_timesteps

MU, S = 1.5, 0.5
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    var_t = (1 - t) ** 2 * S**2 + t**2
    centred = x - (1 - t) * MU
    return t / var_t * centred - (MU + (1 - t) * S**2 / var_t * centred)


def sample(scheduler, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """A pipeline-style loop: model time = scheduler.sigmas[i]."""
    set_repae_timesteps(scheduler, steps)
    scheduler.set_begin_index(0)
    x = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(gaussian_velocity(x, float(scheduler.sigmas[i])), timestep, x).prev_sample
    return x


def noise(n: int = 1000) -> torch.Tensor:
    return torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ------------------------------------------------------------------------------------- diffusers' own solvers
@pytest.mark.parametrize(
    "scheduler",
    [
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **FLOW),
        UniPCMultistepScheduler(**FLOW),
    ],
    ids=["dpmsolver++", "unipc"],
)
@pytest.mark.parametrize("steps", [10, 25])
def test_multistep_flow_solvers_reach_the_exact_sample_in_few_steps(scheduler, steps):
    z = noise()
    out = sample(scheduler, z, steps)
    assert len(scheduler.timesteps) == steps and float(scheduler.sigmas[-1]) == 0.0
    assert (out - (MU + S * z)).abs().max() < 0.03
    # Euler with as many steps is an order of magnitude off: the multistep solvers earn their place.
    euler = sample(scheduler_for_sampler("euler"), z, steps)
    assert (euler - (MU + S * z)).abs().max() > 5 * (out - (MU + S * z)).abs().max()


def test_flow_match_euler_converges_to_the_exact_sample():
    z = noise()
    errors = [(sample(FlowMatchEulerDiscreteScheduler(), z, n) - (MU + S * z)).abs().max().item() for n in (25, 100)]
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3  # first order: 4x the steps, about 4x smaller error


def test_unipc_takes_the_repae_grid_as_sigmas():
    scheduler = UniPCMultistepScheduler(**FLOW)
    set_repae_timesteps(scheduler, 8)
    grid = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    # UniPC moves a first sigma of exactly 1 down by 1e-6 (its log(alpha) would be -inf); the rest is the grid.
    torch.testing.assert_close(scheduler.sigmas.double(), torch.cat([grid[:1] - 1e-6, grid[1:]]), atol=1e-6, rtol=0)


def test_dpm_solver_walks_its_own_flow_grid():
    """DPM-Solver++'s set_timesteps has no sigmas argument: it gets the step count and keeps its own grid."""
    scheduler = scheduler_for_sampler("dpmsolver++")
    set_repae_timesteps(scheduler, 8)
    expected = torch.linspace(0.0, 1 - 1 / 1000, 9, dtype=torch.float64).flip(0)  # 1 - linspace(1, 1/1000, N + 1)
    torch.testing.assert_close(scheduler.sigmas.double(), expected, atol=1e-6, rtol=0)


def test_scheduler_for_sampler_multistep_settings():
    dpm = scheduler_for_sampler("dpmsolver++", FlowMatchEulerMaruyamaScheduler().config)
    unipc = scheduler_for_sampler("unipc", {"flow_shift": 3.0})
    for scheduler in (dpm, unipc):
        assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
        assert scheduler.config.flow_shift == 1.0 and scheduler.config.solver_order == 2
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    assert isinstance(unipc, UniPCMultistepScheduler)


@pytest.mark.parametrize("sampler", ["dpmsolver++", "unipc"])
def test_multistep_solvers_refuse_a_cosine_path_model(sampler):
    with pytest.raises(ValueError, match="linear path"):
        scheduler_for_sampler(sampler, {"path_type": "cosine"})
    assert scheduler_for_sampler(sampler, {"path_type": "linear"}).config.use_flow_sigmas


@pytest.mark.parametrize(
    "scheduler",
    [DDIMScheduler(), DPMSolverMultistepScheduler(), UniPCMultistepScheduler(use_flow_sigmas=True)],
    ids=["ddim", "dpm-epsilon", "unipc-epsilon"],
)
def test_non_flow_schedulers_are_refused(scheduler):
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        set_repae_timesteps(scheduler, 4)


def test_dynamic_shifting_is_refused():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        set_repae_timesteps(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4)


# ------------------------------------------------------------------------------- sigmas= on our schedulers
@pytest.mark.parametrize("steps", [1, 3, 250])
def test_our_schedulers_given_their_own_grid_as_sigmas_are_unchanged(steps):
    sde, sde_given, sde_ts = (FlowMatchEulerMaruyamaScheduler() for _ in range(3))
    sde.set_timesteps(steps)
    sde_given.set_timesteps(sigmas=torch.linspace(1.0, 0.04, steps, dtype=torch.float64).numpy())
    sde_ts.set_timesteps(timesteps=(torch.linspace(1.0, 0.04, steps, dtype=torch.float64) * 1000).tolist())
    assert torch.equal(sde_given.sigmas, sde.sigmas) and torch.equal(sde_given.timesteps, sde.timesteps)
    torch.testing.assert_close(sde_ts.sigmas, sde.sigmas, atol=1e-15, rtol=0)
    assert sde_given.num_inference_steps == steps

    heun, heun_given = FlowMatchHeunScheduler(), FlowMatchHeunScheduler()
    heun.set_timesteps(steps)
    heun_given.set_timesteps(sigmas=list(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()))
    assert torch.equal(heun_given.sigmas, heun.sigmas) and torch.equal(heun_given.timesteps, heun.timesteps)


def test_sde_on_a_custom_grid_is_the_spec_step():
    scheduler = FlowMatchEulerMaruyamaScheduler()
    scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.1])
    assert scheduler.sigmas.tolist() == [0.9, 0.5, 0.1, 0.0] and scheduler.timesteps.tolist() == pytest.approx(
        [900.0, 500.0, 100.0]
    )
    x, v = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    scheduler.set_begin_index(0)
    out = scheduler.step(v, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(3)).prev_sample
    t, dt = 0.9, 0.5 - 0.9
    w, score = 2 * t, -((1 - t) * v + x) / t
    drift = v - 0.5 * w * score
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(out, x + drift * dt + math.sqrt(w) * math.sqrt(-dt) * n, atol=1e-12, rtol=0)


def test_heun_on_a_custom_grid_matches_a_handwritten_loop():
    grid = [1.0, 0.6, 0.3, 0.0]
    scheduler = FlowMatchHeunScheduler()
    scheduler.set_timesteps(sigmas=grid[:-1])
    scheduler.set_begin_index(0)
    z = noise(64)
    x = z.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(gaussian_velocity(x, float(scheduler.sigmas[i])), timestep, x).prev_sample
    expected = z.clone()
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = gaussian_velocity(expected, t)
        predictor = expected + (t_next - t) * v
        if i < len(grid) - 2:
            predictor = expected + (t_next - t) * 0.5 * (v + gaussian_velocity(predictor, t_next))
        expected = predictor
    assert len(scheduler.timesteps) == 5
    torch.testing.assert_close(x, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigmas": [0.5], "timesteps": [500.0]}, "not both"),
        ({"sigmas": [0.5, 0.8]}, "strictly decreasing"),
        ({"sigmas": [1.2, 0.5]}, "strictly decreasing"),
        ({"sigmas": [1.0, 0.0]}, "strictly decreasing"),
        ({"timesteps": [2000.0]}, "num_train_timesteps"),
        ({"num_inference_steps": 3, "sigmas": [1.0, 0.5]}, "same length"),
        ({"sigmas": []}, "non-empty"),
    ],
)
@pytest.mark.parametrize("cls", [FlowMatchEulerMaruyamaScheduler, FlowMatchHeunScheduler])
def test_bad_custom_grids_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls().set_timesteps(**kwargs)


# ------------------------------------------------------------------------------------------- in the pipeline
class ExactVelocitySiT(SiTTransformer2DModel):
    """A SiT config whose forward is the exact Gaussian velocity: the pipeline is then checked in closed form."""

    def forward(self, hidden_states, timestep, class_labels, return_dict=True, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1, 1, 1, 1)
        var_t = (1 - t) ** 2 * S**2 + t**2
        centred = hidden_states.double() - (1 - t) * MU
        velocity = t / var_t * centred - (MU + (1 - t) * S**2 / var_t * centred)
        return SiTTransformer2DModelOutput(sample=velocity.to(hidden_states.dtype))


@pytest.fixture(scope="module")
def pipe() -> RepaEPipeline:
    sit = ExactVelocitySiT(
        sample_size=4, patch_size=2, hidden_size=32, num_layers=1, num_attention_heads=2, num_classes=3
    )
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    pipeline = RepaEPipeline(sit, vae, FlowMatchEulerMaruyamaScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize(
    ("sampler", "steps", "tol"), [("dpmsolver++", 12, 0.03), ("unipc", 12, 0.03), ("euler", 200, 0.02)]
)
def test_pipeline_samples_with_diffusers_solvers(pipe, sampler, steps, tol):
    z = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    out = pipe(class_labels=[0] * 8, num_inference_steps=steps, sampler=sampler, latents=z, output_type="latent")
    assert (out.images - (MU + S * z)).abs().max() < tol

    # The same scheduler set on the pipeline, the diffusers way, gives the same latents.
    pipe.scheduler = scheduler_for_sampler(sampler, pipe.scheduler.config)
    try:
        again = pipe(class_labels=[0] * 8, num_inference_steps=steps, latents=z, output_type="latent").images
    finally:
        pipe.scheduler = FlowMatchEulerMaruyamaScheduler()
    torch.testing.assert_close(again, out.images, atol=0, rtol=0)


def test_pipeline_refuses_a_non_flow_scheduler(pipe):
    pipe.scheduler = DDIMScheduler()
    try:
        with pytest.raises(ValueError, match="not a flow-matching scheduler"):
            pipe(class_labels=0, num_inference_steps=2, output_type="latent")
    finally:
        pipe.scheduler = FlowMatchEulerMaruyamaScheduler()


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde", "dpmsolver++", "unipc"])
def test_switching_sampler_from_another_schedulers_config_is_quiet(sampler, monkeypatch):
    """`sampler=` builds from the pipeline's scheduler config; keys the new class does not take are dropped, so
    diffusers' "config attributes ... will be ignored" warning never fires."""
    import diffusers.configuration_utils as configuration_utils

    warnings = []
    monkeypatch.setattr(configuration_utils.logger, "warning", lambda message, *a, **k: warnings.append(message))
    sde_config = FlowMatchEulerMaruyamaScheduler(t_last=0.04).config
    scheduler = scheduler_for_sampler(sampler, sde_config)
    assert not [w for w in warnings if "will be ignored" in w]
    assert scheduler.config.num_train_timesteps == 1000

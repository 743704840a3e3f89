"""RepaEPipeline against an independent float64 sampler written here from SPEC section 8, plus I/O and errors."""

import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from diffusers_repae import (
    FlowMatchEulerMaruyamaScheduler,
    FlowMatchHeunScheduler,
    RepaEPipeline,
    SiTTransformer2DModel,
    list_recipes,
    resolve_recipe,
)

NUM_CLASSES = 10
LATENTS_MEAN = [0.3, -0.2, 0.1, 0.05]
LATENTS_STD = [1.5, 0.7, 2.0, 1.1]


def tiny_sit(num_classes: int = NUM_CLASSES, in_channels: int = 4) -> SiTTransformer2DModel:
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=in_channels,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_classes=num_classes,
    )
    with torch.no_grad():  # adaLN-Zero makes a fresh SiT output exactly 0: perturb everything
        for param in sit.parameters():
            param.normal_(std=0.02)
    return sit.eval()


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        scaling_factor=1.0,  # REPA-E's convention: the statistics carry the scale
        latents_mean=LATENTS_MEAN[:latent_channels] if latent_channels == 4 else None,
        latents_std=LATENTS_STD[:latent_channels] if latent_channels == 4 else None,
    ).eval()


@pytest.fixture(scope="module")
def pipe() -> RepaEPipeline:
    pipeline = RepaEPipeline(
        tiny_sit(),
        tiny_vae(),
        FlowMatchEulerMaruyamaScheduler(),
        id2label={i: f"class{i}, synonym {i}" for i in range(NUM_CLASSES)},
        default_num_inference_steps=3,
        default_guidance_scale=1.5,
        default_guidance_interval=[0.0, 0.7],
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ the reference (SPEC 8, float64)
def reference_sample(sit, noise, labels, sampler, steps, cfg=1.0, low=0.0, high=1.0, generator=None):
    """Euler / Heun / Euler-Maruyama exactly as SPEC section 8 states them, state in float64."""
    null = torch.full_like(labels, sit.config.num_classes)

    def velocity(x, t, t_cur):
        # the original decides guidance by the step's start time t_cur, also for Heun's evaluation at t_next
        guided = cfg > 1.0 and low <= t_cur <= high
        x_in = torch.cat([x, x]) if guided else x
        y_in = torch.cat([labels, null]) if guided else labels
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64).float()
        v = sit(x_in.float(), t_in, y_in).sample.double()
        if guided:
            v_c, v_u = v.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        return v

    x = noise.double()
    with torch.no_grad():
        if sampler in ("euler", "heun"):
            grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
            for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
                v = velocity(x, t, t)
                x_next = x + (t_next - t) * v
                if sampler == "heun" and i < steps - 1:
                    x_next = x + (t_next - t) * (0.5 * v + 0.5 * velocity(x_next, t_next, t))
                x = x_next
            return x
        grid = torch.linspace(1, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
        for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            dt = t_next - t
            v = velocity(x, t, t)
            w = 2 * t
            s = -((1 - t) * v + x) / t
            d = v - 0.5 * w * s
            if i < steps - 1:
                n = torch.randn(x.shape, generator=generator, dtype=torch.float64)
                x = x + d * dt + math.sqrt(w) * math.sqrt(abs(dt)) * n
            else:
                x = x + d * dt
        return x


def noise_for(pipe, batch, seed):
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.sample_size, config.sample_size)
    return torch.randn(shape, generator=generator, dtype=torch.float32), generator


# ---------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize(
    ("cfg", "interval", "dtype"),
    [
        (1.0, (0.0, 1.0), torch.float32),
        (3.0, (0.0, 1.0), torch.float32),
        (3.0, (0.3, 0.72), torch.float32),
        (3.0, (0.3, 0.72), torch.float64),
    ],
)
def test_ode_matches_reference(pipe, sampler, cfg, interval, dtype):
    labels = torch.tensor([1, 7])
    noise, _ = noise_for(pipe, 2, seed=3)
    expected = reference_sample(pipe.transformer, noise, labels, sampler, 5, cfg, *interval)
    out = pipe(
        [1, 7],
        num_inference_steps=5,
        guidance_scale=cfg,
        guidance_interval=interval,
        latents=noise,
        sampler=sampler,
        sampling_dtype=dtype,
        output_type="latent",
    ).images
    assert out.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 or sampler == "euler" else 1e-10
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    # the check is not vacuous: the velocity moves the state far from the noise
    assert (out.double() - noise.double()).abs().max() > 0.1


@pytest.mark.parametrize(("cfg", "interval"), [(1.0, (0.0, 1.0)), (2.5, (0.0, 0.65))])
def test_sde_matches_reference_with_the_same_generator(pipe, cfg, interval):
    labels = torch.tensor([4, 0, 9])
    noise, reference_generator = noise_for(pipe, 3, seed=11)
    expected = reference_sample(
        pipe.transformer, noise, labels, "sde", 6, cfg, *interval, generator=reference_generator
    )
    out = pipe(
        [4, 0, 9],
        num_inference_steps=6,
        guidance_scale=cfg,
        guidance_interval=interval,
        generator=torch.Generator().manual_seed(11),  # draws the same initial noise, then the same increments
        sampler="sde",
        sampling_dtype=torch.float64,
        output_type="latent",
    ).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    other = pipe([4, 0, 9], num_inference_steps=6, latents=noise, sampling_dtype=torch.float64, output_type="latent")
    assert (other.images - expected).abs().max() > 1e-3  # different Brownian noise -> a different sample


def test_guidance_interval_skips_the_unconditional_pass(pipe):
    batches, times = [], []

    def record(module, args):
        batches.append(args[0].shape[0])
        times.append(float(args[1][0]))

    hook = pipe.transformer.register_forward_pre_hook(record)
    try:
        pipe([2, 3], num_inference_steps=10, guidance_scale=2.0, guidance_interval=(0.25, 0.6), sampler="sde")
    finally:
        hook.remove()
    grid = torch.linspace(1, 0.04, 10, dtype=torch.float64).tolist()
    assert times == pytest.approx(grid, abs=1e-7)
    assert batches == [4 if 0.25 <= t <= 0.6 else 2 for t in grid]
    assert 4 in batches and 2 in batches


def test_heun_corrector_is_guided_by_the_step_start(pipe):
    """Original rule (issue 13 item 1): both evaluations of a Heun step are guided iff low <= t_cur <= high."""
    batches, times = [], []

    def record(module, args):
        batches.append(args[0].shape[0])
        times.append(float(args[1][0]))

    hook = pipe.transformer.register_forward_pre_hook(record)
    try:
        pipe([2, 3], num_inference_steps=5, guidance_scale=2.0, guidance_interval=(0.3, 0.7), sampler="heun")
    finally:
        hook.remove()
    grid = torch.linspace(1, 0, 6, dtype=torch.float64).tolist()
    expected_times, expected_batches = [], []
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        guided = 0.3 <= t_cur <= 0.7
        expected_times.append(t_cur)
        expected_batches.append(4 if guided else 2)
        if i < 4:
            expected_times.append(t_next)
            expected_batches.append(4 if guided else 2)
    assert times == pytest.approx(expected_times, abs=1e-7)
    assert batches == expected_batches
    # the edges matter: the corrector at t = 0.6 (step from 0.8) is unguided, the one at t = 0.2 (from 0.4) guided
    assert batches[2] == 2 and batches[6] == 4


def test_time_and_state_stay_float32_with_bf16_weights():
    """Item 7: t reaches the model as float32 whatever the weights' dtype; 250 grid times stay 250 distinct times."""
    bf16 = RepaEPipeline(tiny_sit(), tiny_vae(), FlowMatchEulerMaruyamaScheduler())
    bf16.transformer.to(torch.bfloat16)
    bf16.set_progress_bar_config(disable=True)
    times = []
    hook = bf16.transformer.register_forward_pre_hook(lambda module, args: times.append(args[1]))
    try:
        latents = bf16([1], num_inference_steps=250, guidance_scale=1.0, output_type="latent").images
    finally:
        hook.remove()
    grid = torch.linspace(1, 0.04, 250, dtype=torch.float64)
    assert all(t.dtype == torch.float32 for t in times)
    seen = torch.stack([t[0] for t in times])
    torch.testing.assert_close(seen, grid.float(), rtol=0, atol=0)
    assert len(set(seen.tolist())) == 250
    assert len(set(grid.to(torch.bfloat16).tolist())) < 250  # what casting t to the weights' dtype would do
    assert latents.dtype == torch.float32


def test_swapping_schedulers_the_diffusers_way_equals_the_sampler_argument(pipe):
    noise, _ = noise_for(pipe, 2, seed=5)
    kwargs = dict(num_inference_steps=4, latents=noise, output_type="latent", guidance_scale=1.0)
    by_name = pipe([0, 1], sampler="heun", **kwargs).images
    original = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchHeunScheduler.from_config(pipe.scheduler.config)
        swapped = pipe([0, 1], **kwargs).images
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config)
        euler = pipe([0, 1], **kwargs).images
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(swapped, by_name, rtol=0, atol=0)
    torch.testing.assert_close(euler, pipe([0, 1], sampler="euler", **kwargs).images, rtol=0, atol=0)
    assert isinstance(pipe.scheduler, FlowMatchEulerMaruyamaScheduler)  # `sampler=` did not replace it


def test_generator_list_gives_per_image_reproducibility(pipe):
    kwargs = dict(num_inference_steps=3, output_type="latent", sampling_dtype=torch.float64, guidance_scale=1.0)
    both = pipe([1, 2], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kwargs).images
    second = pipe([2], generator=[torch.Generator().manual_seed(6)], **kwargs).images
    # the model runs in float32, where a batch of 2 and a batch of 1 may round differently
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-6)


def test_defaults_come_from_the_config(pipe):
    noise, _ = noise_for(pipe, 1, seed=2)
    implicit = pipe([3], latents=noise, sampler="euler", output_type="latent").images
    explicit = pipe(
        [3],
        latents=noise,
        sampler="euler",
        output_type="latent",
        num_inference_steps=3,
        guidance_scale=1.5,
        guidance_interval=(0.0, 0.7),
    ).images
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- decoding
def test_decoding_follows_the_vae_statistics_and_truncates(pipe):
    noise, _ = noise_for(pipe, 2, seed=8)
    kwargs = dict(num_inference_steps=2, latents=noise, sampler="euler", guidance_scale=1.0)
    latents = pipe([0, 5], output_type="latent", **kwargs).images
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1)
    with torch.no_grad():
        decoded = pipe.vae.decode(latents.float() * std + mean).sample
    expected = ((decoded + 1) / 2).clamp(0, 1)

    pt = pipe([0, 5], output_type="pt", **kwargs).images
    torch.testing.assert_close(pt, expected, rtol=0, atol=1e-6)
    np_images = pipe([0, 5], output_type="np", **kwargs).images
    np.testing.assert_allclose(np_images, expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe([0, 5], output_type="pil", **kwargs).images
    truncated = np.floor(255 * expected.permute(0, 2, 3, 1).double().numpy()).astype(np.uint8)
    stacked = np.stack([np.asarray(image) for image in pil])
    assert stacked.dtype == np.uint8 and stacked.shape == (2, 16, 16, 3)
    # float32 vs float64 multiplication may flip a value that lies within 1 ulp of an integer
    assert (stacked.astype(int) - truncated.astype(int)).max() <= 1
    assert (stacked == truncated).mean() > 0.999
    tuple_out = pipe([0, 5], output_type="pt", return_dict=False, **kwargs)
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], pt)


def test_any_autoencoderkl_decodes_with_its_scaling_factor():
    """A VAE without latents_mean/std falls back to diffusers' classic ``z = x / scaling_factor``."""
    vae = tiny_vae()
    vae.register_to_config(latents_mean=None, latents_std=None, scaling_factor=0.18215)
    pipeline = RepaEPipeline(tiny_sit(), vae, FlowMatchEulerMaruyamaScheduler())
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = ((vae.decode(latents / 0.18215).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(pipeline.decode_latents(latents), expected, rtol=0, atol=1e-6)


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(pipeline, i, timestep, kwargs):
        seen.append((i, kwargs["latents"].clone()))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = pipe([1], num_inference_steps=3, sampler="euler", callback_on_step_end=callback, output_type="latent")
    assert [i for i, _ in seen] == [0, 1, 2]
    assert torch.count_nonzero(out.images) == 0


# ---------------------------------------------------------------------------------------- class labels
def test_class_labels_by_id_name_synonym_and_single_value(pipe):
    assert pipe.get_label_ids([3, "class4", "SYNONYM 5", " Class6 "]) == [3, 4, 5, 6]
    assert pipe.get_label_ids(7) == [7] and pipe.get_label_ids("class8") == [8]
    noise, _ = noise_for(pipe, 2, seed=1)
    kwargs = dict(num_inference_steps=2, latents=noise, sampler="euler", output_type="latent")
    torch.testing.assert_close(pipe([3, 4], **kwargs).images, pipe(["class3", "Synonym 4"], **kwargs).images)


def test_imagenet_names_are_the_default_for_1000_classes():
    pipeline = RepaEPipeline(tiny_sit(num_classes=1000), tiny_vae(), FlowMatchEulerMaruyamaScheduler())
    assert len(pipeline.id2label) == 1000
    assert pipeline.get_label_ids(["golden retriever", "Tinca tinca", "toilet paper"]) == [207, 0, 999]
    assert pipeline.get_label_ids("tabby cat") == [281]
    with pytest.raises(ValueError, match=r"'crane' is ambiguous.*134.*517"):
        pipeline.get_label_ids("crane")
    assert pipeline.config.id2label is None  # the default is not copied into model_index.json


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(class_labels=["no such class"]), r"class_labels.*'no such class'"),
        (dict(class_labels=[NUM_CLASSES]), rf"class_labels.*{NUM_CLASSES}.*\[0, {NUM_CLASSES - 1}\]"),
        (dict(class_labels=[-1]), r"class_labels.*-1.*\[0, 9\]"),
        (dict(class_labels=[]), r"class_labels"),
        (dict(guidance_interval=(0.0, 1.5)), r"guidance_interval.*1\.5"),
        (dict(guidance_interval=(-0.1, 0.5)), r"guidance_interval.*-0\.1"),
        (dict(guidance_interval=(0.8, 0.2)), r"guidance_interval.*low <= high.*\(0\.8, 0\.2\)"),
        (dict(num_inference_steps=0), r"num_inference_steps.*>= 1.*0"),
        (dict(latents=torch.zeros(2, 4, 4, 4)), r"latents.*\(2, 4, 4, 4\).*\(2, 4, 8, 8\)"),
        (dict(generator=[torch.Generator()] * 3), r"generator.*3.*exactly 2"),
        (dict(output_type="jpeg"), r"output_type.*'jpeg'"),
        (dict(sampler="ddim"), r"sampler.*'ddim'"),
        (dict(sampling_dtype=torch.float16), r"sampling_dtype.*float16"),
    ],
)
def test_bad_input_raises_a_clear_value_error(pipe, kwargs, pattern):
    call = dict(class_labels=[1, 2], num_inference_steps=2, output_type="latent") | kwargs
    with pytest.raises(ValueError, match=pattern):
        pipe(**call)


def test_vae_channel_mismatch_is_rejected():
    pipeline = RepaEPipeline(tiny_sit(), tiny_vae(latent_channels=8), FlowMatchEulerMaruyamaScheduler())
    with pytest.raises(ValueError, match=r"vae: latent_channels 8 .*in_channels 4"):
        pipeline([0], num_inference_steps=1)


# ------------------------------------------------------------------------------------------ save / load
def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["default_guidance_interval"] == [0.0, 0.7] and index["id2label"]["3"] == "class3, synonym 3"
    assert list((tmp_path / "transformer").glob("*.safetensors")) and list((tmp_path / "vae").glob("*.safetensors"))

    loaded = RepaEPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, FlowMatchEulerMaruyamaScheduler)
    assert loaded.config.default_num_inference_steps == 3 and loaded.get_label_ids("synonym 9") == [9]
    assert loaded.vae.config.latents_std == LATENTS_STD
    kwargs = dict(num_inference_steps=3, output_type="latent", sampling_dtype=torch.float64)
    expected = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(
        loaded([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images, expected, rtol=0, atol=0
    )

    # Plain diffusers finds the code saved beside the weights, and asks before running it
    # (tests/pipelines/test_pipeline_remote_code.py loads it without diffusers_repae installed).
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(generic).__name__ == "RepaEPipeline" and type(generic).__module__.startswith("diffusers_modules.")
    generic.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        generic([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images, expected, rtol=0, atol=0
    )


def test_a_swapped_scheduler_survives_save_pretrained(tmp_path):
    pipeline = RepaEPipeline(tiny_sit(), tiny_vae(), FlowMatchHeunScheduler())
    pipeline.save_pretrained(tmp_path)
    assert isinstance(RepaEPipeline.from_pretrained(tmp_path).scheduler, FlowMatchHeunScheduler)


# ------------------------------------------------------------------------------------------ recipes, CLI
@pytest.mark.parametrize("recipe", list_recipes())
def test_recipe_defaults_match_the_model_card(recipe):
    folder = resolve_recipe(recipe)
    index = json.loads((folder / "model_index.json").read_text())
    row = re.search(
        r"\| recommended sampling \| Euler-Maruyama \(SDE\), (\d+) steps, guidance ([\d.]+) in t-interval "
        r"\[([\d.]+), ([\d.]+)\] \|",
        (folder / "README.md").read_text(),
    )
    assert row is not None, f"{recipe}/README.md has no 'recommended sampling' row"
    assert index["default_num_inference_steps"] == int(row[1])
    assert index["default_guidance_scale"] == float(row[2])
    assert index["default_guidance_interval"] == [float(row[3]), float(row[4])]
    assert index["scheduler"] == ["diffusers_repae", "FlowMatchEulerMaruyamaScheduler"]


def test_sample_cli_on_the_tiny_recipe(tmp_path):
    import importlib.util
    from pathlib import Path

    from PIL import Image

    script = Path(__file__).resolve().parents[2] / "training" / "sample.py"
    spec = importlib.util.spec_from_file_location("sample_cli", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "grid.png"
    argv = ["--pretrained", "tiny-cpu", "--class_labels", "0", "1", "2", "--num_inference_steps", "2"]
    module.main([*argv, "--output", str(output)])
    grid = Image.open(output)
    assert grid.size == (2 * 64, 2 * 64)  # 3 images padded to a 2 x 2 grid of 64 px tiles

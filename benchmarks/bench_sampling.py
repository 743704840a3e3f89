"""Sampling speed of RepaEPipeline on the tiny recipe (random weights): per step, per model evaluation and per
image for Euler / Heun / Euler-Maruyama, with and without classifier-free guidance and its interval; and the
sampling optimisations (skip the unconditional half outside the interval, float32 vs float64 state).

    .venv/bin/python benchmarks/bench_sampling.py [--quick] [--steps 10] [--sample_batch_size 4] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

from common import (
    Table,
    add_sampling_args,
    max_abs_diff,
    measure,
    measure_pair,
    randomize_zero_init,
    speedup,
    suite_main,
)
from diffusers_repae.pipelines.pipeline_repae import RepaEPipeline
from diffusers_repae.schedulers.scheduling_flow_match_ode import (
    scheduler_for_sampler,
    set_repae_timesteps,
)

RECIPE = "tiny-cpu"
SAMPLERS = ["euler", "heun", "sde"]
GUIDANCE_SCALE = 4.0
INTERVAL = (0.0, 0.65)  # SD-VAE model card's interval


def build_pipeline(device: torch.device, seed: int = 0) -> RepaEPipeline:
    """The tiny recipe with random (non-zero adaLN) weights; the progress bar is silenced for clean tables."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    pipe = RepaEPipeline.from_recipe(RECIPE)
    randomize_zero_init(pipe.transformer, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class EvaluationCounter:
    """Counts transformer calls and the rows they process (2 rows per image when guided)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.rows = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.calls += 1
        self.rows += inputs[0].shape[0]

    def reset(self) -> None:
        self.calls = self.rows = 0


def labels_for(batch: int, num_classes: int) -> list[int]:
    return [i % num_classes for i in range(batch)]


def sampling_table(args, device: torch.device, pipe: RepaEPipeline, counter: EvaluationCounter) -> Table:
    batch, steps = (1, 2) if args.quick else (args.sample_batch_size, args.steps)
    labels = labels_for(batch, pipe.transformer.config.num_classes)
    table = Table(
        f"Sampling ({RECIPE}, batch {batch}, {steps} steps, output latents, {device.type}, fp32)",
        ["sampler", "guidance", "NFE", "rows_per_img", "ms_total", "ms_per_step", "ms_per_NFE", "ms_per_img"],
    )
    settings = [
        ("none (cfg 1)", 1.0, (0.0, 1.0)),
        (f"cfg {GUIDANCE_SCALE:g}, always", GUIDANCE_SCALE, (0.0, 1.0)),
        (f"cfg {GUIDANCE_SCALE:g}, interval [{INTERVAL[0]:g}, {INTERVAL[1]:g}]", GUIDANCE_SCALE, INTERVAL),
    ]
    pipe(labels, num_inference_steps=2, output_type="latent")  # warm-up
    for sampler in SAMPLERS:
        for name, scale, interval in settings:

            def call(sampler=sampler, scale=scale, interval=interval):
                generator = torch.Generator(device).manual_seed(args.seed)
                return pipe(
                    labels,
                    num_inference_steps=steps,
                    guidance_scale=scale,
                    guidance_interval=interval,
                    sampler=sampler,
                    generator=generator,
                    output_type="latent",
                ).images

            counter.reset()
            timing = measure(call, device, repeats=args.repeats, warmup=0)
            nfe, rows = counter.calls // len(timing.times), counter.rows // len(timing.times)
            table.add(
                sampler=sampler,
                guidance=name,
                NFE=nfe,
                rows_per_img=rows / batch,
                ms_total=timing.median * 1e3,
                ms_per_step=timing.median * 1e3 / steps,
                ms_per_NFE=timing.median * 1e3 / nfe,
                ms_per_img=timing.median * 1e3 / batch,
            )
    latents = call()
    decode = measure(lambda: pipe.decode_latents(latents), device, repeats=args.repeats, warmup=args.warmup)
    ms = decode.median * 1e3
    table.add(sampler="(VAE decode)", guidance="-", NFE=0, ms_total=ms, ms_per_img=ms / batch)
    table.notes.append("NFE: transformer calls; rows_per_img: transformer batch rows per image (guided calls double).")
    table.notes.append("Heun: 2N - 1 evaluations for N steps; the interval skips the unconditional half for t > 0.65.")
    return table


@torch.no_grad()
def sample_latents(
    pipe: RepaEPipeline,
    labels: list[int],
    steps: int,
    sampler: str,
    scale: float,
    interval: tuple[float, float],
    always_double: bool,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """RepaEPipeline's denoising loop; ``always_double`` runs the unconditional half at every step ("before")
    and applies guidance only inside the interval, so both variants compute the same latents."""
    device = pipe.transformer.device
    model = pipe.transformer
    y = torch.tensor(labels, device=device)
    y_null = torch.full_like(y, model.config.num_classes)
    latents = pipe.prepare_latents(len(labels), dtype, device, generator)
    scheduler = scheduler_for_sampler(sampler, pipe.scheduler.config)
    set_repae_timesteps(scheduler, steps, device=device)
    scheduler.set_begin_index(0)
    low, high = interval
    for i, timestep in enumerate(scheduler.timesteps):
        t = pipe._time_of(scheduler, i, timestep)
        guided = scale > 1.0 and low <= t <= high
        double = guided or (always_double and scale > 1.0)
        x = torch.cat([latents, latents]) if double else latents
        labels_in = torch.cat([y, y_null]) if double else y
        v = model(x.float(), torch.full((x.shape[0],), t, device=device), labels_in).sample.to(dtype)
        if double:
            cond, uncond = v.chunk(2)
            v = uncond + scale * (cond - uncond) if guided else cond
        latents = scheduler.step(v, timestep, latents, generator=generator).prev_sample
    return latents


def optimisation_table(args, device: torch.device, pipe: RepaEPipeline) -> Table:
    batch, steps = (1, 2) if args.quick else (args.sample_batch_size, args.steps)
    labels = labels_for(batch, pipe.transformer.config.num_classes)
    table = Table(
        f"Sampling optimisations ({RECIPE}, batch {batch}, {steps} steps, cfg {GUIDANCE_SCALE:g}, {device.type})",
        ["optimisation", "sampler", "before", "after", "before_ms", "after_ms", "speedup", "max_abs_diff"],
    )

    def loop(sampler: str, always_double: bool):
        def fn():
            generator = torch.Generator(device).manual_seed(args.seed)
            return sample_latents(pipe, labels, steps, sampler, GUIDANCE_SCALE, INTERVAL, always_double, generator)

        return fn

    for sampler in ("sde", "heun"):
        before, after = measure_pair(loop(sampler, True), loop(sampler, False), device, args.repeats, warmup=0)
        table.add(
            optimisation=f"guidance interval [{INTERVAL[0]:g}, {INTERVAL[1]:g}]",
            sampler=sampler,
            before="always doubled batch",
            after="uncond half skipped",
            before_ms=before.median * 1e3,
            after_ms=after.median * 1e3,
            speedup=speedup(before, after),
            max_abs_diff=max_abs_diff(loop(sampler, True)(), loop(sampler, False)()),
        )
    pipeline_out = pipe(
        labels,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        guidance_interval=INTERVAL,
        sampler="heun",
        generator=torch.Generator(device).manual_seed(args.seed),
        output_type="latent",
    ).images
    table.notes.append(
        f"the benchmark's loop reproduces RepaEPipeline: max |loop - pipeline| = "
        f"{max_abs_diff(loop('heun', False)(), pipeline_out):.2e} (heun)."
    )

    for sampler in ("heun", "sde"):

        def call(dtype: torch.dtype, sampler=sampler):
            def fn():
                return pipe(
                    labels,
                    num_inference_steps=steps,
                    guidance_scale=GUIDANCE_SCALE,
                    guidance_interval=INTERVAL,
                    sampler=sampler,
                    sampling_dtype=dtype,
                    generator=torch.Generator(device).manual_seed(args.seed),
                    output_type="latent",
                ).images

            return fn

        before, after = measure_pair(call(torch.float64), call(torch.float32), device, args.repeats, warmup=0)
        diff = max_abs_diff(call(torch.float64)(), call(torch.float32)()) if sampler == "heun" else None
        table.add(
            optimisation="sampling state dtype",
            sampler=sampler,
            before="float64 (original)",
            after="float32",
            before_ms=before.median * 1e3,
            after_ms=after.median * 1e3,
            speedup=speedup(before, after),
            max_abs_diff=diff,
        )
    table.notes.append(
        "float32 vs float64: max |final latents| difference on the deterministic Heun ODE; the SDE draws its "
        "Brownian noise in the state dtype, so its two runs use different noise and are timed only."
    )
    return table


def run(args: argparse.Namespace, device: torch.device) -> list[Table]:
    pipe = build_pipeline(device, args.seed)
    counter = EvaluationCounter(pipe.transformer)
    return [sampling_table(args, device, pipe, counter), optimisation_table(args, device, pipe)]


if __name__ == "__main__":
    suite_main(__doc__, add_sampling_args, run)

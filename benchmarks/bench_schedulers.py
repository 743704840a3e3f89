"""Sample quality against sampling steps: FD-EfficientNetLite0 of a trained pipeline's samples for Euler, Heun,
Euler-Maruyama (REPA-E's SDE) and DPM-Solver++ (diffusers' multistep solver with flow sigmas) at 8, 16, 32 and
64 steps.

Every row draws sample ``i`` from the same seed and label (``evaluation.sampling``), so rows differ by the sampler
only. FD-EfficientNetLite0 is the Frechet distance of EfficientNet-Lite0 pooled features (an offline stand-in for
FID: compare rows with each other, never with published FIDs). With ``--num_samples`` well below the feature
width (1280) the absolute values carry a large small-sample bias; the ranking is what the table is for.

    .venv/bin/python benchmarks/bench_schedulers.py --pipeline PIPELINE_DIR --reference REFERENCE.npz \\
        [--num_samples 1000] [--steps_list 8 16 32 64] [--samplers euler heun sde dpmsolver++] [--json out.json]
    .venv/bin/python benchmarks/bench_schedulers.py --quick   # smoke run: tiny random pipeline, random reference

``--reference``: real images of the training distribution as an ``.npz`` (e.g. from training/dataset_to_npz.py),
an image folder, or a features file from ``evaluate.py --save_reference_features`` (EfficientNet-Lite0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import Table, randomize_zero_init, suite_main
from diffusers_repae.evaluation.features import EfficientNetLite0FeatureExtractor, extract_features
from diffusers_repae.evaluation.generation import features_of, metric_names
from diffusers_repae.evaluation.metrics import frechet_distance_from_features
from diffusers_repae.evaluation.sampling import generate_batch, sample_labels
from diffusers_repae.pipelines.pipeline_repae import RepaEPipeline
from diffusers_repae.schedulers import SAMPLERS

DEFAULT_SAMPLERS = ["euler", "heun", "sde", "dpmsolver++"]
DEFAULT_STEPS = [8, 16, 32, 64]
QUICK = {"num_samples": 4, "steps_list": [3], "batch_size": 4}  # sqrtm of 1280x1280 costs seconds


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("bench_schedulers")
    group.add_argument("--pipeline", default=None, help="A trained RepaEPipeline folder (save_pretrained layout).")
    group.add_argument(
        "--reference", default=None, help="Reference images: .npz, image folder, or EfficientNet-Lite0 features file."
    )
    group.add_argument("--num_samples", type=int, default=1000, help="Samples per (sampler, steps) row.")
    group.add_argument("--batch_size", type=int, default=50, help="Images per pipeline call / feature batch.")
    group.add_argument(
        "--samplers", nargs="+", default=DEFAULT_SAMPLERS, choices=sorted(SAMPLERS), help="Samplers to compare."
    )
    group.add_argument("--steps_list", nargs="+", type=int, default=DEFAULT_STEPS, help="Sampler steps per row.")
    group.add_argument(
        "--guidance_scale", type=float, default=None, help="CFG scale (default: the pipeline's model-card value)."
    )
    group.add_argument(
        "--guidance_interval", nargs=2, type=float, default=None, help="CFG interval (default: the pipeline's)."
    )
    return parser


def load_pipeline(args: argparse.Namespace, device: torch.device) -> RepaEPipeline:
    if args.quick:
        pipe = RepaEPipeline.from_recipe("tiny-cpu")
        randomize_zero_init(pipe.transformer, seed=args.seed)
    elif args.pipeline is None:
        raise ValueError("--pipeline is required (a trained pipeline folder); --quick runs a random tiny one.")
    else:
        pipe = RepaEPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def reference_features(args, extractor, device: torch.device) -> dict[str, np.ndarray]:
    if args.reference is not None:
        return features_of(extractor, args.reference, args.batch_size, device)
    if not args.quick:
        raise ValueError("--reference is required (real images, .npz or folder, or a features file).")
    images = np.random.default_rng(args.seed).integers(0, 256, (args.num_samples, 32, 32, 3), dtype=np.uint8)
    return extract_features(extractor, [images], device=device, desc="reference")


def sample_row(pipe, args, labels: np.ndarray, sampler: str, steps: int) -> tuple[np.ndarray, int, float]:
    """All samples of one row as uint8 images, the model evaluations per image and the seconds per image."""
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    kwargs = {"num_inference_steps": steps, "sampler": sampler}
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.guidance_interval is not None:
        kwargs["guidance_interval"] = args.guidance_interval
    start = time.perf_counter()
    try:
        batches = []
        for first in range(0, args.num_samples, args.batch_size):
            indices = list(range(first, min(first + args.batch_size, args.num_samples)))
            batches.append(generate_batch(pipe, indices, labels, args.seed, **kwargs))
    finally:
        hook.remove()
    seconds = (time.perf_counter() - start) / args.num_samples
    return np.concatenate(batches), len(calls) // len(batches), seconds


def run(args: argparse.Namespace, device: torch.device) -> list[Table]:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    pipe = load_pipeline(args, device)
    extractor = EfficientNetLite0FeatureExtractor()
    fd_name = metric_names(extractor.name)["fd"]
    reference = reference_features(args, extractor, device)
    labels = sample_labels(args.num_samples, pipe.transformer.config.num_classes)
    where = "tiny-cpu random weights (smoke run)" if args.quick else Path(args.pipeline).name

    detail = Table(
        f"Samplers against steps ({where}, {args.num_samples} samples, {device.type})",
        ["sampler", "steps", "NFE_per_image", fd_name, "s_per_image"],
        notes=[
            "same seed and label per sample index in every row; NFE counts transformer calls per batch "
            "(guided calls evaluate both halves in one call)",
            f"reference: {args.reference or 'random uint8 images (smoke run)'} ({len(reference['pool'])} images)",
        ],
    )
    wide = Table(
        f"{fd_name} against steps ({where}, {args.num_samples} samples)",
        ["sampler"] + [f"{steps} steps" for steps in args.steps_list],
    )
    for sampler in args.samplers:
        wide_row = {"sampler": sampler}
        for steps in args.steps_list:
            images, nfe, seconds = sample_row(pipe, args, labels, sampler, steps)
            batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
            features = extract_features(extractor, batches, device=device, desc=f"{sampler} {steps}")
            fd = frechet_distance_from_features(reference["pool"], features["pool"])
            detail.add(sampler=sampler, steps=steps, NFE_per_image=nfe, s_per_image=seconds, **{fd_name: fd})
            wide_row[f"{steps} steps"] = fd
            print(f"{sampler:>12} {steps:>3} steps: {fd_name} {fd:.3f} ({nfe} NFE)", flush=True)
        wide.add(**wide_row)
    return [wide, detail]


if __name__ == "__main__":
    suite_main(__doc__, add_args, run)

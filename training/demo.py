#!/usr/bin/env python
"""`make demo`: end-to-end REPA-E that visibly learns, on a 2-core CPU in under 10 minutes, fully offline.

Renders the embedded OpenMoji emoji at 32 px (or reads your images: ``--train_data_dir`` / ``--dataset_name``),
trains the `emoji-cpu` recipe with `training/train_repae.py`: end-to-end REPA-E first (VAE, SiT and alignment to
the bundled EfficientNet-Lite0 together), then the SiT alone on the frozen end-to-end VAE (``--vae_freeze_step``, the
paper's second stage in the same run) with its learning rate annealed to 0, while the VAE's decoder keeps learning to
decode the frozen encoder's latents with noise added (``--decoder_latent_noise``), so that it also decodes the SiT's
imperfect latents well. The last steps train the decoder alone (``--decoder_only_step``), with a patch-GAN term
(``--gan_start``) and a learning rate that decays to 0. It exports a `RepaEPipeline`, and then reports on itself:

    demo/metrics.json          FD-EfficientNetLite0 / precision / recall of class-balanced samples against the
                               training images (the offline extractor; not comparable with FID), and of the VAE's
                               reconstructions alone
    demo/samples.png           one labelled row per class
    demo/reconstructions.png   real training images above their VAE reconstructions
    demo/loss_curves.png       the training curves
    demo/pipeline/             the pipeline: RepaEPipeline.from_pretrained("demo/pipeline")

Departures from the paper's recipe, all because this is a 10-minute CPU run (the log and model card say so): no
LPIPS term (torchvision's VGG16 weights cannot be had offline), the GAN term only in the decoder-only phase, the
VAE starts from random weights (REPA-E starts from a trained VAE), a tiny VAE and SiT at 32 px, batch 16,
lognormal time sampling, higher learning rates with warm-up, EMA decay 0.995, 50 SDE steps with guidance 3.0, bf16
autocast where the CPU has bf16 units, the VAE's encoder frozen after 1000 of the 3000 steps, the SiT after 2000 (its
learning rate decaying to 0 in between), and the decoder trained on latents perturbed by noise of up to 0.8 x their
spread after the encoder's freeze.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import train_repae  # noqa: E402
from diffusers_repae import RepaEPipeline  # noqa: E402
from diffusers_repae.cli import refuse_overwrite, run_cli  # noqa: E402
from diffusers_repae.evaluation import build_feature_extractor  # noqa: E402
from diffusers_repae.evaluation.quick_score import (  # noqa: E402
    balanced_samples,
    dataset_images,
    pooled_features,
    reconstructions,
    score_features,
)
from diffusers_repae.training.data import load_training_dataset  # noqa: E402

RECIPE = "emoji-cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="End-to-end REPA-E demo: trains on OpenMoji (or your images) on the CPU, offline, in under 10 "
        "minutes, then scores and shows what it learned."
    )
    parser.add_argument("--output_dir", type=str, default=str(REPO / "demo"), help="Where everything goes.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")
    data = parser.add_argument_group("data (default: the embedded OpenMoji emoji, labelled by Unicode group)")
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Your own images instead: a folder with one sub-folder per class (class_name/xxx.png).",
    )
    data.add_argument("--dataset_name", type=str, default=None, help="Or a `datasets` dataset (Hub id or local).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Its configuration, if it has several.")
    data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    data.add_argument("--label_column", type=str, default="label", help="Label column of --dataset_name.")
    data.add_argument("--resolution", type=int, default=32, help="Image side in pixels (a multiple of 16).")
    training = parser.add_argument_group("training")
    training.add_argument(
        "--max_train_steps",
        type=int,
        default=3000,
        help="Training steps: end-to-end, then the SiT and the decoder on the frozen encoder, then the decoder alone.",
    )
    training.add_argument(
        "--vae_warmup_steps",
        type=int,
        default=0,
        help="First steps that train only the VAE's reconstruction (measured: no gain at this size).",
    )
    training.add_argument(
        "--vae_freeze_step",
        type=int,
        default=1000,
        help="End-to-end REPA-E up to this step; then the VAE is frozen and the SiT trains on with alignment on "
        "its latents (the paper's second stage, about twice as many steps per second). 0: end-to-end throughout.",
    )
    training.add_argument(
        "--decoder_latent_noise",
        type=float,
        default=0.8,
        help="After --vae_freeze_step the decoder keeps training (the encoder, and so the SiT's latents, stay frozen) "
        "on latents plus Gaussian noise of up to this times each channel's std, so that it decodes the SiT's "
        "imperfect latents well. 0: no noise.",
    )
    training.add_argument(
        "--decoder_only_step",
        type=int,
        default=2000,
        help="From this step on (after --vae_freeze_step) only the decoder trains, its learning rate decaying to 0 "
        "at the last step: the SiT and its EMA stay as they are and each step costs the decoder's pass alone. 0, "
        "--vae_freeze_step 0 or --no_decoder_training: the SiT trains to the last step.",
    )
    training.add_argument(
        "--gan_start",
        type=int,
        default=2000,
        help="From this step on the VAE's loss has its patch-GAN term (a small discriminator trains alongside), "
        "weighted adaptively as in taming/LDM; by default that is the decoder-only phase. 0: no GAN term.",
    )
    training.add_argument(
        "--gan_weight",
        type=float,
        default=0.25,
        help="With --gan_start: the GAN term's weight relative to the reconstruction's gradient at the decoder's "
        "last layer (train_repae.py --adaptive_disc_weight --disc_weight).",
    )
    training.add_argument(
        "--constant_sit_lr",
        action="store_true",
        help="Keep the SiT's learning rate constant after --vae_freeze_step. By default it decays linearly to 0 over "
        "the SiT's steps on the frozen VAE (train_repae.py --sit_lr_decay_start), an annealed end for its training.",
    )
    training.add_argument(
        "--no_decoder_training",
        action="store_true",
        help="Freeze the decoder with the encoder at --vae_freeze_step (the SiT-only steps are then faster).",
    )
    training.add_argument(
        "--max_train_minutes",
        type=float,
        default=7.3,
        help="Safety cap: stop training after this many minutes even if --max_train_steps is not reached (the "
        "log says so). The default run trains for about 7.4 minutes on a 2-core CPU with bf16 units.",
    )
    training.add_argument("--train_batch_size", type=int, default=16, help="Batch size.")
    training.add_argument("--learning_rate", type=float, default=5e-4, help="Learning rate of the SiT.")
    training.add_argument("--vae_learning_rate", type=float, default=1e-3, help="Learning rate of the VAE.")
    training.add_argument("--ema_decay", type=float, default=0.995, help="EMA decay of the SiT.")
    training.add_argument("--seed", type=int, default=0, help="Seed for training and sampling.")
    training.add_argument(
        "--mixed_precision",
        choices=["auto", "no", "bf16"],
        default="auto",
        help="'auto': bf16 autocast when the CPU has bf16 units (avx512_bf16 / amx_bf16), fp32 otherwise.",
    )
    sampling = parser.add_argument_group("sampling and scoring")
    sampling.add_argument("--num_eval_samples", type=int, default=360, help="Samples scored against the data.")
    sampling.add_argument("--num_inference_steps", type=int, default=50, help="Sampler steps.")
    sampling.add_argument("--guidance_scale", type=float, default=3.0, help="Classifier-free guidance scale.")
    sampling.add_argument("--sampler", choices=["sde", "euler", "heun"], default="sde", help="Sampler.")
    args = parser.parse_args(argv)
    if args.dataset_name and args.train_data_dir:
        parser.error("give --train_data_dir or --dataset_name, not both.")
    if args.decoder_latent_noise < 0:
        parser.error(f"--decoder_latent_noise must be >= 0, got {args.decoder_latent_noise}.")
    if args.no_decoder_training or not args.vae_freeze_step:
        args.decoder_only_step = 0  # there is no decoder phase to end with
    if args.decoder_only_step and args.decoder_only_step <= args.vae_freeze_step:
        parser.error(
            f"--decoder_only_step must be 0 or > --vae_freeze_step ({args.vae_freeze_step}), got "
            f"{args.decoder_only_step}."
        )
    if args.gan_start < 0 or args.gan_weight <= 0:
        parser.error(
            f"--gan_start must be >= 0 (0: no GAN) and --gan_weight > 0, got {args.gan_start} and {args.gan_weight}."
        )
    if args.num_eval_samples < 10:
        parser.error(f"--num_eval_samples must be >= 10, got {args.num_eval_samples}.")
    if args.vae_freeze_step and args.vae_freeze_step <= args.vae_warmup_steps:
        parser.error(
            f"--vae_freeze_step must be 0 (never freeze) or > --vae_warmup_steps ({args.vae_warmup_steps}), got "
            f"{args.vae_freeze_step}."
        )
    return args


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists native bf16 instructions (else torch emulates bf16, which is slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def data_flags(args) -> list[str]:
    flags = ["--resolution", str(args.resolution)]
    if args.train_data_dir:
        flags += ["--train_data_dir", args.train_data_dir]
    if args.dataset_name:
        flags += ["--dataset_name", args.dataset_name, "--image_column", args.image_column]
        flags += ["--label_column", args.label_column]
        if args.dataset_config_name:
            flags += ["--dataset_config_name", args.dataset_config_name]
    return flags


def train(args, pipeline_dir: Path, precision: str) -> None:
    """The demo recipe through train_repae.py (its step, checkpoints, EMA and export)."""
    train_repae.main(
        [
            "--recipe", RECIPE, "--enc_type", "efficientnet-lite0", "--no_lpips", *gan_flags(args),
            "--weighting", "lognormal",
            "--mixed_precision", precision, "--train_batch_size", str(args.train_batch_size),
            "--max_train_steps", str(args.max_train_steps), "--max_train_minutes", str(args.max_train_minutes),
            "--vae_warmup_steps", str(args.vae_warmup_steps),
            *(frozen_phase_flags(args) if args.vae_freeze_step else []),
            "--learning_rate", str(args.learning_rate), "--vae_learning_rate", str(args.vae_learning_rate),
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", str(min(100, args.max_train_steps)),
            "--ema_decay", str(args.ema_decay), "--checkpointing_steps", "500", "--checkpoints_total_limit", "1",
            "--validation_steps", "0", "--dataloader_num_workers", "0", "--seed", str(args.seed),
            "--output_dir", str(pipeline_dir), "--report_to", "tensorboard",
        ]
        + data_flags(args)
    )  # fmt: skip


def gan_flags(args) -> list[str]:
    """train_repae.py flags of the GAN term: a small discriminator, adaptive weight, active from --gan_start."""
    start = args.gan_start or 1_000_000_000  # never
    return [
        "--disc_start",
        str(start),
        "--disc_ndf",
        "32",
        "--adaptive_disc_weight",
        "--disc_weight",
        str(args.gan_weight),
    ]


def frozen_phase_flags(args) -> list[str]:
    """train_repae.py flags of the steps after the freeze: reuse each image's targets, anneal the SiT's learning rate
    (unless ``--constant_sit_lr``) and (unless ``--no_decoder_training``) keep training the decoder on
    noise-perturbed latents."""
    flags = ["--vae_freeze_step", str(args.vae_freeze_step), "--cache_frozen_targets"]
    if not args.constant_sit_lr:
        flags += ["--sit_lr_decay_start", str(args.vae_freeze_step)]
    if not args.no_decoder_training:
        flags += ["--train_decoder_after_freeze", "--decoder_latent_noise", str(args.decoder_latent_noise)]
        if args.decoder_only_step:
            flags += ["--decoder_only_step", str(args.decoder_only_step)]
    return flags


def set_sampling_defaults(pipeline_dir: Path, num_inference_steps: int, guidance_scale: float) -> None:
    """Make the demo's sampler settings the exported pipeline's defaults (model_index.json), so that
    ``RepaEPipeline.from_pretrained(pipeline_dir)(class_labels=...)`` samples as the demo scored."""
    index_path = pipeline_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(default_num_inference_steps=num_inference_steps, default_guidance_scale=guidance_scale)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def named_scores(scores: dict) -> dict:
    """``score_features``' fd / precision / recall under their metrics.json names, rounded for reading."""
    return {
        "FD-EfficientNetLite0": round(scores["fd"], 2),
        "precision-EfficientNetLite0": round(scores["precision"], 4),
        "recall-EfficientNetLite0": round(scores["recall"], 4),
    }


def labelled_rows(images: np.ndarray, labels: np.ndarray, names: dict[int, str], per_row: int = 8, zoom: int = 2):
    """One row per class: its name on the left, then ``per_row`` samples, each enlarged ``zoom`` times."""
    from PIL import Image, ImageDraw, ImageFont

    side = images.shape[1] * zoom
    classes = sorted(names)
    titles = {class_id: names[class_id][:24] for class_id in classes}
    font = ImageFont.load_default()
    # The label column is as wide as the longest title, so short names leave no empty band.
    label_width = 8 + max(round(font.getlength(title)) for title in titles.values())
    grid = Image.new("RGB", (label_width + per_row * side, len(classes) * side), "white")
    draw = ImageDraw.Draw(grid)
    for row, class_id in enumerate(classes):
        draw.text((4, row * side + side // 2 - 6), titles[class_id], fill="black", font=font)
        for column, image in enumerate(images[labels == class_id][:per_row]):
            tile = Image.fromarray(image).resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_width + column * side, row * side))
    return grid


def reconstruction_grid(vae, images: np.ndarray, zoom: int = 2):
    """Real images (top row of each pair) above their VAE reconstructions (posterior mean), enlarged ``zoom``x."""
    from PIL import Image

    pairs = [np.concatenate(list(part), axis=1) for part in (images, reconstructions(vae, images))]
    grid = np.concatenate(pairs, axis=0)
    return Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST)


def spread_over_classes(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` items taking classes in turn (so the reconstruction grid shows every class)."""
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    picked = []
    while len(picked) < count and any(by_class):
        for members in by_class:
            if members and len(picked) < count:
                picked.append(members.pop(0))
    return np.array(picked)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    refuse_overwrite(out, "--output_dir", {"--train_data_dir": args.train_data_dir}, overwrite=args.overwrite)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pipeline_dir = out / "pipeline"
    precision = "bf16" if args.mixed_precision == "auto" and cpu_has_bf16() else args.mixed_precision
    precision = "no" if precision == "auto" else precision

    print(f"[1/4] loading the training images at {args.resolution} px ...", flush=True)
    data = load_training_dataset(
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        dataset_config_name=args.dataset_config_name,
        image_column=args.image_column,
        label_column=args.label_column,
        resolution=args.resolution,
    )
    print(f"      {data.describe_size()}, {data.num_classes} classes ({data.source})")
    if data.attribution:
        print(f"      {data.attribution}")

    print("[2/4] end-to-end REPA-E training (VAE + SiT + alignment, train_repae.py) ...", flush=True)
    if args.vae_freeze_step and args.vae_freeze_step < args.max_train_steps:
        sit_end = min(args.decoder_only_step or args.max_train_steps, args.max_train_steps)
        print(
            f"      end-to-end for {args.vae_freeze_step} steps, then the VAE is frozen and the SiT trains on for "
            f"{sit_end - args.vae_freeze_step} steps (--vae_freeze_step)"
            + ("" if args.constant_sit_lr else ", its learning rate decaying to 0")
        )
        if not args.no_decoder_training:
            print(
                "      from then on the decoder keeps training, on latents plus noise of up to "
                f"{args.decoder_latent_noise} x their spread (--decoder_latent_noise)"
            )
        if sit_end < args.max_train_steps:
            print(
                f"      the last {args.max_train_steps - sit_end} steps train the decoder alone, its learning rate "
                "decaying to 0 (--decoder_only_step)"
            )
    if args.gan_start and args.gan_start < args.max_train_steps:
        print(f"      the VAE's loss has its patch-GAN term from step {args.gan_start} on (--gan_start)")
    gan = bool(args.gan_start) and args.gan_start < args.max_train_steps
    print(f"      NOTE: no LPIPS term (VGG16 weights are not available offline){'' if gan else ' and no GAN term'}.")
    if args.vae_warmup_steps:
        print(f"      the first {args.vae_warmup_steps} steps train only the VAE (it starts from random weights).")
    print(f"      precision: {'bf16 autocast' if precision == 'bf16' else 'fp32'}; {torch.get_num_threads()} threads")
    train_start = time.perf_counter()
    train(args, pipeline_dir, precision)
    train_minutes = (time.perf_counter() - train_start) / 60

    print("[3/4] sampling and scoring against the training images ...", flush=True)
    set_sampling_defaults(pipeline_dir, args.num_inference_steps, args.guidance_scale)
    pipe = RepaEPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    call = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "sampler": args.sampler,
    }
    samples, labels = balanced_samples(pipe, args.num_eval_samples, seed=args.seed, **call)
    reference, reference_labels = dataset_images(data.dataset)
    extractor = build_feature_extractor("efficientnet-lite0")
    reference_features = pooled_features(extractor, reference)
    scores = score_features(reference_features, pooled_features(extractor, samples))
    # the VAE alone, on as many training images as samples: the bound its reconstructions put on the samples
    reconstructed_ids = np.random.default_rng(args.seed).permutation(len(reference))[: len(samples)]
    vae_scores = score_features(
        reference_features, pooled_features(extractor, reconstructions(pipe.vae, reference[reconstructed_ids]))
    )
    metrics = {
        **named_scores(scores),
        "vae_reconstructions": {**named_scores(vae_scores), "num_images": len(reconstructed_ids)},
        "num_samples": len(samples),
        "num_reference_images": len(reference),
        "data": data.source,
        "resolution": args.resolution,
        "sampler": {"name": args.sampler, **{k: v for k, v in call.items() if k != "sampler"}},
        "seed": args.seed,
        "train_minutes": round(train_minutes, 2),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print("[4/4] pictures ...", flush=True)
    names = {int(k): v for k, v in pipe.id2label.items()}
    labelled_rows(samples, labels, names).save(out / "samples.png")
    picked = spread_over_classes(reference_labels, 16)
    reconstruction_grid(pipe.vae, reference[picked]).save(out / "reconstructions.png")
    if (pipeline_dir / "loss_curves.png").is_file():
        shutil.copy(pipeline_dir / "loss_curves.png", out / "loss_curves.png")

    print()
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min (training {train_minutes:.1f} min)")
    print(
        f"  score against the {len(reference)} training images, {len(samples)} samples "
        f"({args.sampler}, {args.num_inference_steps} steps, guidance {args.guidance_scale}):"
    )
    print(
        f"      FD-EfficientNetLite0 {metrics['FD-EfficientNetLite0']:.1f}   precision "
        f"{metrics['precision-EfficientNetLite0']:.3f}   recall {metrics['recall-EfficientNetLite0']:.3f}"
    )
    print(
        f"  the VAE alone ({len(reconstructed_ids)} training images through encode/decode): FD-EfficientNetLite0 "
        f"{vae_scores['fd']:.1f}   precision {vae_scores['precision']:.3f}"
    )
    print(f"  metrics:                        {out / 'metrics.json'}")
    print(f"  samples, one row per class:     {out / 'samples.png'}")
    print(f"  real above reconstructed:       {out / 'reconstructions.png'}")
    print(f"  loss curves:                    {out / 'loss_curves.png'}")
    print(f"  pipeline:                       RepaEPipeline.from_pretrained({str(pipeline_dir)!r})")
    print(f"  tensorboard logs:               tensorboard --logdir {pipeline_dir / 'logs'}")
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)

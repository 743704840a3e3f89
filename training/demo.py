#!/usr/bin/env python
"""`make demo`: end-to-end REPA-E on a 2-core CPU in about 10 minutes, fully offline.

Renders the embedded OpenMoji emoji at 64 px (cached after the first run), trains the `tiny-cpu` recipe (VAE f4 ->
16x16x4 latents, SiT patch 2 -> 64 tokens, aligned with the bundled EfficientNet-Lite0's 8x8 stride-16 grid)
end-to-end with `training/train_repae.py`, exports a `RepaEPipeline`, and samples every class into
`demo/samples.png`. A toy: a few hundred steps of a 3M-parameter model give coloured blobs, not emoji.

Departures from the original recipe, all because this is a 10-minute CPU run: no LPIPS term (torchvision's VGG16
weights cannot be downloaded here), no GAN term by default (`--disc_start` past the run: from a random VAE
without LPIPS it stripes the decoder within a few hundred steps), fp32, batch 16, EMA decay 0.99 (0.9999 would
barely move in a few hundred steps), a higher learning rate, and a wall-clock cap on training.
"""

from __future__ import annotations

import argparse
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
from diffusers_repae.training.data import load_training_dataset  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tiny end-to-end REPA-E demo on OpenMoji (CPU, offline).")
    parser.add_argument("--output_dir", type=str, default=str(REPO / "demo"), help="Where everything goes.")
    parser.add_argument("--max_train_steps", type=int, default=400, help="Training steps (upper bound).")
    parser.add_argument("--max_train_minutes", type=float, default=7.0, help="Stop training after this many minutes.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Global batch size.")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="Learning rate of all three optimisers.")
    parser.add_argument("--num_inference_steps", type=int, default=30, help="Sampler steps for samples.png.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for training and sampling.")
    parser.add_argument(
        "--disc_start",
        type=int,
        default=1_000_000,
        help="Step from which the GAN terms are active. The original uses 0; here the default keeps them off for "
        "the whole run: from a random VAE without LPIPS, a few hundred CPU steps with the GAN give striped "
        "artefacts, without it smooth emoji-coloured blobs.",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    out = Path(args.output_dir)
    pipeline_dir = out / "pipeline"
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)  # a fresh run every time
    out.mkdir(parents=True, exist_ok=True)

    print("[1/3] rendering / loading the embedded OpenMoji dataset at 64 px ...", flush=True)
    data = load_training_dataset(resolution=64)
    print(f"      {len(data.dataset)} images, {data.num_classes} classes, {time.perf_counter() - start:.0f} s")
    print(f"      {data.attribution}")

    print("[2/3] end-to-end training (VAE + SiT + discriminator) ...", flush=True)
    print("      NOTE: the LPIPS perceptual term is OFF (--no_lpips): torchvision's VGG16 weights are not available")
    print("      offline. Pass --lpips_vgg_path to train_repae.py to use it.")
    if args.disc_start >= args.max_train_steps:
        print(
            f"      NOTE: the GAN terms are OFF for this run (--disc_start {args.disc_start}); pass --disc_start 0 for"
        )
        print("      the original schedule (striped artefacts from a random VAE in a short CPU run).")
    train_start = time.perf_counter()
    lr = str(args.learning_rate)
    train_repae.main(
        [
            "--recipe", "tiny-cpu", "--resolution", "64", "--enc_type", "efficientnet-lite0", "--no_lpips",
            "--mixed_precision", "no", "--train_batch_size", str(args.train_batch_size),
            "--max_train_steps", str(args.max_train_steps), "--max_train_minutes", str(args.max_train_minutes),
            "--learning_rate", lr, "--vae_learning_rate", lr, "--disc_learning_rate", lr,
            "--ema_decay", "0.99", "--disc_start", str(args.disc_start),
            "--checkpointing_steps", "100", "--checkpoints_total_limit", "1",
            "--validation_steps", "100", "--num_validation_classes", "16", "--validation_inference_steps", "25",
            "--dataloader_num_workers", "0", "--random_flip", "--seed", str(args.seed),
            "--output_dir", str(pipeline_dir), "--report_to", "tensorboard",
        ]
    )  # fmt: skip
    train_minutes = (time.perf_counter() - train_start) / 60

    print("[3/3] sampling every class from the exported pipeline ...", flush=True)
    pipe = RepaEPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    class_ids = sorted(pipe.id2label)
    images = pipe(
        class_labels=class_ids,
        num_images_per_label=4,
        num_inference_steps=args.num_inference_steps,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
    ).images
    # one row per class, 4 samples each
    rows = [np.concatenate(list(images[4 * i : 4 * i + 4]), axis=1) for i in range(len(class_ids))]
    grid = (np.concatenate(rows, axis=0) * 255).clip(0, 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(grid).save(out / "samples.png")

    total = time.perf_counter() - start
    print()
    print(f"done in {total / 60:.1f} min (training {train_minutes:.1f} min)")
    print(f"  pipeline (RepaEPipeline.from_pretrained): {pipeline_dir}")
    print(f"  samples, one row per class:               {out / 'samples.png'}")
    for class_id in class_ids:
        print(f"      row {class_id}: {pipe.id2label[class_id]}")
    print(f"  loss curves:                               {pipeline_dir / 'loss_curves.png'}")
    print(f"  validation grids (EMA model):              {pipeline_dir / 'validation'}")
    print(f"  tensorboard logs:                          tensorboard --logdir {pipeline_dir / 'logs'}")
    print(f"  model card:                                {pipeline_dir / 'README.md'}")


if __name__ == "__main__":
    main()

"""Encode a dataset with a VAE into sharded parquet files of posterior mean/std + label (for LDM-only training).

Launch with accelerate to spread the shards over GPUs/nodes; re-running the same command resumes (finished
shards are skipped). Read the result with ``diffusers_repae.training.latent_cache.load_latent_cache`` or plain
``datasets.load_dataset("parquet", data_files="OUT/shard-*.parquet")``.

Example (embedded OpenMoji data, tiny random VAE, with flipped copies)::

    accelerate launch training/cache_latents.py --vae tiny-cpu --resolution 64 --output_dir latents-openmoji \
        --flip_copies --shard_size 256
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffusers_repae.cli import UserError, refuse_overwrite, run_cli
from diffusers_repae.training.data import add_data_args, training_data_from_args
from diffusers_repae.training.latent_cache import (
    CacheInfo,
    load_vae,
    shard_name,
    shard_ranges,
    shards_for_process,
    write_shard,
)
from diffusers_repae.training.latent_stats import encode_posterior


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae",
        type=str,
        required=True,
        help="A diffusers AutoencoderKL folder, a pipeline folder with vae/, or a recipe name (random weights).",
    )
    parser.add_argument("--output_dir", type=str, required=True, help="Folder for the shards and cache_info.json.")
    add_data_args(parser)
    parser.add_argument("--batch_size", type=int, default=64, help="Images per VAE forward pass (per process).")
    parser.add_argument("--shard_size", type=int, default=10_000, help="Dataset images per shard file.")
    parser.add_argument(
        "--flip_copies", action="store_true", help="Also store each image's horizontally flipped copy."
    )
    parser.add_argument(
        "--storage_dtype",
        type=str,
        default="float32",
        choices=["float32", "float16"],
        help="Dtype of the stored mean/std (float16 halves the disk space).",
    )
    parser.add_argument("--max_images", type=int, default=None, help="Only cache the first N dataset images.")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes per process.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for a recipe VAE's random weights.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Empty a non-empty --output_dir that is not a latent cache first (a cache of the same settings resumes).",
    )
    return parser.parse_args(argv)


def encode_shard(vae, data, start: int, end: int, args, progress) -> tuple[dict[str, list], int]:
    """Rows of one shard; bad files (replaced by their neighbour in the dataset) are left out and counted."""
    subset = torch.utils.data.Subset(data.dataset, range(start, end))
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, num_workers=args.num_workers)
    rows: dict[str, list] = {"mean": [], "std": [], "label": [], "index": [], "flipped": []}
    skipped, position = 0, start
    for batch in loader:
        good = batch["num_skipped"] == 0
        indices = torch.arange(position, position + len(good))[good]
        position += len(good)
        skipped += int((~good).sum())
        pixels, labels = batch["pixel_values"][good], batch["labels"][good]
        variants = [(pixels, False)] + ([(pixels.flip(-1), True)] if args.flip_copies else [])
        for images, flipped in variants:
            if images.shape[0] == 0:
                continue
            mean, std = encode_posterior(vae, images)
            for i in range(images.shape[0]):
                rows["mean"].append(mean[i].float().cpu().numpy())
                rows["std"].append(std[i].float().cpu().numpy())
                rows["label"].append(int(labels[i]))
                rows["index"].append(int(indices[i]))
                rows["flipped"].append(flipped)
        progress.update(len(good))
    return rows, skipped


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.random_flip:
        raise ValueError("--random_flip makes the cache depend on chance; use --flip_copies to store both versions.")
    if args.streaming:
        raise ValueError("--streaming is not supported: resumable shards need random access to the dataset.")
    output = Path(args.output_dir)
    inputs = {"--vae": args.vae, "--train_data_dir": args.train_data_dir}
    refuse_overwrite(output, "--output_dir", inputs, overwrite=True)
    foreign = output.is_dir() and any(output.iterdir()) and not (output / "cache_info.json").is_file()
    if foreign and not args.overwrite:
        raise UserError(
            f"--output_dir {str(output)!r} is not empty and holds no latent cache: choose another folder, or pass "
            "--overwrite to empty it."
        )
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}.")
    accelerator = Accelerator()
    if foreign and accelerator.is_main_process:
        shutil.rmtree(output)
    started = time.time()
    data = training_data_from_args(args)
    num_items = min(len(data.dataset), args.max_images or len(data.dataset))
    ranges = shard_ranges(num_items, args.shard_size)
    vae = load_vae(args.vae, seed=args.seed).to(accelerator.device).eval().requires_grad_(False)
    with torch.no_grad():
        probe = encode_posterior(vae, data.dataset[0]["pixel_values"][None])[0]
    info = CacheInfo(
        vae=str(args.vae),
        source=data.source,
        resolution=args.resolution,
        num_items=num_items,
        shard_size=args.shard_size,
        num_shards=len(ranges),
        flip_copies=args.flip_copies,
        latent_shape=list(probe.shape[1:]),
        storage_dtype=args.storage_dtype,
        num_classes=data.num_classes,
        id2label={str(k): v for k, v in data.id2label.items()},
    )
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if (output / "cache_info.json").is_file():
            CacheInfo.load(output).check_compatible(info)
        info.save(output)
    accelerator.wait_for_everyone()

    mine = shards_for_process(len(ranges), accelerator.process_index, accelerator.num_processes)
    todo = [i for i in mine if not (output / shard_name(i, len(ranges))).is_file()]
    work = sum(ranges[i][1] - ranges[i][0] for i in todo)
    progress = tqdm(
        total=work,
        desc=f"encoding (process {accelerator.process_index})",
        unit="img",
        disable=not accelerator.is_local_main_process,
    )
    rows_written = skipped = 0
    with torch.no_grad():
        for i in todo:
            start, end = ranges[i]
            rows, bad = encode_shard(vae, data, start, end, args, progress)
            write_shard(output / shard_name(i, len(ranges)), rows, info.latent_shape, args.storage_dtype)
            rows_written += len(rows["label"])
            skipped += bad
    progress.close()

    totals = (
        accelerator.gather(
            torch.tensor([[len(todo), len(mine) - len(todo), rows_written, skipped]], device=accelerator.device)
        )
        .sum(0)
        .tolist()
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(
            f"latent cache {output}: {info.num_shards} shards ({totals[0]} written now, {totals[1]} already done), "
            f"{totals[2]} rows written now from {data.source} at {args.resolution} px"
            f"{' with flipped copies' if args.flip_copies else ''}; {totals[3]} bad files skipped; latent shape "
            f"{info.latent_shape} ({args.storage_dtype}); {time.time() - started:.1f} s"
        )
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)

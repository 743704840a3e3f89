"""Encode a dataset with a VAE into sharded parquet files of posterior mean/std + label (for LDM-only training).

Launch with accelerate to spread the shards over GPUs/nodes; re-running the same command resumes (finished
shards are skipped). Read the result with ``diffusers_repae.training.latent_cache.load_latent_cache`` or plain
``datasets.load_dataset("parquet", data_files="OUT/shard-*.parquet")``.

Example (embedded OpenMoji data, tiny random VAE, with flipped copies)::

    accelerate launch training/cache_latents.py --vae tiny-cpu --resolution 64 --output_dir latents-openmoji \
        --flip_copies --shard_size 256

Streamed (``--dataset_name ILSVRC/imagenet-1k --streaming``: nothing is downloaded first). The stream is read in its
source order, never shuffled: shard k holds rows [k * shard_size, (k + 1) * shard_size) and each row's ``index`` is
its position in the stream, the same rows and indices as the downloaded dataset gives. What it costs:

* every process reads the stream from its start up to its last unfinished shard: it downloads every row but
  decodes and encodes only the rows of its own shards, so N processes download the data N times (with many
  processes and the disk to spare, downloading once without --streaming is cheaper);
* a resumed run re-reads, without decoding, the rows before its first unfinished shard;
* the number of rows comes from --max_images or the dataset's metadata (the Hub's ImageNet has it); with neither,
  the main process counts them first (one more pass over the stream without decoding);
* --num_workers are decoding threads (a DataLoader's worker processes would each read other parts of a stream).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from diffusers_repae.cli import UserError, non_empty_path, positive_int, refuse_overwrite, run_cli, seed_int
from diffusers_repae.run_lock import LOCK_NAME, check_not_locked, folder_lock
from diffusers_repae.training.latent_cache import (
    CacheInfo,
    load_vae,
    shard_name,
    shard_ranges,
    shards_for_process,
    write_shard,
)
from diffusers_repae.training.latent_stats import encode_posterior
from diffusers_repae.training_args import add_data_args, training_data_from_args, vae_encoding_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = vae_encoding_parser(__doc__)
    parser.add_argument(
        "--output_dir", type=non_empty_path, required=True, help="Folder for the shards and cache_info.json."
    )
    add_data_args(parser)
    parser.add_argument(
        "--batch_size", type=positive_int, default=64, help="Images per VAE forward pass (per process)."
    )
    parser.add_argument("--shard_size", type=positive_int, default=10_000, help="Dataset images per shard file.")
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
    parser.add_argument("--max_images", type=positive_int, default=None, help="Only cache the first N dataset images.")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes per process (with --streaming: decoding threads per process).",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="Seed for a recipe VAE's random weights.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Empty a non-empty --output_dir that is not a latent cache first (a cache of the same settings resumes).",
    )
    return parser.parse_args(argv)


def dataset_batches(data, start: int, end: int, args) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the dataset rows [start, end), each sample with its ``index``; a bad file's sample has
    ``num_skipped`` 1 (map-style: its neighbour stands in; streamed: zero pixels)."""
    subset = torch.utils.data.Subset(data.dataset, range(start, end))
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, num_workers=args.num_workers)
    position = start
    for batch in loader:
        size = len(batch["labels"])
        yield {**batch, "index": torch.arange(position, position + size)}
        position += size


def stream_batches(samples: Iterator[dict], start: int, end: int, args) -> Iterator[dict[str, torch.Tensor]]:
    """The next ``end - start`` samples of `read_in_order` (the rows of one shard) in batches; checks that they are
    exactly the rows [start, end), so a stream shorter than its metadata says stops with a clear error."""
    rows = itertools.islice(samples, end - start)
    expected = start
    while chunk := list(itertools.islice(rows, args.batch_size)):
        batch = torch.utils.data.default_collate(chunk)
        if batch["index"].tolist() != list(range(expected, expected + len(chunk))):
            raise RuntimeError(f"rows out of order in the stream at {expected}: {batch['index'].tolist()}")
        expected += len(chunk)
        yield batch
    if expected != end:
        raise ValueError(
            f"the stream ended after {expected} rows, but {end} were planned (from --max_images or the dataset's "
            "metadata): pass --max_images with at most the number of rows the stream has."
        )


def encode_batches(vae, batches, args, progress) -> tuple[dict[str, list], int]:
    """Rows of one shard; bad files are left out and counted."""
    rows: dict[str, list] = {"mean": [], "std": [], "label": [], "index": [], "flipped": []}
    skipped = 0
    for batch in batches:
        good = batch["num_skipped"] == 0
        skipped += int((~good).sum())
        pixels, labels, indices = batch["pixel_values"][good], batch["labels"][good], batch["index"][good]
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


def count_items(data, max_images: int | None, accelerator: Accelerator) -> int:
    """Rows to cache: the dataset's size (a stream's from its metadata, else counted once by the main process)
    capped by --max_images."""
    if not data.streaming:
        return min(len(data.dataset), max_images or len(data.dataset))
    if data.num_examples is not None:
        return data.num_to_read(max_images)
    counted = [None]
    if accelerator.is_main_process:
        print(f"{data.source}: the stream's metadata gives no size: counting its rows (read without decoding)...")
        counted[0] = data.dataset.count_rows(max_images)
    broadcast_object_list(counted)
    return counted[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.random_flip:
        raise ValueError("--random_flip makes the cache depend on chance; use --flip_copies to store both versions.")
    output = Path(args.output_dir)
    inputs = {"--vae": args.vae, "--train_data_dir": args.train_data_dir}
    refuse_overwrite(output, "--output_dir", inputs, overwrite=True)
    # a lone lock file is what a killed run left: not foreign
    entries = [entry for entry in output.iterdir() if entry.name != LOCK_NAME] if output.is_dir() else []
    foreign = bool(entries) and not (output / "cache_info.json").is_file()
    if foreign and not args.overwrite:
        raise UserError(
            f"--output_dir {str(output)!r} is not empty and holds no latent cache: choose another folder, or pass "
            "--overwrite to empty it."
        )
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max_images must be >= 1, got {args.max_images}.")
    accelerator = Accelerator()
    if accelerator.is_main_process:  # a run in progress is reported as such, before anything is removed
        check_not_locked(output)
    if foreign and accelerator.is_main_process:
        shutil.rmtree(output)
    with folder_lock(output, enabled=accelerator.is_main_process):  # one writer per folder
        cache(args, accelerator, output)


def cache(args: argparse.Namespace, accelerator: Accelerator, output: Path) -> None:
    started = time.time()
    data = training_data_from_args(args, shuffle=False)  # one process's view: every process numbers all rows
    num_items = count_items(data, args.max_images, accelerator)
    if num_items == 0:
        raise UserError(f"{data.source} has no rows to cache.")
    ranges = shard_ranges(num_items, args.shard_size)
    vae = load_vae(args.vae, seed=args.seed).to(accelerator.device).eval().requires_grad_(False)
    with torch.no_grad():  # the latent shape, from a blank image
        blank = torch.zeros(1, 3, args.resolution, args.resolution, dtype=torch.uint8, device=accelerator.device)
        probe = encode_posterior(vae, blank)[0]
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
    if data.streaming and todo:  # one pass over the stream up to this process's last shard, decoding only its own
        wanted = set(todo)
        samples = data.dataset.read_in_order(
            keep=lambda index: index // args.shard_size in wanted,
            stop=ranges[todo[-1]][1],
            num_threads=args.num_workers,
        )
    with torch.no_grad():
        for i in todo:
            start, end = ranges[i]
            if data.streaming:
                batches = stream_batches(samples, start, end, args)
            else:
                batches = dataset_batches(data, start, end, args)
            rows, bad = encode_batches(vae, batches, args, progress)
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
            f"{totals[2]} rows written now from {data.source}{' (streamed)' if data.streaming else ''} at "
            f"{args.resolution} px"
            f"{' with flipped copies' if args.flip_copies else ''}; {totals[3]} bad files skipped; latent shape "
            f"{info.latent_shape} ({args.storage_dtype}); {time.time() - started:.1f} s"
        )
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)

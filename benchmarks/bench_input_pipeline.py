"""Input pipeline throughput: decoded, ADM-centre-cropped images per second through the training DataLoader, for the
streamed and the map-style (downloaded) routes, with 0, 1 and 2 DataLoader workers.

The benchmark writes its own dataset in the Hub's layout (parquet shards with an ``image`` column and a ClassLabel
``label``, read with ``load_dataset(folder)`` as ImageNet from the Hub would be): JPEG images of ImageNet-like sizes
(500 x 375 and its rotations / 500 x 333), quality 90, smooth random gradients plus noise so the files are about as
large as ImageNet's (~110 KB). Each pass reads every image once through `build_dataloader` (batch 32, the per-GPU
batch of a 256-image 8-GPU run); the rate is the steady state, from the first batch after the warm-up (worker start
and prefetch: ``max(1, workers x prefetch_factor)`` batches) to the last; the table shows the median of the passes.
On a shared machine the wall-clock rate depends on what else runs, so the table also gives images per CPU-second
(main process and workers together, whole pass, from ``getrusage``): what one dedicated core does.

    .venv/bin/python benchmarks/bench_input_pipeline.py [--quick] [--workers 0,1,2] [--num_images 512]

No threshold: the numbers depend on the CPU and what else runs (the load average is printed with the table).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_repae.cli import UserError, run_cli
from diffusers_repae.training.data import build_dataloader, load_training_dataset

SIZES = ((500, 375), (500, 375), (375, 500), (500, 333))  # ImageNet's most common shapes, landscape mostly
QUICK = {"num_images": 32, "long_side": 64, "resolution": 32, "batch_size": 4, "repeats": 1}


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """Smooth random gradients, mid-frequency texture and pixel noise: JPEG sizes like photographs' (q90, 500 x 375:
    ~110 KB), unlike pure noise (~3x larger) or flat colour (~10x smaller)."""

    def upsampled(rows: int, cols: int) -> np.ndarray:
        small = Image.fromarray(rng.integers(0, 256, (max(rows, 1), max(cols, 1), 3), dtype=np.uint8))
        return np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32)

    texture = upsampled(height // 8, width // 8) - 128.0
    noise = rng.normal(0.0, 22.0, (height, width, 3)).astype(np.float32)
    array = np.clip(upsampled(6, 8) + 0.5 * texture + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_dataset(
    root: Path,
    num_images: int,
    long_side: int = 500,
    quality: int = 90,
    num_shards: int = 4,
    num_classes: int = 10,
    seed: int = 0,
) -> dict:
    """``root/data/train-0000k-of-0000n.parquet`` (the Hub's layout); returns what was written. Sizes: `SIZES`
    (long side 500, as ImageNet's), scaled to ``long_side`` (the quick run uses tiny images)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    if num_images < num_shards:
        raise UserError(f"--num_images ({num_images}) must be at least --num_shards ({num_shards}).")
    rng = np.random.default_rng(seed)
    scale = long_side / 500
    images, sizes = [], []
    for i in range(num_images):
        w, h = SIZES[i % len(SIZES)]
        w, h = max(8, round(w * scale)), max(8, round(h * scale))
        images.append({"bytes": synthetic_jpeg(rng, w, h, quality), "path": None})
        sizes.append((w, h))
    labels = [i % num_classes for i in range(num_images)]
    features = Features(
        {"image": ImageFeature(), "label": ClassLabel(names=[f"class_{k}" for k in range(num_classes)])}
    )
    dataset = Dataset.from_dict({"image": images, "label": labels}, features=features)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for k in range(num_shards):
        path = root / "data" / f"train-{k:05d}-of-{num_shards:05d}.parquet"
        dataset.shard(num_shards, k, contiguous=True).to_parquet(str(path))
    kilobytes = [len(image["bytes"]) / 1e3 for image in images]
    return {
        "num_images": num_images,
        "mean_kb": float(np.mean(kilobytes)),
        "mean_size": (float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))),
        "num_shards": num_shards,
        "quality": quality,
    }


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader's workers, joined after each pass)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one_pass(loader: torch.utils.data.DataLoader, warmup_batches: int) -> tuple[float, int, float]:
    """Steady-state images/s of one pass (after ``warmup_batches``), the images the pass yielded in all, and the
    CPU seconds it took (all processes)."""
    total = timed = 0
    cpu = _cpu_seconds()
    start = None
    for number, batch in enumerate(loader, start=1):
        size = len(batch["labels"])
        total += size
        if number == warmup_batches:
            start = time.perf_counter()
        elif start is not None:
            timed += size
    elapsed = time.perf_counter() - start if start is not None else 0.0
    if start is None or timed == 0:
        raise UserError(f"too few batches to time after {warmup_batches} warm-up batches: raise --num_images.")
    return timed / elapsed, total, _cpu_seconds() - cpu  # the exhausted iterator has joined its workers


def measure(args: argparse.Namespace, root: Path, route: str, workers: int) -> dict:
    """Median steady-state rate over ``args.repeats`` full passes of one route with ``workers`` DataLoader workers."""
    data = load_training_dataset(
        dataset_name=str(root),
        streaming=route == "streamed",
        resolution=args.resolution,
        cache_dir=root / "hf_cache",
        shuffle_buffer_size=args.shuffle_buffer_size,
        seed=args.seed,
    )
    loader = build_dataloader(data, args.batch_size, workers, seed=args.seed, drop_last=False)
    warmup = max(1, workers * (loader.prefetch_factor or 0))
    rates, counts, per_cpu = [], [], []
    for repeat in range(args.repeats):
        data.dataset.set_epoch(repeat)  # a stream starts again; the map-style flip pattern changes (unused here)
        rate, count, cpu = one_pass(loader, warmup)
        rates.append(rate)
        counts.append(count)
        per_cpu.append(count / cpu)
    rate = statistics.median(rates)
    return {
        "route": route,
        "workers": workers,
        "img_per_s": rate,
        "img_per_s_per_worker": rate / max(1, workers),
        "img_per_cpu_s": statistics.median(per_cpu),
        "images_per_pass": counts,
        "all_rates": rates,
    }


def markdown(rows: list[dict], info: dict, args: argparse.Namespace, command: str, load: tuple) -> str:
    names = {"map": "map-style (downloaded, arrow)", "streamed": "streamed (parquet, windows of "}
    lines = [
        f"`{command}`",
        "",
        f"{info['num_images']} JPEG images (q{info['quality']}, mean {info['mean_size'][0]:.0f} x "
        f"{info['mean_size'][1]:.0f} px, mean {info['mean_kb']:.0f} KB) in {info['num_shards']} parquet shards; "
        f"decode + ADM centre crop to {args.resolution} px, batch {args.batch_size}; steady-state rate, median of "
        f"{args.repeats} passes; load average before: {load[0]:.2f} (1 min), {os.cpu_count()} CPUs.",
        "",
        "| route | DataLoader workers | img/s | img/s per worker (0 workers: the main process) | img per CPU-s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        name = names[row["route"]] + (f"{args.shuffle_buffer_size} rows)" if row["route"] == "streamed" else "")
        rates = f"{row['img_per_s']:.0f} | {row['img_per_s_per_worker']:.0f} | {row['img_per_cpu_s']:.0f}"
        lines.append(f"| {name} | {row['workers']} | {rates} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"Smoke run: {QUICK} (seconds).")
    parser.add_argument("--routes", default="streamed,map", help="Comma-separated: streamed, map.")
    parser.add_argument("--workers", default="0,1,2", help="Comma-separated DataLoader worker counts.")
    parser.add_argument("--num_images", type=int, default=512, help="Images in the benchmark dataset.")
    parser.add_argument(
        "--long_side", type=int, default=500, help="Long side of the images (ImageNet's: 500, e.g. 500 x 375)."
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality.")
    parser.add_argument("--num_shards", type=int, default=4, help="Parquet shards (a stream splits them per worker).")
    parser.add_argument("--resolution", type=int, default=256, help="ADM centre-crop size.")
    parser.add_argument("--batch_size", type=int, default=32, help="DataLoader batch (per GPU).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes per measurement (median reported).")
    parser.add_argument(
        "--shuffle_buffer_size", type=int, default=64, help="Stream shuffle window (rows read before decoding)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the images and the data order.")
    parser.add_argument("--data_dir", default=None, help="Folder for the dataset (default: a temporary folder).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    return args


def run(args: argparse.Namespace, argv: list[str] | None = None) -> tuple[list[dict], dict, str]:
    """Writes the dataset, measures every (route, workers); returns the rows, the dataset facts and the table."""
    routes = args.routes.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    if not set(routes) <= {"streamed", "map"} or any(w < 0 for w in workers):
        raise UserError(f"--routes must list streamed/map and --workers counts >= 0, got {args.routes!r}, {workers}.")
    if args.repeats < 1 or args.batch_size < 1:
        raise UserError("--repeats and --batch_size must be >= 1.")
    torch.set_num_threads(1)  # decoding is PIL's (one thread per process); keep torch from spinning extra threads
    load = os.getloadavg()
    flags = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/bench_input_pipeline.py", *map(shlex.quote, flags)])
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp) / "hub"
        if root.exists() and any(root.iterdir()):
            raise UserError(f"--data_dir {str(root)!r} is not empty: choose a new folder.")
        info = write_dataset(root, args.num_images, args.long_side, args.quality, args.num_shards)
        load_training_dataset(dataset_name=str(root), resolution=args.resolution, cache_dir=root / "hf_cache")
        rows = [measure(args, root, route, w) for route in routes for w in workers]  # (arrow cache made above)
    return rows, info, markdown(rows, info, args, command, load)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows, info, table = run(args, argv)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": info, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    run_cli(main)

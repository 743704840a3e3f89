"""The data flags of every data-reading script (part of the command-line layer, like `training_args`) and the
`load_training_dataset` keyword arguments they stand for."""

from __future__ import annotations

import argparse

from .cli import positive_int
from .training.data import DEFAULT_SHUFFLE_BUFFER, TrainingData, load_training_dataset


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The data flags shared by train_repae.py, train_ldm.py and cache_latents.py."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id (e.g. ILSVRC/imagenet-1k) or a local dataset script/folder for datasets.load_dataset. "
        "Without --dataset_name and --train_data_dir the embedded OpenMoji emoji dataset is used.",
    )
    group.add_argument(
        "--dataset_config_name", type=str, default=None, help="Config (subset) name of --dataset_name, if any."
    )
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Local image folder (one subfolder per class), read with datasets' imagefolder builder.",
    )
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Stream the dataset instead of downloading it first (ImageNet-scale data): disjoint shards per process, "
        "shuffled in seeded windows, exact resume.",
    )
    group.add_argument(
        "--shuffle_buffer_size",
        type=positive_int,
        default=DEFAULT_SHUFFLE_BUFFER,
        help="With --streaming: rows per shuffle window (each window is read whole, then yielded in a seeded order; "
        "a resume re-reads at most one window). Memory: this many encoded images per process.",
    )
    group.add_argument("--image_column", type=str, default="image", help="Column holding the images.")
    group.add_argument("--label_column", type=str, default="label", help="Column holding integer class labels.")
    group.add_argument(
        "--resolution",
        type=positive_int,
        default=256,
        help="Training resolution (ADM centre crop). ImageNet: 256 or 512. Own data: any multiple of 16 "
        "(the tiny CPU demo uses 64).",
    )
    group.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    group.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="Cache folder for datasets (and the rendered OpenMoji data; default ~/.cache/diffusers_repae).",
    )
    group.add_argument(
        "--embedded_label_by",
        type=str,
        default="group",
        choices=["group", "subgroup"],
        help="Labels of the embedded OpenMoji dataset: Unicode emoji group (9 classes) or subgroup.",
    )
    return parser


def dataset_options(args: argparse.Namespace) -> dict:
    """The `add_data_args` flags as `load_training_dataset` keyword arguments (``loop.load_data`` adds the seed and
    the process's shard)."""
    return {
        "dataset_name": args.dataset_name,
        "train_data_dir": args.train_data_dir,
        "dataset_config_name": args.dataset_config_name,
        "streaming": args.streaming,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "resolution": args.resolution,
        "random_flip": args.random_flip,
        "cache_dir": args.cache_dir,
        "embedded_label_by": args.embedded_label_by,
        "shuffle_buffer_size": args.shuffle_buffer_size,
    }


def training_data_from_args(
    args: argparse.Namespace,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    split: str = "train",
    shuffle: bool = True,
) -> TrainingData:
    """`load_training_dataset` with the flags of `add_data_args` (``shuffle=False``: a stream in source order)."""
    return load_training_dataset(
        **dataset_options(args), split=split, seed=seed, process_index=process_index, num_processes=num_processes,
        shuffle=shuffle,
    )  # fmt: skip

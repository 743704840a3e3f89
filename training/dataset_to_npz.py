"""Pack a dataset (ADM centre crop at --resolution) into an ADM-style reference ``.npz`` for training/evaluate.py.

    python training/dataset_to_npz.py --resolution 64 --output reference/openmoji64.npz          # embedded OpenMoji
    python training/dataset_to_npz.py --dataset_name ILSVRC/imagenet-1k --split validation --resolution 256 \
        --output reference/imagenet256_val.npz

``arr_0`` holds uint8 [N, H, W, 3] images and ``arr_1`` their labels, in dataset order (``--streaming``: the
stream's source order, no shuffle; the progress bar's total is ``--num_images`` or the size in the dataset's
metadata, or is left open when neither is known).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_repae.cli import UserError, positive_int, refuse_overwrite, run_cli
from diffusers_repae.evaluation import save_npz
from diffusers_repae.training.data import real_images
from diffusers_repae.training_args import add_data_args, training_data_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--split", default="train", help="Dataset split (e.g. 'validation').")
    parser.add_argument("--num_images", type=positive_int, default=None, help="Keep only the first N images.")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="Images per loader batch.")
    parser.add_argument("--output", required=True, help="Path of the .npz to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.random_flip = False  # evaluation reads images as they are, in dataset order
    if not args.output.endswith(".npz"):
        args.output += ".npz"  # np.savez adds the suffix
    refuse_overwrite(args.output, "--output", {"--train_data_dir": args.train_data_dir}, args.overwrite)
    if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise UserError("--batch_size and --num_images must be >= 1.")
    data = training_data_from_args(args, split=args.split, shuffle=False)  # a stream in its source order
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=args.batch_size, shuffle=False)  # dataset order
    total = data.num_to_read(args.num_images)  # None: a stream of unknown length, read to its end
    print(f"{data.source}: {data.describe_size()}")
    images, labels, dropped, seen = [], [], 0, 0
    with tqdm(total=total, desc="images", unit="img") as bar:
        for batch in itertools.islice(loader, None if total is None else -(-total // args.batch_size)):
            if total is not None:
                batch = {k: v[: total - seen] for k, v in batch.items()}
            good, bad = real_images(batch, data.streaming)  # map-style stand-ins for bad files are left out
            seen += len(good)
            dropped += bad
            images.append(batch["pixel_values"][good].permute(0, 2, 3, 1).numpy())
            labels.append(batch["labels"][good].numpy())
            bar.update(len(good))
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) == 0:
        raise UserError(f"no readable images in {data.source}: nothing to write ({dropped} unreadable files).")
    path = save_npz(args.output, images, labels)
    print(f"wrote {path}: {images.shape[0]} images {images.shape[1:]} from {data.source}")
    print(f"{dropped} unreadable images left out of the reference set" if dropped else "no unreadable images")
    if data.attribution:
        print(f"attribution: {data.attribution}")


if __name__ == "__main__":
    run_cli(main)

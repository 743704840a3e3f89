#!/usr/bin/env python
"""Writes scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes) as an image folder for the demo.

A small real dataset that is not in this repository, used to try the demo recipe on other data:

    pip install scikit-learn          # only for this script; the digits ship inside the package (no download)
    python benchmarks/digits_folder.py --output_dir digits
    python training/demo.py --train_data_dir digits --output_dir demo-digits

Each digit becomes ``output_dir/digit_<d>/<index>.png``: dark ink on white, RGB, still 8x8 (the demo's loader
upscales it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from diffusers_repae.cli import UserError, refuse_overwrite, replacing_folder, run_cli


def digits_as_images() -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [1797, 8, 8] dark-on-white images, labels)`` from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise UserError("this script needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()  # ink values 0..16
    return (255 - digits.images / 16 * 255).clip(0, 255).astype(np.uint8), digits.target


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=str, default="digits", help="The image folder to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output_dir.")
    args = parser.parse_args(argv)
    refuse_overwrite(args.output_dir, "--output_dir", overwrite=args.overwrite)

    from PIL import Image

    images, labels = digits_as_images()
    with replacing_folder(args.output_dir) as staging:
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = staging / f"digit_{label}"
            folder.mkdir(exist_ok=True)
            Image.fromarray(image).convert("RGB").save(folder / f"{index:04d}.png")
    print(f"{len(images)} digits in {len(set(labels.tolist()))} class folders under {args.output_dir}")
    return Path(args.output_dir)


if __name__ == "__main__":
    run_cli(main)

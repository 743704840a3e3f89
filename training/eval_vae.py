"""VAE reconstruction metrics on a dataset: PSNR, SSIM, LPIPS and rFID in one table.

    python training/eval_vae.py --vae path/to/pipeline --vae_subfolder vae \
        --dataset_name ILSVRC/imagenet-1k --split validation --resolution 256 --num_images 50000 \
        --inception_weights weights-inception-2015-12-05-6726825d.pth --lpips_vgg_weights vgg16-397923af.pth

Images go through the ADM centre crop of the training data loader (or come ready-made from ``--images``, an
``.npz``/folder). LPIPS needs torchvision's VGG16 ImageNet weights: without ``--lpips_vgg_weights`` that column is
left out (a note says so). rFID needs the Inception weights; offline, ``--feature_extractor efficientnet-lite0``
reports rFD-EfficientNetLite0 instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from diffusers_repae.cli import UserError, device_name, positive_int, refuse_overwrite, run_cli
from diffusers_repae.evaluation import (
    FEATURE_EXTRACTORS,
    build_feature_extractor,
    count_images,
    evaluate_reconstruction,
    iter_image_batches,
    load_lpips_vgg,
)
from diffusers_repae.training.data import real_images
from diffusers_repae.training_args import add_data_args, training_data_from_args
from diffusers_repae.weight_files import loading


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae", required=True, help="AutoencoderKL folder, or a pipeline folder with --vae_subfolder."
    )
    parser.add_argument("--vae_subfolder", default=None, help="Subfolder of --vae holding the VAE (e.g. 'vae').")
    parser.add_argument("--images", default=None, help="Evaluate these images (.npz or folder) instead of a dataset.")
    add_data_args(parser)
    parser.add_argument("--split", default="train", help="Dataset split to evaluate (e.g. 'validation').")
    parser.add_argument("--num_images", type=positive_int, default=None, help="Evaluate only the first N images.")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="Images per batch.")
    parser.add_argument(
        "--feature_extractor",
        default="inception-v3",
        choices=[*FEATURE_EXTRACTORS, "none"],
        help="Network for rFID (inception-v3) or rFD-EfficientNetLite0 (offline); 'none' skips it.",
    )
    parser.add_argument("--inception_weights", default=None, help="torch-fidelity's Inception weights file.")
    parser.add_argument("--allow_download", action="store_true", help="Download the Inception weights if missing.")
    parser.add_argument(
        "--lpips_vgg_weights", default=None, help="torchvision's vgg16-397923af.pth for LPIPS (else LPIPS is skipped)."
    )
    parser.add_argument(
        "--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device."
    )
    parser.add_argument("--output_json", default=None, help="Also write the metrics to this JSON file.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output (never one of this command's inputs)."
    )
    return parser.parse_args(argv)


def image_batches(args: argparse.Namespace, dropped: list[int] | None = None):
    """uint8 [B, H, W, 3] batches from --images or from the data loader, and how many images they hold (at most).

    Unreadable dataset files (stand-ins from a neighbour) are left out and counted in ``dropped[0]``.
    """
    dropped = [0] if dropped is None else dropped
    if args.images:
        total = count_images(args.images)
        total = total if args.num_images is None else min(total, args.num_images)
        return iter_image_batches(args.images, args.batch_size, args.num_images), total
    args.random_flip = False  # evaluation reads images as they are, in dataset order
    data = training_data_from_args(args, split=args.split, shuffle=False)  # a stream in its source order
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=args.batch_size, shuffle=False)  # dataset order
    total = data.num_to_read(args.num_images)  # None: a stream of unknown length, read to its end
    print(f"{data.source}: {data.describe_size()}")
    num_batches = None if total is None else -(-total // args.batch_size)

    def batches():
        seen = 0
        for batch in itertools.islice(loader, num_batches):
            if total is not None:
                batch = {k: v[: total - seen] for k, v in batch.items()}
            good, bad = real_images(batch, data.streaming)  # map-style stand-ins for bad files are left out
            seen += len(good)
            dropped[0] += bad
            if good.any():
                yield batch["pixel_values"][good].permute(0, 2, 3, 1).numpy()

    return batches(), total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.output_json:
        inputs = {"--vae": args.vae, "--images": args.images, "--train_data_dir": args.train_data_dir}
        refuse_overwrite(args.output_json, "--output_json", inputs, args.overwrite)
    if args.images is not None and not Path(args.images).exists():
        raise UserError(f"--images {args.images!r} does not exist.")
    with loading("--vae", args.vae, "AutoencoderKL"):
        vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.vae_subfolder)
    extractor = None
    if args.feature_extractor != "none":
        weights = args.inception_weights if args.feature_extractor == "inception-v3" else None
        extractor = build_feature_extractor(args.feature_extractor, weights, allow_download=args.allow_download)
    lpips_model, note = None, None
    if args.lpips_vgg_weights:
        lpips_model = load_lpips_vgg(args.lpips_vgg_weights)
    else:
        note = "LPIPS skipped: it needs torchvision's VGG16 ImageNet weights; pass --lpips_vgg_weights PATH."
    dropped = [0]
    batches, total = image_batches(args, dropped)
    results = evaluate_reconstruction(vae, batches, extractor, lpips_model, device=args.device, total=total)
    print(f"{dropped[0]} unreadable images left out" if dropped[0] else "no unreadable images")

    print(f"VAE: {args.vae}" + (f" ({args.vae_subfolder})" if args.vae_subfolder else ""))
    print("| " + " | ".join(results) + " |")
    print("|" + "---|" * len(results))
    print("| " + " | ".join(f"{v:.4f}" for v in results.values()) + " |")
    if note:
        print(note)
    if args.output_json:
        record = {"vae": args.vae, "vae_subfolder": args.vae_subfolder, "metrics": results, "note": note}
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)

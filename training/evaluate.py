"""Generative metrics between a reference set and a sample set, each an ADM-style ``.npz`` or a folder of images.

    python training/evaluate.py --reference VIRTUAL_imagenet256_labeled.npz --samples samples/samples_50000.npz \
        --inception_weights weights-inception-2015-12-05-6726825d.pth

Reports FID, sFID, Inception Score and k-NN precision/recall (ADM's evaluator protocol) with torch-fidelity's
TF-ported InceptionV3. Offline without those weights, ``--feature_extractor efficientnet-lite0`` uses the bundled
EfficientNet-Lite0 and reports FD-EfficientNetLite0 & co. (not comparable with FID).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusers_repae.cli import UserError, device_name, positive_int, refuse_overwrite, run_cli
from diffusers_repae.evaluation import (
    FEATURE_EXTRACTORS,
    build_feature_extractor,
    features_of,
    metrics_from_features,
    save_features,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--reference",
        required=True,
        help="Reference images: ADM-style .npz (arr_0) or a folder, or features cached by --save_reference_features.",
    )
    parser.add_argument("--samples", required=True, help="Generated images: ADM-style .npz (arr_0) or a folder.")
    parser.add_argument(
        "--feature_extractor",
        default="inception-v3",
        choices=FEATURE_EXTRACTORS,
        help="inception-v3: FID/sFID/IS/precision/recall; efficientnet-lite0: offline FD-EfficientNetLite0 & co.",
    )
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="Path to torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache).",
    )
    parser.add_argument(
        "--allow_download", action="store_true", help="Download the Inception weights if they are not found."
    )
    parser.add_argument("--batch_size", type=positive_int, default=64, help="Images per feature-extraction batch.")
    parser.add_argument(
        "--max_images", type=positive_int, default=None, help="Use only the first N images of each set."
    )
    parser.add_argument(
        "--k", type=positive_int, default=3, help="Neighbourhood size of the precision/recall manifolds."
    )
    parser.add_argument(
        "--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device."
    )
    parser.add_argument(
        "--save_reference_features",
        default=None,
        help="Cache the reference features here (.npz); pass that file as --reference next time to skip extraction.",
    )
    parser.add_argument("--output_json", default=None, help="Also write the metrics to this JSON file.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output (never one of this command's inputs)."
    )
    return parser.parse_args(argv)


def check_outputs(args: argparse.Namespace) -> None:
    """Outputs never replace an input (e.g. features over the reference images); existing ones need --overwrite."""
    inputs = {"--reference": args.reference, "--samples": args.samples, "--inception_weights": args.inception_weights}
    for flag in ("save_reference_features", "output_json"):
        path = getattr(args, flag)
        if path is None:
            continue
        if flag == "save_reference_features" and not path.endswith(".npz"):
            path = args.save_reference_features = path + ".npz"  # np.savez adds the suffix
        refuse_overwrite(path, f"--{flag}", inputs, args.overwrite)
    for name, path in inputs.items():
        if path is not None and not Path(path).exists():
            raise UserError(f"{name} {path!r} does not exist.")
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1) or args.k < 1:
        raise UserError("--batch_size, --max_images and --k must be >= 1.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_outputs(args)
    weights = args.inception_weights if args.feature_extractor == "inception-v3" else None
    extractor = build_feature_extractor(args.feature_extractor, weights, allow_download=args.allow_download)
    reference = features_of(extractor, args.reference, args.batch_size, args.device, args.max_images)
    if args.save_reference_features:
        save_features(args.save_reference_features, reference, extractor.name)
    samples = features_of(extractor, args.samples, args.batch_size, args.device, args.max_images)
    results = metrics_from_features(reference, samples, extractor.name, k=args.k, device=args.device)

    print(f"reference: {args.reference} ({len(reference['pool'])} images)")
    print(f"samples:   {args.samples} ({len(samples['pool'])} images)")
    print(f"features:  {extractor.name}")
    print("| metric | value |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.4f} |")
    if args.output_json:
        record = {
            "reference": str(args.reference),
            "samples": str(args.samples),
            "feature_extractor": extractor.name,
            "num_reference": len(reference["pool"]),
            "num_samples": len(samples["pool"]),
            "metrics": results,
        }
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)

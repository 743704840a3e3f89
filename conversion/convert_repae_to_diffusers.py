"""Convert an original REPA-E training checkpoint (train_repae or train_ldm_only) to a RepaEPipeline folder.

    python conversion/convert_repae_to_diffusers.py --checkpoint exps/sit-xl-repae-sdvae/checkpoints/0400000.pt \
        --output_dir repae-sit-xl-2-sdvae --verify
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusers_repae.cli import check_written, refuse_overwrite, replacing_folder, run_cli
from diffusers_repae.conversion import (
    ConversionError,
    convert_training_checkpoint,
    load_checkpoint,
    report_verification,
    verify_folder,
    write_pipeline_folder,
)
from diffusers_repae.models.vae import VAE_PRESETS
from diffusers_repae.run_lock import check_not_locked, folder_lock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="train_repae / train_ldm_only checkpoint: .pt, or .safetensors with 'model.'/'ema.'/'vae.' key prefixes.",
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write the RepaEPipeline (safetensors) to.")
    parser.add_argument(
        "--vae_checkpoint",
        default=None,
        help="The frozen VAE (NAME.pt, LDM layout) of a train_ldm_only checkpoint, which has no 'vae' entry.",
    )
    parser.add_argument(
        "--latents_stats",
        default=None,
        help="NAME-latents-stats.pt of the VAE. Required for train_ldm_only checkpoints (default: the file of that "
        "name beside --vae_checkpoint); for train_repae checkpoints it overrides the SiT's BatchNorm statistics.",
    )
    parser.add_argument("--no_ema", action="store_true", help="Export the raw SiT weights instead of the EMA ones.")
    parser.add_argument("--model", default=None, help="SiT name such as 'SiT-XL/1'; overrides the checkpoint's args.")
    parser.add_argument(
        "--encoder_depth", type=int, default=None, help="REPA projector depth; overrides the checkpoint's args."
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help="Attention heads; needed only for a SiT that is none of the original's SiT-{S,B,L,XL}/{1,2,4,8} "
        "(known by depth and width) and matches no recipe.",
    )
    parser.add_argument(
        "--vae_arch", default=None, choices=sorted(VAE_PRESETS), help="VAE architecture; overrides the args' 'vae'."
    )
    parser.add_argument(
        "--recipe", default=None, help="Recipe (name or folder) for scheduler and sampling defaults; default: matched."
    )
    parser.add_argument(
        "--save_training_state",
        action="store_true",
        help="Also write projector/ and training_state/ (raw SiT, its BatchNorm, raw projector, discriminator).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a non-empty --output_dir (removed entirely first: no stale sub-folders survive).",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Reload the folder, compare every tensor, run each model; exit 1 on mismatch.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = {
        "--checkpoint": args.checkpoint,
        "--vae_checkpoint": args.vae_checkpoint,
        "--latents_stats": args.latents_stats,
    }
    check_not_locked(args.output_dir)  # a conversion in progress is reported as such, before anything else
    refuse_overwrite(args.output_dir, "--output_dir", inputs, args.overwrite)
    with folder_lock(args.output_dir):  # one writer per folder: a second conversion into it is refused
        return convert(args)


def convert(args: argparse.Namespace) -> int:
    try:
        print(f"loading {args.checkpoint} (weights only)")
        checkpoint = load_checkpoint(args.checkpoint)
        vae_checkpoint = load_checkpoint(args.vae_checkpoint) if args.vae_checkpoint else None
        stats_path = args.latents_stats
        if stats_path is None and args.vae_checkpoint and "vae" not in checkpoint:
            beside = Path(args.vae_checkpoint).with_name(f"{Path(args.vae_checkpoint).stem}-latents-stats.pt")
            stats_path = str(beside) if beside.is_file() else None
        stats = load_checkpoint(stats_path) if stats_path else None
        converted = convert_training_checkpoint(
            checkpoint,
            use_ema=not args.no_ema,
            model_name=args.model,
            encoder_depth=args.encoder_depth,
            num_attention_heads=args.num_attention_heads,
            vae_checkpoint=vae_checkpoint,
            vae_checkpoint_name=args.vae_checkpoint,
            vae_arch=args.vae_arch,
            latents_stats=stats,
            recipe=args.recipe,
            with_training_state=args.save_training_state,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in converted.notes:
        print(note)
    with replacing_folder(args.output_dir) as staging:
        write_pipeline_folder(converted, staging, args.checkpoint)
        check_written(staging, ["model_index.json", "transformer/config.json", "vae/config.json"])
    print(f"wrote RepaEPipeline (recipe {converted.recipe}, step {converted.steps}) to {args.output_dir}")
    if args.verify:
        report = verify_folder(args.output_dir, converted)
        if not report_verification(report):
            return 1
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Convert an LDM-layout VAE (SD-VAE, VA-VAE, IN-VAE, REPA-E's E2E-VAEs) to a diffusers AutoencoderKL folder.

    python conversion/convert_vae_to_diffusers.py --checkpoint pretrained/e2e-vavae/e2e-vavae-400k.pt \
        --latents_stats pretrained/e2e-vavae/e2e-vavae-400k-latents-stats.pt --arch f16d32 \
        --output_dir e2e-vavae-hf --verify
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusers_repae.cli import check_written, refuse_overwrite, replacing_folder, run_cli
from diffusers_repae.conversion import ConversionError, load_checkpoint, report_verification, verify_vae_folder
from diffusers_repae.conversion.vae import convert_vae_checkpoint
from diffusers_repae.models.vae import VAE_PRESETS
from diffusers_repae.run_lock import check_not_locked, folder_lock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Original VAE weights: NAME.pt/.ckpt (raw or nested state dict) or .safetensors.",
    )
    parser.add_argument(
        "--latents_stats",
        default=None,
        help="NAME-latents-stats.pt (latents_scale, latents_bias); default: the file of that name beside --checkpoint "
        "when it exists. Becomes latents_mean/latents_std in the config (scaling_factor 1.0).",
    )
    parser.add_argument("--arch", required=True, choices=sorted(VAE_PRESETS), help="VAE architecture family.")
    parser.add_argument("--output_dir", required=True, help="Folder to write the AutoencoderKL (safetensors) to.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a non-empty --output_dir (removed entirely first: no stale sub-folders survive).",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Reload the folder, compare every tensor, decode once; exit 1 on mismatch.",
    )
    return parser.parse_args(argv)


def default_stats_path(checkpoint: Path) -> Path:
    """``NAME.pt`` -> ``NAME-latents-stats.pt`` (REPA-E's naming)."""
    return checkpoint.with_name(f"{checkpoint.stem}-latents-stats.pt")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = {"--checkpoint": args.checkpoint, "--latents_stats": args.latents_stats}
    check_not_locked(args.output_dir)  # a conversion in progress is reported as such, before anything else
    refuse_overwrite(args.output_dir, "--output_dir", inputs, args.overwrite)
    with folder_lock(args.output_dir):  # one writer per folder: a second conversion into it is refused
        return convert(args)


def convert(args: argparse.Namespace) -> int:
    checkpoint_path = Path(args.checkpoint)
    stats_path = Path(args.latents_stats) if args.latents_stats else default_stats_path(checkpoint_path)
    if args.latents_stats is None and not stats_path.is_file():
        stats_path = None
    try:
        checkpoint = load_checkpoint(checkpoint_path)
        stats = load_checkpoint(stats_path) if stats_path is not None else None
        vae, sources, skipped = convert_vae_checkpoint(checkpoint, args.arch, stats)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if skipped:
        print(f"skipped {len(skipped)} keys that are not part of the autoencoder: {', '.join(skipped)}")
    if stats_path is None:
        print("no latent statistics given: latents_mean/latents_std stay unset (pass --latents_stats).")
    else:
        print(f"latent statistics from {stats_path}")
    with replacing_folder(args.output_dir) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
        check_written(staging, ["config.json", "diffusion_pytorch_model.safetensors"])
    print(f"wrote AutoencoderKL ({sum(p.numel() for p in vae.parameters()):,} parameters) to {args.output_dir}")
    if args.verify:
        stats_config = (
            {"latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std} if stats else None
        )
        report = verify_vae_folder(args.output_dir, sources, stats_config)
        if not report_verification(report):
            return 1
    return 0


if __name__ == "__main__":
    run_cli(main)

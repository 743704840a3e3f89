"""Measure the per-channel latent statistics of a dataset under a VAE and compare them with the VAE config's.

Prints a table (data vs config mean/std, normalised shift and ratio per channel, one summary distance), saves a
plot, recommends whether to keep the config statistics, and with ``--write DIR`` saves a copy of the VAE whose
config carries the measured statistics (``latents_mean``, ``latents_std``, ``scaling_factor`` 1.0).

Statistics are of posterior samples, as REPA-E's latent BatchNorm sees them (see
``diffusers_repae.training.latent_stats``).

With ``--streaming`` the images are the first ``--max_images`` of the stream after its seeded shuffle windows
(``--shuffle_buffer_size``; 1 takes the first rows as they are), or the whole stream; the progress bar's total is
``--max_images`` or the size in the dataset's metadata, or is left open when neither is known.

Example (embedded OpenMoji data, tiny random VAE)::

    python training/compute_latent_stats.py --vae tiny-cpu --resolution 64 --max_images 512 \
        --plot latent_stats.png --write out/vae-with-stats
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from diffusers_repae.cli import (
    UserError,
    device_name,
    non_empty_path,
    non_negative_float,
    non_negative_int,
    positive_int,
    refuse_overwrite,
    run_cli,
    seed_int,
)
from diffusers_repae.training.data import build_dataloader, real_images
from diffusers_repae.training.latent_cache import load_vae
from diffusers_repae.training.latent_stats import (
    RunningChannelStats,
    compare_stats,
    config_latent_stats,
    encode_posterior,
    plot_comparison,
    with_latent_stats,
)
from diffusers_repae.training_args import add_data_args, training_data_from_args, vae_encoding_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = vae_encoding_parser(__doc__)
    add_data_args(parser)
    parser.add_argument("--batch_size", type=positive_int, default=32, help="Images per VAE forward pass.")
    parser.add_argument(
        "--max_images", type=positive_int, default=None, help="Stop after this many images (default: all)."
    )
    parser.add_argument(
        "--use", type=str, default="sample", choices=["sample", "mean"], help="Posterior samples or means."
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="Seed of the data order and the posterior noise.")
    parser.add_argument("--num_workers", type=non_negative_int, default=0, help="DataLoader worker processes.")
    parser.add_argument(
        "--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu", help="Device."
    )
    parser.add_argument(
        "--plot", type=non_empty_path, default="latent_stats.png", help="Where to save the comparison plot."
    )
    parser.add_argument(
        "--tolerance",
        type=non_negative_float,
        default=0.1,
        help="Summary distance under which the config statistics are kept.",
    )
    parser.add_argument(
        "--write", type=str, default=None, help="Save a copy of the VAE with the measured statistics to this folder."
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing --write folder or --plot file (never the input --vae).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    inputs = {"--vae": args.vae, "--train_data_dir": args.train_data_dir}
    if args.write:  # the statistics go into a copy: never into the VAE that was measured
        refuse_overwrite(args.write, "--write", inputs, args.overwrite)
    refuse_overwrite(args.plot, "--plot", inputs, overwrite=args.overwrite)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max_images must be >= 1, got {args.max_images}.")
    data = training_data_from_args(args, seed=args.seed)
    dataloader = build_dataloader(data, args.batch_size, args.num_workers, seed=args.seed, drop_last=False)
    vae = load_vae(args.vae, seed=args.seed).to(args.device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    running = RunningChannelStats()
    total = data.num_to_read(args.max_images)  # None: a stream of unknown length, read to its end
    print(f"{data.source}: {data.describe_size()}; measuring " + (f"at most {total:,}" if total else "all of them"))
    seen = measured = skipped = 0
    with torch.no_grad(), tqdm(total=total, desc="encoding", unit="img") as progress:
        for batch in dataloader:
            if total is not None:
                batch = {k: v[: total - seen] for k, v in batch.items()}
            good, bad = real_images(batch, data.streaming)  # map-style stand-ins for bad files are left out
            seen += len(good)
            skipped += bad
            progress.update(len(good))
            if good.any():
                mean, std = encode_posterior(vae, batch["pixel_values"][good])
                noise = torch.randn(mean.shape, generator=generator).to(mean.device)
                running.update((mean + std * noise) if args.use == "sample" else mean)
                measured += int(good.sum())
            if total is not None and seen >= total:
                break
    if measured == 0:
        raise UserError(f"no readable images in {data.source}: nothing to measure ({skipped} bad files).")
    stats = running.result()
    config_mean, config_std = config_latent_stats(vae, stats.mean.numel())
    comparison = compare_stats(stats, config_mean, config_std)
    print(
        f"{measured} images from {data.source} at {args.resolution} px, {args.use} latents; {skipped} bad files "
        "skipped"
    )
    print(comparison.table())
    print(comparison.recommendation(args.tolerance))
    plot_comparison(comparison, args.plot)
    print(f"plot saved to {args.plot}")
    if args.write:
        with_latent_stats(vae, stats).save_pretrained(args.write)
        print(f"VAE with latents_mean/latents_std (scaling_factor 1.0) saved to {args.write}")


if __name__ == "__main__":
    run_cli(main)

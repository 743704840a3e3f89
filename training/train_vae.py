#!/usr/bin/env python
"""Stage 1 of latent diffusion: a KL autoencoder trained with L1 + LPIPS + KL + PatchGAN (SPEC section 6).

    accelerate launch training/train_vae.py --recipe sit-xl-2-sdvae --dataset_name ILSVRC/imagenet-1k \
        --streaming --output_dir my-vae

    # offline, on your own image folder, taming/LDM's adaptive GAN weight, GAN from step 5000
    python training/train_vae.py --recipe tiny-cpu --train_data_dir ./my_images --resolution 64 --no_lpips \
        --adaptive_disc_weight --disc_start 5000 --mixed_precision no --output_dir my-vae

The loss is the one `train_repae.py` optimises, minus the alignment term: the same `VAEReconstructionLoss`
and discriminator update (``diffusers_repae.training.vae_step``). The architecture comes from the recipe's
``vae/config.json`` (or ``--vae`` to continue from a trained AutoencoderKL). At the end ``--output_dir`` holds a
plain diffusers ``AutoencoderKL`` (``config.json`` + safetensors) whose ``latents_mean``/``latents_std`` are
measured on the training data (posterior samples, ``scaling_factor`` 1.0), so it drops into
``train_ldm.py --vae`` and ``train_repae.py --vae`` as it is; plus ``discriminator/``, ``reconstructions.png``
(real | reconstruction pairs), ``loss_curves.png`` and a model card.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
from accelerate.logging import get_logger

from diffusers_repae import training_args as flags
from diffusers_repae.cli import run_cli
from diffusers_repae.training.builders import (
    build_vae_loss,
    enable_gradient_checkpointing,
    load_starting_discriminator,
    load_starting_vae,
)
from diffusers_repae.training.checkpointing import RunSettings
from diffusers_repae.training.latent_stats import dataset_latent_stats, with_latent_stats
from diffusers_repae.training.loop import (
    finish_run,
    load_data,
    prepare_run_state,
    resume_and_start_trackers,
    run_training_loop,
    setup_accelerator,
)
from diffusers_repae.training.model_card import VAE_TAGS, save_model_card
from diffusers_repae.training.optim import linear_decay_factor, make_adamw
from diffusers_repae.training.repae_step import RepaEHyperParameters, RepaEModels, VAEWithPosterior
from diffusers_repae.training.vae_step import VAEWithFrozenEncoder, reconstruction_pairs, vae_train_step
from diffusers_repae.training.validation import grid_image

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.training_parser(
        "Train a KL autoencoder (L1 + LPIPS + KL + PatchGAN) and export a diffusers AutoencoderKL.", __doc__
    )
    models = parser.add_argument_group("model")
    flags.add_recipe_arg(
        models,
        "sit-xl-2-sdvae",
        "Recipe (pipelines/ name or folder) whose vae/config.json gives the architecture (random weights).",
    )
    flags.add_vae_arg(
        models, "Start from this AutoencoderKL folder (or a pipeline folder with vae/) instead of random weights."
    )
    decoder = parser.add_argument_group(
        "decoder fine-tuning: a sharper decoder for a fixed latent space (e.g. after REPA-E stages 1 and 2)"
    )
    decoder.add_argument(
        "--freeze_encoder",
        action="store_true",
        help="Train only the decoder (and post_quant_conv) of --vae; the encoder, and so the latents a diffusion "
        "model was trained on, stay fixed, and the exported VAE keeps --vae's latents_mean/latents_std.",
    )
    decoder.add_argument(
        "--decoder_latent_noise",
        type=float,
        default=0.0,
        help="With --freeze_encoder: decode latents plus Gaussian noise of up to this times each channel's "
        "latents_std (per image, uniformly drawn), so that the decoder also decodes a diffusion model's imperfect "
        "latents well. 0: no noise.",
    )
    decoder.add_argument(
        "--lr_decay_start",
        type=int,
        default=None,
        help="From this step on, every learning rate decays linearly to 0 at --max_train_steps (on top of "
        "--lr_scheduler). Default: no decay.",
    )
    flags.add_vae_loss_args(parser)
    opt, log = flags.add_run_args(parser, tracker_project_name="train_vae")
    log.add_argument(
        "--num_validation_images",
        type=int,
        default=8,
        help="Images in the real | reconstruction validation grid.",
    )
    log.add_argument(
        "--latent_stats_images",
        type=int,
        default=10_000,
        help="Training images whose latents give the exported latents_mean/latents_std (0: all of them).",
    )
    flags.add_data_args(parser)
    parser.set_defaults(output_dir="vae-output", validation_steps=1000)
    args = parser.parse_args(argv)
    flags.check_vae_loss_args(args)
    flags.check_run_args(args)
    if args.num_validation_images < 1 or args.latent_stats_images < 0:
        raise ValueError("--num_validation_images must be >= 1 and --latent_stats_images >= 0.")
    if args.freeze_encoder and args.vae is None:
        raise ValueError("--freeze_encoder fine-tunes the decoder of a trained VAE: pass --vae.")
    if args.decoder_latent_noise and not args.freeze_encoder:
        raise ValueError("--decoder_latent_noise only applies with --freeze_encoder.")
    if not math.isfinite(args.decoder_latent_noise) or args.decoder_latent_noise < 0:
        raise ValueError(f"--decoder_latent_noise must be a finite number >= 0, got {args.decoder_latent_noise}.")
    if args.lr_decay_start is not None and not 0 <= args.lr_decay_start < args.max_train_steps:
        raise ValueError(
            f"--lr_decay_start must be in [0, --max_train_steps={args.max_train_steps}), got {args.lr_decay_start}."
        )
    return args


def validation_batch(data, count: int) -> torch.Tensor:
    """The first ``count`` training images (uint8 ``[N, 3, H, W]``): the same ones at every validation."""
    images = []
    for i, sample in enumerate(data.dataset.from_start()):
        if i >= count:
            break
        images.append(sample["pixel_values"])
    return torch.stack(images)


def save_reconstructions(vae, images: torch.Tensor, path: Path) -> None:
    """Real | reconstruction pairs, four pairs per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(reconstruction_pairs(vae, images), columns=8).save(path)


def measured_latent_stats(args, vae, data):
    """Per-channel statistics of the trained VAE's posterior samples over the (first N) training images, in dataset
    order with epoch 0's flips (the same images whenever training stopped)."""
    loader = torch.utils.data.DataLoader(data.dataset.from_start(), batch_size=64, shuffle=False, num_workers=0)
    generator = torch.Generator().manual_seed(args.seed)
    return dataset_latent_stats(vae, loader, generator=generator, max_images=args.latent_stats_images or None)


def statistics_sentence(args, stats) -> str:
    """What the model card says about the decoder fine-tuning (if any) and where latents_mean/std come from."""
    if stats is None:
        noise = f", on latents plus noise of up to {args.decoder_latent_noise} x latents_std" * bool(
            args.decoder_latent_noise
        )
        decay = f" The learning rates decayed linearly to 0 from step {args.lr_decay_start}." * (
            args.lr_decay_start is not None
        )
        return (
            f"Only the decoder was trained (encoder frozen{noise}), so the latent space, and `latents_mean` / "
            f"`latents_std`, are those of `{args.vae}`.{decay}"
        )
    return (
        f"`latents_mean` / `latents_std` were measured on {stats.count:,} latent values per channel (posterior "
        "samples of the training images)."
    )


def model_card(args, data, stats, num_params: int, global_step: int, global_batch: int) -> str:
    """Body of the README.md (metadata: `save_model_card`): what was trained, with which losses, on what."""
    gan = (
        "never active" if args.disc_start >= global_step or args.disc_weight == 0
        else f"from step {args.disc_start}, weight {args.disc_weight}"
        + (" x the adaptive (gradient-ratio) weight" if args.adaptive_disc_weight else "")
    )  # fmt: skip
    lines = [
        f"# KL autoencoder ({Path(args.output_dir).name})",
        "",
        f"Trained with `training/train_vae.py` from {args.vae or f'recipe `{args.recipe}` (random init)'} for "
        f"{global_step} steps (global batch {global_batch}, {args.resolution} px) on `{data.source}`. "
        f"{num_params:,} parameters.",
        "",
        f"Loss: {args.l1_weight} x L1 + {args.lpips_weight} x LPIPS + {args.kl_weight} x KL + PatchGAN hinge ({gan}).",
        "",
        statistics_sentence(args, stats) + " Load it with",
        "```py",
        "from diffusers import AutoencoderKL",
        f'vae = AutoencoderKL.from_pretrained("{args.output_dir}")',
        "```",
        "and use it with `train_ldm.py --vae` or `train_repae.py --vae`.",
        "",
    ]
    if args.lpips_weight == 0:
        lines += ["**Trained without the LPIPS perceptual term** (`--lpips_weight 0`): expect blurrier images.", ""]
    if data.attribution:
        lines += ["## Training data licence", "", data.attribution, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    run = flags.run_config(args)
    output_dir = Path(args.output_dir)
    accelerator = setup_accelerator(run)
    data, dataloader = load_data(accelerator, run, flags.dataset_options(args))
    validation_images = validation_batch(data, args.num_validation_images) if accelerator.is_main_process else None

    vae = load_starting_vae(args.vae, args.recipe)
    discriminator = load_starting_discriminator(args.discriminator_checkpoint, args.disc_ndf, args.disc_layers)
    vae_loss = build_vae_loss(accelerator.device, **flags.vae_loss_options(args))
    if args.freeze_encoder:
        vae_module = VAEWithFrozenEncoder(vae, args.decoder_latent_noise)
    else:
        vae_module = VAEWithPosterior(vae)
    enable_gradient_checkpointing(args.gradient_checkpointing, vae)
    trainable = [p for p in vae_module.parameters() if p.requires_grad]
    adamw = flags.adamw_options(args)
    optimizer_vae = make_adamw(trainable, args.vae_learning_rate, **adamw)
    optimizer_disc = make_adamw(discriminator.parameters(), args.disc_learning_rate, **adamw)
    vae_module, discriminator, optimizer_vae, optimizer_disc = accelerator.prepare(
        vae_module, discriminator, optimizer_vae, optimizer_disc
    )
    models = RepaEModels(
        vae=vae_module, discriminator=discriminator, vae_loss=vae_loss, optimizer_vae=optimizer_vae,
        optimizer_disc=optimizer_disc,
    )  # fmt: skip
    settings = RunSettings(recipe=str(args.vae or args.recipe), resolution=args.resolution)
    dataloader, generators, history = prepare_run_state(accelerator, run, data, dataloader, settings)
    hp = RepaEHyperParameters(max_grad_norm=args.max_grad_norm)

    global_step, resume = resume_and_start_trackers(run, accelerator, flags.tracker_config(args))
    num_params = sum(p.numel() for p in vae.parameters())
    logger.info(f"***** VAE training: {num_params:,} parameters, {data.source}, {args.max_train_steps} steps *****")

    def step_fn(batch: dict, step: int) -> dict:
        return vae_train_step(accelerator, models, hp, batch, generators.generator, step)

    def validate(step: int) -> None:
        save_reconstructions(vae, validation_images, output_dir / "validation" / f"step-{step:07d}.png")

    optimizers = {"vae": optimizer_vae, "disc": optimizer_disc}
    lr_factors = None
    if args.lr_decay_start is not None:
        decay = linear_decay_factor(args.lr_decay_start, args.max_train_steps)
        lr_factors = {"vae": decay, "disc": decay}
    global_step = run_training_loop(
        run, accelerator, data, dataloader, step_fn, optimizers, history, global_step, resume, validate,
        postfix_keys=("vae/loss", "disc/loss"), lr_factors=lr_factors,
    )  # fmt: skip

    def export(output_dir: Path) -> str:
        trained = accelerator.unwrap_model(vae_module).vae.eval()
        if args.freeze_encoder:  # the latent space is --vae's: so are its statistics
            stats = None
            trained.save_pretrained(output_dir)
        else:
            stats = measured_latent_stats(args, trained, data)
            with_latent_stats(trained, stats).save_pretrained(output_dir)
        accelerator.unwrap_model(discriminator).save_pretrained(output_dir / "discriminator")
        save_reconstructions(trained, validation_images, output_dir / "reconstructions.png")
        global_batch = run.global_batch_size(accelerator.num_processes)
        card = model_card(args, data, stats, num_params, global_step, global_batch)
        save_model_card(output_dir, card, data.source, base_model=args.vae, tags=VAE_TAGS)
        origin = " (those of --vae: its encoder was frozen)" if stats is None else ""
        config = trained.config
        return (
            f"AutoencoderKL saved to {output_dir}: latents_mean {config.latents_mean}, latents_std "
            f"{config.latents_std}{origin}"
        )

    return finish_run(accelerator, run, history, export)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)

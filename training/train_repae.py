#!/usr/bin/env python
"""End-to-end REPA-E training: VAE + SiT + PatchGAN discriminator together (SPEC section 7).

    accelerate launch training/train_repae.py --recipe sit-xl-2-sdvae --vae path/to/sdvae-hf \
        --dataset_name ILSVRC/imagenet-1k --streaming --mixed_precision fp16 --output_dir repae-sit-xl-2

Each step: the VAE is updated with its reconstruction losses plus 1.5 x the REPA alignment loss through the
frozen, eval-mode SiT (align-only pass); the discriminator with the hinge loss; the SiT with denoising +
0.5 x alignment on the detached latents (same t and noise); then the EMA of the SiT and of the latent
BatchNorm statistics. At the end a complete `RepaEPipeline` is written to --output_dir.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from accelerate.logging import get_logger

from diffusers_repae import LatentBatchNorm, RepaEPipeline, build_component, load_component_config
from diffusers_repae import training_args as flags
from diffusers_repae.cli import non_negative_float, refuse_moved_flags, unit_interval
from diffusers_repae.schedulers import scheduler_for_path_type
from diffusers_repae.training.ablation_steps import check_naive_end_to_end_setup, naive_end_to_end_step
from diffusers_repae.training.builders import (
    build_vae_loss,
    enable_gradient_checkpointing,
    latent_size,
    load_starting_discriminator,
    load_starting_vae,
)
from diffusers_repae.training.checkpointing import RunSettings
from diffusers_repae.training.ema import ModelEMA
from diffusers_repae.training.export import recipe_sampling_defaults, vae_with_stats
from diffusers_repae.training.loop import (
    autocast_dtype,
    finish_run,
    load_data,
    prepare_run_state,
    resume_and_start_trackers,
    run_training_loop,
    setup_accelerator,
)
from diffusers_repae.training.model_card import PIPELINE_TAGS, save_model_card
from diffusers_repae.training.optim import make_adamw
from diffusers_repae.training.repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    VAEWithPosterior,
    ema_target,
    train_step,
)
from diffusers_repae.training.validation import log_validation

logger = get_logger(__name__, log_level="INFO")

# The VAE every recipe starts from (REPA-E always starts end-to-end tuning from a pretrained VAE).
RECIPE_VAES = {
    "sit-xl-2-sdvae": "SD-VAE f8d4 (sdvae-hf)",
    "sit-b-2-sdvae": "SD-VAE f8d4 (sdvae-hf)",
    "sit-xl-1-vavae": "VA-VAE f16d32 (vavae-hf)",
    "sit-xl-1-invae": "IN-VAE f16d32 (invae-hf)",
    "sit-xl-1-e2e-vavae-ldm": "E2E-VA-VAE f16d32 (e2e-vavae-hf; a train_ldm.py recipe)",
    "tiny-cpu": "none published (the CPU demo starts from random weights)",
}


# Options of the single-run demo recipe that became stages of their own: where each one lives now (RUN: this
# script's --output_dir).
STAGE_2 = "stage 2, a SiT on the frozen end-to-end VAE, is train_ldm.py --pretrained_model_name_or_path RUN"
DECODER = "decoder fine-tuning on the frozen encoder is train_vae.py --vae RUN --freeze_encoder"
MOVED_FLAGS = {
    "--vae_freeze_step": STAGE_2,
    "--cache_frozen_targets": STAGE_2 + " --latents_dir (made by cache_latents.py --vae RUN)",
    "--sit_lr_decay_start": STAGE_2 + " --lr_scheduler linear",
    "--train_decoder_after_freeze": DECODER,
    "--decoder_latent_noise": DECODER + " --decoder_latent_noise",
    "--decoder_only_step": DECODER + " --lr_decay_start",
    "--vae_warmup_steps": "a VAE trained from scratch first is training/train_vae.py; pass its output as --vae",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.training_parser("End-to-end REPA-E training (VAE + SiT + discriminator).")
    # models
    flags.add_recipe_arg(
        parser,
        "sit-xl-2-sdvae",
        "Recipe name in pipelines/ (e.g. sit-xl-2-sdvae, tiny-cpu) or a folder in RepaEPipeline layout; the "
        "SiT, projector, VAE and scheduler configs come from it.",
    )
    flags.add_vae_arg(
        parser,
        "Starting VAE: an AutoencoderKL folder (or a pipeline folder with vae/), e.g. REPA-E's *-hf VAEs. "
        "Its latents_mean/latents_std, when present, initialise the latent BatchNorm. Every REPA-E recipe starts "
        "from a pretrained VAE: "
        + "; ".join(f"{recipe}: {vae}" for recipe, vae in RECIPE_VAES.items())
        + ". Without --vae the recipe's VAE starts from RANDOM weights (a loud warning says so).",
    )
    parser.add_argument(
        "--vae_align_proj_coeff",
        type=non_negative_float,
        default=1.5,
        help="Alignment weight in the VAE loss (end-to-end).",
    )
    parser.add_argument("--bn_momentum", type=unit_interval, default=0.1, help="Momentum of the latent BatchNorm.")
    flags.add_vae_loss_args(parser)
    flags.add_sit_training_args(parser, tracker_project_name="train_repae")
    flags.add_data_args(parser)
    research = parser.add_argument_group("ablation (research only: NOT REPA-E)")
    research.add_argument(
        "--ablation",
        choices=["naive_e2e"],
        default=None,
        help="naive_e2e: the paper's negative control, for benchmarks/ablation.py: the SiT's denoising loss flows "
        "into the VAE (no stop-gradient) and the alignment loss does not, which is expected to collapse the latent "
        "space. Never train a model with it. One process, no gradient accumulation.",
    )
    refuse_moved_flags(argv, MOVED_FLAGS, "an option of train_repae.py")
    args = parser.parse_args(argv)

    flags.check_vae_loss_args(args)
    flags.check_sit_training_args(args)
    return args


def build_pipeline(args, accelerator, models: RepaEModels, data) -> RepaEPipeline:
    """RepaEPipeline from the EMA SiT and the VAE carrying the EMA BatchNorm statistics."""
    vae = vae_with_stats(accelerator.unwrap_model(models.vae).vae, models.ema.model["latent_norm"])
    return RepaEPipeline(
        transformer=models.ema.model["transformer"],
        vae=vae,
        scheduler=scheduler_for_path_type(build_component(args.recipe, "scheduler"), args.path_type),
        id2label={str(k): v for k, v in data.id2label.items()},
        **recipe_sampling_defaults(args.recipe),
    )


def model_card(args, data, num_params: dict[str, int], global_step: int, global_batch: int) -> str:
    """Body of the exported pipeline's README.md (metadata: `save_model_card`): what was trained, how, on what."""
    lines = [
        f"# REPA-E end-to-end training output ({Path(args.output_dir).name})",
        "",
        f"Trained with `training/train_repae.py` from recipe `{args.recipe}` for {global_step} steps "
        f"(global batch {global_batch}, {args.resolution} px) on `{data.source}` "
        f"({data.num_classes} classes), aligned with `{args.enc_type}` after SiT block {args.encoder_depth}.",
        "",
        "The transformer is the EMA SiT; the VAE carries the EMA latent BatchNorm statistics as "
        "`latents_mean` / `latents_std`.",
        "",
        f"Parameters: {', '.join(f'{k} {v:,}' for k, v in num_params.items())}.",
        "",
        "```py",
        "from diffusers_repae import RepaEPipeline",
        f'pipe = RepaEPipeline.from_pretrained("{args.output_dir}")',
        "images = pipe(class_labels=[0, 1, 2]).images",
        "```",
        "",
    ]
    if args.ablation:
        lines += [
            f"**ABLATION, NOT REPA-E** (`--ablation {args.ablation}`): the SiT's denoising loss trained the VAE "
            "(no stop-gradient) and the alignment loss did not; a negative control, not a model to use.",
            "",
        ]
    if args.lpips_weight == 0:
        lines += [
            "**The VAE was trained without the LPIPS perceptual term** (`--lpips_weight 0`): torchvision's VGG16 "
            "weights could not be had offline. Expect blurrier reconstructions than REPA-E's recipe.",
            "",
        ]
    if args.disc_start >= global_step:
        lines += [
            f"**The GAN terms never became active** (`--disc_start {args.disc_start}` >= {global_step} steps): the "
            "VAE was tuned without the adversarial loss.",
            "",
        ]
    elif args.disc_start > 0:
        adaptive = getattr(args, "adaptive_disc_weight", False)
        lines += [
            f"The GAN terms were active from step {args.disc_start} on (`--disc_start`), weighted "
            + ("adaptively as in taming/LDM" if adaptive else "by a fixed factor")
            + f" (`--disc_weight {args.disc_weight}`).",
            "",
        ]
    if data.attribution:
        lines += ["## Training data licence", "", data.attribution, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    run = flags.run_config(args)
    accelerator = setup_accelerator(run)
    data, dataloader = load_data(accelerator, run, flags.dataset_options(args))

    # Models from the recipe.
    if args.vae is None:
        expected = RECIPE_VAES.get(Path(args.recipe).name, "the pretrained VAE of its family")
        logger.warning(
            f"\n{'!' * 100}\nNO --vae: the VAE starts from RANDOM weights, unlike every REPA-E recipe, which starts "
            f"from a pretrained VAE (recipe {args.recipe!r}: {expected}).\nPass --vae PATH unless a random "
            f"start is what you want.\n{'!' * 100}"
        )
    vae = load_starting_vae(args.vae, args.recipe)
    size = latent_size(vae, args.resolution)
    transformer = build_component(
        args.recipe, "transformer", num_classes=data.num_classes, sample_size=size, class_dropout_prob=args.cfg_prob
    )
    if transformer.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"recipe SiT in_channels {transformer.config.in_channels} != VAE latent_channels "
            f"{vae.config.latent_channels}."
        )
    projector_config = load_component_config(args.recipe, "projector")
    args.encoder_depth = args.encoder_depth or projector_config["encoder_depth"]
    num_tokens = (size // transformer.config.patch_size) ** 2
    from diffusers_repae.training.encoders import load_vision_encoders

    with accelerator.main_process_first():
        encoders = load_vision_encoders(
            args.enc_type,
            args.resolution,
            num_tokens,
            accelerator.device,
            local_paths=flags.parse_encoder_paths(args.encoder_paths),
            autocast_dtype=autocast_dtype(accelerator),  # targets under the training's autocast, as the original
        )
    projector = build_component(
        args.recipe,
        "projector",
        hidden_size=transformer.config.hidden_size,
        z_dims=[encoder.z_dim for encoder in encoders],
        encoder_depth=args.encoder_depth,
        **({"projector_dim": args.projector_dim} if args.projector_dim else {}),
    )
    discriminator = load_starting_discriminator(args.discriminator_checkpoint, args.disc_ndf, args.disc_layers)
    latent_norm = LatentBatchNorm(vae.config.latent_channels, momentum=args.bn_momentum)
    if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
        latent_norm.load_latents_stats(vae.config.latents_mean, vae.config.latents_std)
        logger.info("latent BatchNorm initialised from the VAE's latents_mean/latents_std")
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        latent_norm = torch.nn.SyncBatchNorm.convert_sync_batchnorm(latent_norm)
    latent_norm.to(accelerator.device)

    vae_loss = build_vae_loss(accelerator.device, **flags.vae_loss_options(args))

    vae_module = VAEWithPosterior(vae)
    enable_gradient_checkpointing(args.gradient_checkpointing, transformer, vae)
    adamw = flags.adamw_options(args)
    optimizer_vae = make_adamw(vae_module.parameters(), args.vae_learning_rate, **adamw)
    optimizer_disc = make_adamw(discriminator.parameters(), args.disc_learning_rate, **adamw)
    sit_params = list(transformer.parameters()) + list(projector.parameters())
    optimizer_sit = make_adamw(sit_params, args.learning_rate, **adamw)
    if args.compile:
        transformer = torch.compile(transformer)
    (vae_module, transformer, projector, discriminator, optimizer_vae, optimizer_disc, optimizer_sit) = (
        accelerator.prepare(
            vae_module, transformer, projector, discriminator, optimizer_vae, optimizer_disc, optimizer_sit
        )
    )
    models = RepaEModels(
        vae=vae_module,
        transformer=transformer,
        projector=projector,
        discriminator=discriminator,
        latent_norm=latent_norm,
        encoders=encoders,
        vae_loss=vae_loss,
        optimizer_vae=optimizer_vae,
        optimizer_disc=optimizer_disc,
        optimizer_sit=optimizer_sit,
    )
    models.ema = ModelEMA(ema_target(accelerator, models), decay=args.ema_decay)  # starts as an exact copy
    # The latent BN has no parameters (DDP refuses it), so it is registered like the EMA and the RNG streams.
    settings = RunSettings(  # the ablation too: resuming an ablation run must not continue it as REPA-E
        recipe=str(args.recipe),
        resolution=args.resolution,
        num_classes=data.num_classes,
        path_type=args.path_type,
        ablation=args.ablation,
    )
    dataloader, generators, history = prepare_run_state(
        accelerator, run, data, dataloader, settings, latent_norm=latent_norm, ema=models.ema
    )
    hp = RepaEHyperParameters(
        encoder_depth=args.encoder_depth,
        proj_coeff=args.proj_coeff,
        vae_align_proj_coeff=args.vae_align_proj_coeff,
        path_type=args.path_type,
        weighting=args.weighting,
        cfg_prob=args.cfg_prob,
        max_grad_norm=args.max_grad_norm,
    )

    global_step, resume = resume_and_start_trackers(run, accelerator, flags.tracker_config(args))
    num_params = {
        "sit": sum(p.numel() for p in accelerator.unwrap_model(transformer).parameters()),
        "projector": sum(p.numel() for p in accelerator.unwrap_model(projector).parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "discriminator": sum(p.numel() for p in accelerator.unwrap_model(discriminator).parameters()),
    }
    logger.info(f"***** REPA-E training: {num_params}, {data.describe_size()}, {data.num_classes} classes *****")
    logger.info(
        f"  global batch {run.global_batch_size(accelerator.num_processes)} = {accelerator.num_processes} "
        f"processes x {run.train_batch_size} x {run.gradient_accumulation_steps} accumulation; "
        f"{run.max_train_steps} steps"
    )

    step = train_step
    if args.ablation == "naive_e2e":
        check_naive_end_to_end_setup(accelerator.num_processes, run.gradient_accumulation_steps)
        logger.warning("ABLATION --ablation naive_e2e: NOT REPA-E (denoising loss into the VAE, no alignment)")
        step = naive_end_to_end_step

    def step_fn(batch: dict, step_index: int) -> dict:
        return step(accelerator, models, hp, batch, generators.generator, step_index)

    def validate(step: int) -> None:
        pipeline = build_pipeline(args, accelerator, models, data)
        log_validation(accelerator, pipeline, data, step, **flags.validation_options(args))

    optimizers = {"sit": optimizer_sit, "vae": optimizer_vae, "disc": optimizer_disc}
    global_step = run_training_loop(
        run, accelerator, data, dataloader, step_fn, optimizers, history, global_step, resume, validate,
        postfix_keys=("sit/loss", "vae/loss"),
    )  # fmt: skip

    def export(output_dir: Path) -> str:
        build_pipeline(args, accelerator, models, data).save_pretrained(output_dir)
        models.ema.model["projector"].save_pretrained(output_dir / "projector")  # the EMA, as the converter's
        accelerator.unwrap_model(discriminator).save_pretrained(output_dir / "discriminator")
        global_batch = run.global_batch_size(accelerator.num_processes)
        card = model_card(args, data, num_params, global_step, global_batch)
        save_model_card(output_dir, card, data.source, base_model=args.vae, tags=PIPELINE_TAGS)
        return f"pipeline saved to {output_dir}"

    return finish_run(accelerator, run, history, export)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers_repae.cli import run_cli

    run_cli(main)  # user errors: one 'error: ...' line, exit 2

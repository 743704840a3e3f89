#!/usr/bin/env python
"""SiT + REPA on a frozen VAE (REPA's recipe; REPA-E's second stage), from cached latents or on the fly.

    # stage 2 of REPA-E: a SiT on the frozen end-to-end tuned VAE, from cached latents
    accelerate launch training/train_ldm.py --recipe sit-xl-1-e2e-vavae-ldm --vae e2e-vavae-hf \
        --latents_dir latents-in1k-256 --dataset_name ILSVRC/imagenet-1k --mixed_precision fp16 \
        --output_dir sit-xl-1-ldm

    # adapt a pretrained pipeline to your own images with LoRA, its classes added to the label table
    accelerate launch training/train_ldm.py --pretrained_model_name_or_path repae-pipeline \
        --train_data_dir ./my_images --new_classes --lora_rank 16 --output_dir my-lora

The VAE never trains: latents are normalised by its config statistics (``latents_mean``/``latents_std``, or
``shift_factor``/``scaling_factor``) through a latent BatchNorm kept in eval mode, as the original
``train_ldm_only.py`` does. Loss: ``mean((v_hat - v)^2) + proj_coeff * alignment``. The vision encoders always
see the images, computed on the fly (see ``benchmarks/`` for what the latent cache saves).

Fine-tuning a pretrained pipeline: ``--lora_rank R`` trains LoRA adapters on every Linear inside the SiT blocks
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``fc1``, ``fc2``, ``adaln_modulation``; choose with
``--lora_target_modules``) and the rows of new classes (``--new_classes``); the rest stays frozen. Without
``--lora_rank`` the whole SiT is fine-tuned (the documented full fine-tune alternative). The trained adapter itself
(its warmed-up EMA with ``--lora_ema``) is saved as diffusers' LoRA file
``OUTPUT_DIR/lora/pytorch_lora_weights.safetensors`` (``transformer.`` keys; the rows and names of new classes in
the same file) and loads with ``pipe.load_lora_weights("OUTPUT_DIR/lora")`` on the pretrained pipeline.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL

from diffusers_repae import LatentBatchNorm, RepaEPipeline, REPAProjector, SiTTransformer2DModel, build_component
from diffusers_repae import training_args as flags
from diffusers_repae.cli import positive_float
from diffusers_repae.recipes import load_component_config
from diffusers_repae.schedulers import scheduler_for_path_type
from diffusers_repae.training.builders import enable_gradient_checkpointing, latent_size
from diffusers_repae.training.checkpointing import RunSettings
from diffusers_repae.training.ema import ModelEMA
from diffusers_repae.training.encoders import load_vision_encoders
from diffusers_repae.training.export import SAMPLING_DEFAULT_KEYS, recipe_sampling_defaults
from diffusers_repae.training.latent_cache import load_latent_cache
from diffusers_repae.training.ldm_step import CachedLatentsWithImages, ldm_train_step
from diffusers_repae.training.loop import (
    autocast_dtype,
    finish_run,
    load_data,
    prepare_run_state,
    resume_and_start_trackers,
    run_training_loop,
    setup_accelerator,
)
from diffusers_repae.training.lora import DEFAULT_LORA_TARGETS, add_sit_lora, grow_class_table, save_sit_lora
from diffusers_repae.training.model_card import PIPELINE_TAGS, save_model_card
from diffusers_repae.training.optim import make_adamw
from diffusers_repae.training.repae_step import RepaEHyperParameters, RepaEModels, ema_target
from diffusers_repae.training.validation import log_validation

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.training_parser("SiT + REPA on a frozen VAE (LDM-only training, fine-tuning and LoRA).", __doc__)
    models = parser.add_argument_group("models")
    flags.add_recipe_arg(
        models,
        "sit-xl-1-e2e-vavae-ldm",
        "Recipe (pipelines/ name or folder) for a SiT trained from scratch: transformer, projector and scheduler "
        "configs. Ignored with --pretrained_model_name_or_path.",
    )
    models.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A RepaEPipeline folder (or Hub id) to fine-tune: its SiT, VAE and scheduler (and projector/ when "
        "present) are the starting point.",
    )
    flags.add_vae_arg(
        models,
        "The frozen VAE: an AutoencoderKL folder or a pipeline folder with vae/ (required when training from a "
        "recipe). Its config statistics normalise the latents.",
    )
    models.add_argument(
        "--latents_dir",
        type=str,
        default=None,
        help="A cache written by cache_latents.py (posterior mean/std per image). Without it the VAE encodes every "
        "batch. The data flags must name the same images (the encoder needs them).",
    )
    lora = parser.add_argument_group("fine-tuning")
    lora.add_argument(
        "--lora_rank", type=int, default=0, help="LoRA rank; 0 (default) trains every SiT weight (full fine-tune)."
    )
    lora.add_argument(
        "--lora_alpha", type=positive_float, default=None, help="LoRA alpha (default: the rank, scale 1)."
    )
    lora.add_argument(
        "--lora_target_modules",
        type=str,
        default=",".join(DEFAULT_LORA_TARGETS),
        help="Comma-separated module names that get adapters (default: every Linear inside the SiT blocks).",
    )
    lora.add_argument(
        "--lora_ema",
        action="store_true",
        help="With --lora_rank: save (and validate) the EMA of the adapter at --ema_decay instead of the trained "
        "adapter itself (the default). Fine-tuning EMAs warm up: decay min(ema_decay, (1 + n) / (10 + n)) at update "
        "n, and only trainable values move, so frozen weights and old label rows stay bit-identical.",
    )
    lora.add_argument(
        "--new_classes",
        action="store_true",
        help="The dataset's classes are new: append them to the pretrained label table (ids num_classes + label) "
        "and train their rows; old rows stay as they were. Without it labels must be existing class ids.",
    )
    flags.add_sit_training_args(parser, tracker_project_name="train_ldm")
    flags.add_data_args(parser)
    args = parser.parse_args(argv)
    flags.check_sit_training_args(args)
    if args.pretrained_model_name_or_path is None and args.vae is None:
        raise ValueError("--vae is required when training from a recipe (no --pretrained_model_name_or_path).")
    if args.lora_rank < 0:
        raise ValueError(f"--lora_rank must be >= 0, got {args.lora_rank}.")
    if args.lora_rank and args.pretrained_model_name_or_path is None:
        raise ValueError("--lora_rank needs a pretrained SiT: pass --pretrained_model_name_or_path.")
    if args.lora_ema and not args.lora_rank:
        raise ValueError("--lora_ema needs --lora_rank (a full fine-tune always keeps its EMA at --ema_decay).")
    if args.new_classes and args.pretrained_model_name_or_path is None:
        raise ValueError("--new_classes extends a pretrained label table: pass --pretrained_model_name_or_path.")
    return args


def load_frozen_vae(args: argparse.Namespace) -> AutoencoderKL:
    """``--vae`` (AutoencoderKL or pipeline folder), else the pretrained pipeline's VAE; frozen, eval mode."""
    source = args.vae or args.pretrained_model_name_or_path
    path = Path(source)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() or args.vae is None else None
    vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder)
    return vae.eval().requires_grad_(False)


def frozen_latent_norm(vae: AutoencoderKL) -> LatentBatchNorm:
    """An eval-mode BN holding the VAE's statistics; ``shift_factor``/``scaling_factor`` VAEs map to mean/std."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        return LatentBatchNorm.from_vae_config(config).eval()
    channels = config.latent_channels
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    std = 1.0 / float(getattr(config, "scaling_factor", None) or 1.0)
    logger.warning(f"the VAE has no latents_mean/latents_std: normalising with shift {shift} and std {std:.5f}")
    return LatentBatchNorm(channels).load_latents_stats([shift] * channels, [std] * channels).eval()


def load_transformer(args: argparse.Namespace, vae: AutoencoderKL, data) -> tuple[SiTTransformer2DModel, int]:
    """The SiT (pretrained or from the recipe) and the id offset of the dataset's labels."""
    if args.pretrained_model_name_or_path is None:
        size = latent_size(vae, args.resolution)
        sit = build_component(
            args.recipe, "transformer", num_classes=data.num_classes, sample_size=size,
            class_dropout_prob=args.cfg_prob,
        )  # fmt: skip
        return sit, 0
    sit = SiTTransformer2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer")
    offset = sit.config.num_classes if args.new_classes else 0
    if not args.new_classes and data.num_classes > sit.config.num_classes:
        raise ValueError(
            f"the dataset has {data.num_classes} classes but the pretrained SiT knows {sit.config.num_classes}; "
            "pass --new_classes to add them."
        )
    return sit, offset


def load_projector(args: argparse.Namespace, sit: SiTTransformer2DModel, encoders) -> REPAProjector:
    """The pretrained pipeline's projector when it matches the encoders, else a fresh one from the recipe."""
    z_dims = [encoder.z_dim for encoder in encoders]
    if args.pretrained_model_name_or_path is not None:
        folder = Path(args.pretrained_model_name_or_path) / "projector"
        if (folder / "config.json").is_file():
            projector = REPAProjector.from_pretrained(folder)
            if list(projector.config.z_dims) == z_dims:
                args.encoder_depth = args.encoder_depth or projector.config.encoder_depth
                return projector
            logger.warning(f"pretrained projector expects z_dims {projector.config.z_dims}, not {z_dims}: new one")
    recipe_depth = load_component_config(args.recipe, "projector")["encoder_depth"]
    args.encoder_depth = min(args.encoder_depth or recipe_depth, sit.config.num_layers)
    overrides = {"projector_dim": args.projector_dim} if args.projector_dim else {}
    return build_component(
        args.recipe, "projector", hidden_size=sit.config.hidden_size, z_dims=z_dims,
        encoder_depth=args.encoder_depth, **overrides,
    )  # fmt: skip


def vae_identity(source: str) -> str:
    """A VAE given as a folder, a pipeline folder (its vae/) or a recipe name -> one comparable string."""
    path = Path(source)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    return str(path.resolve()) if path.exists() else str(source)


def training_dataset(args: argparse.Namespace, data):
    """Image batches for on-the-fly encoding, or cached latent rows joined with their images."""
    if args.latents_dir is None:
        return data.dataset
    if data.streaming:
        raise ValueError("--latents_dir needs random access to the images: drop --streaming.")
    latents, info = load_latent_cache(args.latents_dir)
    vae_source = args.vae or args.pretrained_model_name_or_path
    if vae_identity(info.vae) != vae_identity(vae_source):  # latents of another VAE would train silently wrong
        raise ValueError(
            f"--latents_dir was encoded with the VAE {info.vae!r} but this run uses {vae_source!r}: re-cache with "
            "cache_latents.py --vae of this run, or pass the VAE the cache was made with."
        )
    if info.resolution != args.resolution:
        raise ValueError(f"--latents_dir was cached at {info.resolution} px but --resolution is {args.resolution}.")
    if info.source != data.source or info.num_items > len(data.dataset):
        raise ValueError(
            f"--latents_dir was made from {info.source} ({info.num_items} images) but the data flags give "
            f"{data.source} ({len(data.dataset)} images): name the dataset the cache was made from."
        )
    return CachedLatentsWithImages(latents, data.dataset)


def export_pipeline(models: RepaEModels, vae, scheduler, id2label, settings) -> RepaEPipeline:
    """RepaEPipeline from the EMA SiT and the frozen VAE (whose config statistics it samples with)."""
    return RepaEPipeline(
        transformer=models.ema.model["transformer"],
        vae=vae,
        scheduler=scheduler,
        id2label={str(k): v for k, v in id2label.items()},
        **settings,
    )


def model_card(args, data, num_params: dict[str, int], global_step: int, global_batch: int) -> str:
    """Body of the README.md (metadata: `save_model_card`): what was trained, from what, on what."""
    start = args.pretrained_model_name_or_path or f"recipe `{args.recipe}`"
    mode = f"LoRA rank {args.lora_rank}" if args.lora_rank else "all SiT weights"
    latents = f"from the cache {args.latents_dir}" if args.latents_dir else "encoded on the fly"
    lines = [
        f"# SiT trained on a frozen VAE ({Path(args.output_dir).name})",
        "",
        f"Trained with `training/train_ldm.py` from {start} for {global_step} steps ({mode}; global batch "
        f"{global_batch}, {args.resolution} px) on `{data.source}` ({data.num_classes} classes"
        f"{', added as new classes' if args.new_classes else ''}), aligned with `{args.enc_type}` after SiT block "
        f"{args.encoder_depth}. Latents {latents}.",
        "",
        f"Parameters: {', '.join(f'{k} {v:,}' for k, v in num_params.items())}.",
        "",
    ]
    if args.lora_rank:
        lines += [
            "The LoRA (diffusers' layout; new classes' rows and names in the same file) is in `lora/`:",
            "```py",
            "from diffusers_repae import RepaEPipeline",
            f'pipe = RepaEPipeline.from_pretrained("{args.pretrained_model_name_or_path}")',
            f'pipe.load_lora_weights("{Path(args.output_dir) / "lora"}")',
            "```",
            "",
        ]
    if data.attribution:
        lines += ["## Training data licence", "", data.attribution, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    run = flags.run_config(args)
    accelerator = setup_accelerator(run)
    data, dataloader = load_data(
        accelerator, run, flags.dataset_options(args), wrap=lambda data: training_dataset(args, data)
    )

    vae = load_frozen_vae(args).to(accelerator.device)
    latent_norm = frozen_latent_norm(vae).to(accelerator.device)
    transformer, label_offset = load_transformer(args, vae, data)
    if transformer.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"SiT in_channels {transformer.config.in_channels} != VAE latent_channels {vae.config.latent_channels}."
        )
    num_tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
    with accelerator.main_process_first():
        encoders = load_vision_encoders(
            args.enc_type,
            args.resolution,
            num_tokens,
            accelerator.device,
            local_paths=flags.parse_encoder_paths(args.encoder_paths),
            autocast_dtype=autocast_dtype(accelerator),
        )
    projector = load_projector(args, transformer, encoders)

    id2label: dict[int, str] = {}
    if args.pretrained_model_name_or_path is not None:
        pretrained = RepaEPipeline.from_pretrained(
            args.pretrained_model_name_or_path, vae=vae, transformer=transformer
        )
        id2label, scheduler = dict(pretrained.id2label), pretrained.scheduler
        settings = {k: pretrained.config[k] for k in SAMPLING_DEFAULT_KEYS if k in pretrained.config}
        del pretrained
    else:
        scheduler, settings = build_component(args.recipe, "scheduler"), recipe_sampling_defaults(args.recipe)
    id2label.update({label_offset + k: v for k, v in data.id2label.items()})
    scheduler = scheduler_for_path_type(scheduler, args.path_type)  # the SDE's score depends on the path
    if args.lora_rank:
        add_sit_lora(
            transformer, args.lora_rank, args.lora_alpha, args.lora_target_modules.split(","),
            num_new_classes=data.num_classes if args.new_classes else 0,
        )  # fmt: skip
    elif args.new_classes:
        grow_class_table(transformer, data.num_classes)

    enable_gradient_checkpointing(args.gradient_checkpointing, transformer)
    sit_params = list(transformer.parameters()) + list(projector.parameters())
    optimizer = make_adamw(sit_params, args.learning_rate, **flags.adamw_options(args))
    if args.compile:
        transformer = torch.compile(transformer)
    transformer, projector, optimizer = accelerator.prepare(transformer, projector, optimizer)
    models = RepaEModels(
        transformer=transformer, projector=projector, latent_norm=latent_norm, encoders=encoders,
        optimizer_sit=optimizer,
    )  # fmt: skip
    # LoRA saves the trained adapter itself unless --lora_ema (decay 0: the copy follows it exactly); fine-tuning
    # a pretrained SiT warms the EMA up, training from a recipe uses the original's plain EMA.
    ema_decay = 0.0 if args.lora_rank and not args.lora_ema else args.ema_decay
    fine_tuning = args.pretrained_model_name_or_path is not None
    models.ema = ModelEMA(ema_target(accelerator, models), decay=ema_decay, warmup=fine_tuning)
    run_settings = RunSettings(
        recipe=str(args.pretrained_model_name_or_path or args.recipe), resolution=args.resolution,
        num_classes=len(id2label), lora_rank=args.lora_rank, path_type=args.path_type,
    )  # fmt: skip
    dataloader, generators, history = prepare_run_state(
        accelerator, run, data, dataloader, run_settings, ema=models.ema
    )
    hp = RepaEHyperParameters(
        encoder_depth=args.encoder_depth,
        proj_coeff=args.proj_coeff,
        path_type=args.path_type,
        weighting=args.weighting,
        cfg_prob=args.cfg_prob,
        max_grad_norm=args.max_grad_norm,
        freeze_latent_norm=True,
    )

    global_step, resume = resume_and_start_trackers(run, accelerator, flags.tracker_config(args))
    unwrapped = accelerator.unwrap_model(transformer)
    num_params = {
        "sit": sum(p.numel() for p in unwrapped.parameters()),
        "sit_trainable": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        "projector": sum(p.numel() for p in accelerator.unwrap_model(projector).parameters()),
    }
    logger.info(f"***** LDM training: {num_params}, {data.describe_size()}, {len(id2label)} classes *****")

    def step_fn(batch: dict, step: int) -> dict:
        if label_offset:
            batch = {**batch, "labels": batch["labels"] + label_offset}
        return ldm_train_step(accelerator, models, hp, batch, vae, generators.generator)

    def validate(step: int) -> None:
        pipeline = export_pipeline(models, vae, scheduler, id2label, settings)
        log_validation(accelerator, pipeline, data, step, **flags.validation_options(args))

    global_step = run_training_loop(
        run, accelerator, data, dataloader, step_fn, {"sit": optimizer}, history, global_step, resume, validate
    )

    def export(output_dir: Path) -> str:
        if args.lora_rank:
            base_num_classes = label_offset if args.new_classes else None
            save_sit_lora(models.ema.model["transformer"], output_dir / "lora", id2label, base_num_classes)
        else:
            export_pipeline(models, vae, scheduler, id2label, settings).save_pretrained(output_dir)
        models.ema.model["projector"].save_pretrained(output_dir / "projector")  # the EMA, as the converter's
        card = model_card(args, data, num_params, global_step, run.global_batch_size(accelerator.num_processes))
        base_model = args.pretrained_model_name_or_path or args.vae
        tags = [*PIPELINE_TAGS, "lora"] if args.lora_rank else PIPELINE_TAGS
        save_model_card(output_dir, card, data.source, base_model=base_model, tags=tags)
        return f"saved to {output_dir}"

    return finish_run(accelerator, run, history, export)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers_repae.cli import run_cli

    run_cli(main)  # user errors: one 'error: ...' line, exit 2

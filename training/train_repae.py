#!/usr/bin/env python
"""End-to-end REPA-E training: VAE + SiT + PatchGAN discriminator together (SPEC section 7).

    accelerate launch training/train_repae.py --recipe sit-xl-2-sdvae --vae path/to/sdvae-hf \
        --dataset_name ILSVRC/imagenet-1k --streaming --output_dir repae-sit-xl-2

Each step: the VAE is updated with its reconstruction losses plus 1.5 x the REPA alignment loss through the
frozen, eval-mode SiT (align-only pass); the discriminator with the hinge loss; the SiT with denoising +
0.5 x alignment on the detached latents (same t and noise); then the EMA of the SiT and of the latent
BatchNorm statistics. At the end a complete `RepaEPipeline` is written to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffusers_repae import LatentBatchNorm, RepaEPipeline, build_component, load_component_config, resolve_recipe
from diffusers_repae.models.discriminator import PatchGANDiscriminator
from diffusers_repae.training.checkpointing import (
    LossHistory,
    PerProcessState,
    ProcessGenerators,
    all_finite,
    checkpoint_step,
    remove_incomplete_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from diffusers_repae.training.data import add_data_args, build_dataloader, training_data_from_args
from diffusers_repae.training.ema import ModelEMA
from diffusers_repae.training.losses import PATH_TYPES, WEIGHTINGS, VAEReconstructionLoss, load_lpips
from diffusers_repae.training.repae_step import (
    RepaEHyperParameters,
    RepaEModels,
    VAEWithPosterior,
    ema_target,
    train_step,
)

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end REPA-E training (VAE + SiT + discriminator).")
    # models
    parser.add_argument(
        "--recipe",
        type=str,
        default="sit-xl-2-sdvae",
        help="Recipe name in pipelines/ (e.g. sit-xl-2-sdvae, tiny-cpu) or a folder in RepaEPipeline layout; the "
        "SiT, projector, VAE and scheduler configs come from it.",
    )
    parser.add_argument(
        "--vae",
        type=str,
        default=None,
        help="Starting VAE: an AutoencoderKL folder (or a pipeline folder with vae/), e.g. REPA-E's *-hf VAEs. "
        "Without it the recipe's VAE starts from random weights. Its latents_mean/latents_std, when present, "
        "initialise the latent BatchNorm.",
    )
    parser.add_argument(
        "--discriminator_checkpoint",
        type=str,
        default=None,
        help="Starting discriminator: a PatchGANDiscriminator folder (save_pretrained) or a .safetensors file.",
    )
    parser.add_argument("--disc_ndf", type=int, default=64, help="Channels of the discriminator's first conv.")
    parser.add_argument("--disc_layers", type=int, default=3, help="Strided blocks of the PatchGAN discriminator.")
    parser.add_argument(
        "--enc_type",
        type=str,
        default="dinov2-vit-b",
        help="Vision encoder(s) to align with, comma separated (e.g. dinov2-vit-b, efficientnet-lite0).",
    )
    parser.add_argument(
        "--encoder_paths",
        type=str,
        nargs="*",
        default=None,
        help="Local encoder folders instead of the Hub, as NAME=PATH (e.g. dinov2-vit-b=/models/dinov2-base).",
    )
    parser.add_argument(
        "--encoder_depth",
        type=int,
        default=None,
        help="SiT block (1-based) whose tokens are aligned. Default: the recipe's projector config (8 for XL).",
    )
    parser.add_argument(
        "--projector_dim", type=int, default=None, help="Hidden width of the projector MLP (default: recipe, 2048)."
    )
    # REPA-E objective
    parser.add_argument("--proj_coeff", type=float, default=0.5, help="Alignment weight in the SiT loss.")
    parser.add_argument(
        "--vae_align_proj_coeff", type=float, default=1.5, help="Alignment weight in the VAE loss (end-to-end)."
    )
    parser.add_argument("--bn_momentum", type=float, default=0.1, help="Momentum of the latent BatchNorm.")
    parser.add_argument("--cfg_prob", type=float, default=0.1, help="Probability of dropping a label to null.")
    parser.add_argument("--path_type", type=str, default="linear", choices=PATH_TYPES, help="Interpolant path.")
    parser.add_argument("--prediction", type=str, default="v", choices=["v"], help="Prediction target (v only).")
    parser.add_argument(
        "--weighting", type=str, default="uniform", choices=WEIGHTINGS, help="Training time distribution."
    )
    # VAE losses
    parser.add_argument("--l1_weight", type=float, default=1.0, help="Weight of the L1 reconstruction loss.")
    parser.add_argument(
        "--lpips_weight",
        type=float,
        default=1.0,
        help="Weight of the LPIPS (VGG) perceptual loss; 0 drops it (needs no VGG weights).",
    )
    parser.add_argument(
        "--no_lpips",
        action="store_true",
        help="Drop the perceptual term (same as --lpips_weight 0), e.g. offline without torchvision's VGG16.",
    )
    parser.add_argument(
        "--lpips_vgg_path",
        type=str,
        default=None,
        help="Local torchvision vgg16 state dict (.pth/.safetensors) for LPIPS, instead of downloading it.",
    )
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the KL term.")
    parser.add_argument("--disc_weight", type=float, default=0.1, help="Weight of the generator's GAN term.")
    parser.add_argument("--disc_start", type=int, default=0, help="Step from which the GAN terms are active.")
    parser.add_argument("--disc_factor", type=float, default=1.0, help="Factor on the GAN terms once active.")
    # optimisation
    parser.add_argument("--output_dir", type=str, default="repae-output", help="Checkpoints, logs and the pipeline.")
    parser.add_argument("--seed", type=int, default=0, help="Seed (model init, data order; +rank for step noise).")
    parser.add_argument(
        "--train_batch_size",
        type=int,
        default=256,
        help="GLOBAL batch size per optimizer step (as the original): split over processes and accumulation.",
    )
    parser.add_argument("--max_train_steps", type=int, default=400_000, help="Optimizer steps to train for.")
    parser.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Also stop (checkpoint and export) once training has run this many minutes: for demos on slow "
        "hardware. Off by default.",
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate of the SiT.")
    parser.add_argument("--vae_learning_rate", type=float, default=1e-4, help="AdamW learning rate of the VAE.")
    parser.add_argument(
        "--disc_learning_rate", type=float, default=1e-4, help="AdamW learning rate of the discriminator."
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (all three optimisers).")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (all three optimisers).")
    parser.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay (all three).")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon (all three).")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (each model).")
    parser.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay of the SiT and BN statistics.")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default="fp16",
        choices=["no", "fp16", "bf16"],
        help="Autocast precision (the original: fp16). The alignment cosine and the VAE losses stay fp32. Use "
        "'no' on CPU.",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls/convolutions on Ampere+.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the SiT.")
    parser.add_argument(
        "--dataloader_num_workers", type=int, default=4, help="DataLoader worker processes (0: main process)."
    )
    # checkpoints, logging, validation
    parser.add_argument("--checkpointing_steps", type=int, default=50_000, help="Save a checkpoint every N steps.")
    parser.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint-N folder, or 'latest' for the newest in --output_dir (starts fresh if none).",
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        choices=["tensorboard", "wandb", "none"],
        help="Experiment tracker.",
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    parser.add_argument("--tracker_project_name", type=str, default="train_repae", help="Tracker project name.")
    parser.add_argument(
        "--validation_steps", type=int, default=10_000, help="Sample a validation grid from the EMA every N steps."
    )
    parser.add_argument(
        "--num_validation_classes", type=int, default=16, help="Classes in the validation grid (one image each)."
    )
    parser.add_argument(
        "--validation_inference_steps", type=int, default=None, help="Sampler steps (default: the recipe's)."
    )
    parser.add_argument(
        "--validation_guidance_scale", type=float, default=None, help="CFG scale for validation (default: recipe)."
    )
    parser.add_argument("--max_grid_images", type=int, default=64, help="Cap on final sample-grid images.")
    add_data_args(parser)
    args = parser.parse_args(argv)

    if args.no_lpips:
        args.lpips_weight = 0.0
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1], got {args.ema_decay}.")
    if not 0.0 <= args.cfg_prob < 1.0:
        raise ValueError(f"--cfg_prob must be in [0, 1), got {args.cfg_prob}.")
    return args


def load_starting_vae(args: argparse.Namespace) -> AutoencoderKL:
    """``--vae`` (an AutoencoderKL folder or a pipeline folder) or the recipe's VAE with random weights."""
    if args.vae is None:
        return build_component(args.recipe, "vae")
    path = Path(args.vae)
    if (path / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, subfolder="vae")
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path)
    try:
        return build_component(resolve_recipe(args.vae), "vae")  # a recipe name: random weights of that config
    except ValueError as error:
        raise ValueError(f"--vae {args.vae!r} is neither an AutoencoderKL folder nor a recipe.") from error


def load_starting_discriminator(args: argparse.Namespace) -> PatchGANDiscriminator:
    """``--discriminator_checkpoint`` (folder or .safetensors) or a fresh PatchGAN."""
    path = args.discriminator_checkpoint
    if path is None:
        return PatchGANDiscriminator(ndf=args.disc_ndf, n_layers=args.disc_layers)
    if Path(path).is_dir():
        return PatchGANDiscriminator.from_pretrained(path)
    if path.endswith(".safetensors") and Path(path).is_file():
        from safetensors.torch import load_file

        disc = PatchGANDiscriminator(ndf=args.disc_ndf, n_layers=args.disc_layers)
        disc.load_state_dict(load_file(path))
        return disc
    raise ValueError(f"--discriminator_checkpoint {path!r} is neither a folder nor a .safetensors file.")


def encoder_paths(args: argparse.Namespace) -> dict[str, str]:
    """``--encoder_paths NAME=PATH ...`` -> ``{NAME: PATH}``."""
    paths = {}
    for item in args.encoder_paths or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--encoder_paths entries must look like NAME=PATH, got {item!r}.")
        paths[name] = path
    return paths


def latent_size(vae: AutoencoderKL, resolution: int) -> int:
    """Side of the VAE latent for square images of ``resolution`` px."""
    return resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def vae_with_stats(vae: AutoencoderKL, ema_norm: torch.nn.Module) -> AutoencoderKL:
    """Writes the EMA BatchNorm statistics into the VAE config (``latents_mean``, ``latents_std``)."""
    norm = LatentBatchNorm(ema_norm.num_features)
    norm.load_state_dict(ema_norm.state_dict())
    mean, std = norm.to_latents_stats()
    vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=1.0)
    return vae


def build_pipeline(args, accelerator, models: RepaEModels, data) -> RepaEPipeline:
    """RepaEPipeline from the EMA SiT and the VAE carrying the EMA BatchNorm statistics."""
    index = json.loads((resolve_recipe(args.recipe) / "model_index.json").read_text())
    vae = vae_with_stats(accelerator.unwrap_model(models.vae).vae, models.ema.model["latent_norm"])
    settings = {k: index[k] for k in ("default_num_inference_steps", "default_guidance_scale") if k in index}
    if "default_guidance_interval" in index:
        settings["default_guidance_interval"] = index["default_guidance_interval"]
    return RepaEPipeline(
        transformer=models.ema.model["transformer"],
        vae=vae,
        scheduler=build_component(args.recipe, "scheduler"),
        id2label={str(k): v for k, v in data.id2label.items()},
        **settings,
    )


@torch.no_grad()
def sample_grid(pipeline: RepaEPipeline, class_ids: list[int], args, device) -> np.ndarray:
    """One image per class from a fixed seed, as a float [N, H, W, 3] array in [0, 1]."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = {}
    if args.validation_inference_steps is not None:
        kwargs["num_inference_steps"] = args.validation_inference_steps
    if args.validation_guidance_scale is not None:
        kwargs["guidance_scale"] = args.validation_guidance_scale
    return pipeline(class_labels=class_ids, generator=generator, output_type="np", **kwargs).images


def grid_image(images: np.ndarray, columns: int = 8):
    """``[N, H, W, 3]`` in [0, 1] -> one PIL image, ``columns`` wide."""
    from PIL import Image

    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    canvas = np.ones((rows * h, columns * w, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray((canvas * 255).clip(0, 255).astype(np.uint8))


def log_validation(args, accelerator, models, data, global_step: int) -> None:
    """Sample a grid with the EMA model; log it to the tracker and save it as a PNG (main process only)."""
    pipeline = build_pipeline(args, accelerator, models, data)
    class_ids = list(range(min(args.num_validation_classes, data.num_classes)))
    images = sample_grid(pipeline, class_ids, args, accelerator.device)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid_image(images).save(folder / f"step-{global_step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Image(img, caption=data.id2label[i]) for i, img in zip(class_ids, images)]}
            )


def plot_loss_curves(history: LossHistory, path: Path) -> None:
    """Every logged loss term against the step, one panel per group (sit/, vae/, the KL, disc/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the KL (summed over latent elements) dwarfs the other VAE terms: it gets its own panel
    groups = {
        "sit": lambda k: k.startswith("sit/"),
        "vae": lambda k: k.startswith("vae/") and k != "vae/kl",
        "vae/kl": lambda k: k == "vae/kl",
        "disc": lambda k: k.startswith("disc/"),
    }
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5))
    steps = [r["step"] for r in history.records]
    for axis, (group, selected) in zip(axes, groups.items()):
        keys = sorted({k for r in history.records for k in r if selected(k)})
        for key in keys:
            axis.plot(steps, [r.get(key, float("nan")) for r in history.records], label=key.split("/", 1)[1])
        axis.set_title(group)
        axis.set_xlabel("step")
        if keys:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(args, data, num_params: dict[str, int], global_step: int) -> str:
    """README.md of the exported pipeline: what was trained, how, on what, and the data's licence."""
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [repa-e, sit, class-conditional, image-generation]",
        "---",
        f"# REPA-E end-to-end training output ({Path(args.output_dir).name})",
        "",
        f"Trained with `training/train_repae.py` from recipe `{args.recipe}` for {global_step} steps "
        f"(global batch {args.train_batch_size}, {args.resolution} px) on `{data.source}` "
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
    if args.lpips_weight == 0:
        lines += [
            "**The VAE was trained without the LPIPS perceptual term** (`--lpips_weight 0`): torchvision's VGG16 "
            "weights could not be had offline. Expect blurrier reconstructions than REPA-E's recipe.",
            "",
        ]
    if data.attribution:
        lines += ["## Training data licence", "", data.attribution, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)  # identical on every process: same init and the same (sharded) data order
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete_checkpoints(output_dir)

    per_process = args.train_batch_size // (accelerator.num_processes * args.gradient_accumulation_steps)
    if per_process * accelerator.num_processes * args.gradient_accumulation_steps != args.train_batch_size:
        raise ValueError(
            f"--train_batch_size {args.train_batch_size} must be divisible by processes x accumulation steps "
            f"({accelerator.num_processes} x {args.gradient_accumulation_steps})."
        )

    # Data (the main process renders/caches first, the others then read the cache).
    with accelerator.main_process_first():
        data = training_data_from_args(args, args.seed, accelerator.process_index, accelerator.num_processes)
    dataloader = build_dataloader(data, per_process, args.dataloader_num_workers, seed=args.seed)

    # Models from the recipe.
    vae = load_starting_vae(args)
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
            args.enc_type, args.resolution, num_tokens, accelerator.device, local_paths=encoder_paths(args)
        )
    projector = build_component(
        args.recipe,
        "projector",
        hidden_size=transformer.config.hidden_size,
        z_dims=[encoder.z_dim for encoder in encoders],
        encoder_depth=args.encoder_depth,
        **({"projector_dim": args.projector_dim} if args.projector_dim else {}),
    )
    discriminator = load_starting_discriminator(args)
    latent_norm = LatentBatchNorm(vae.config.latent_channels, momentum=args.bn_momentum)
    if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
        latent_norm.load_latents_stats(vae.config.latents_mean, vae.config.latents_std)
        logger.info("latent BatchNorm initialised from the VAE's latents_mean/latents_std")
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        latent_norm = torch.nn.SyncBatchNorm.convert_sync_batchnorm(latent_norm)
    latent_norm.to(accelerator.device)

    lpips = None
    if args.lpips_weight != 0:
        try:
            lpips = load_lpips(args.lpips_vgg_path).to(accelerator.device)
        except Exception as error:  # the download of torchvision's VGG16 fails offline
            raise RuntimeError(
                "could not load LPIPS' VGG16 backbone; pass --lpips_vgg_path to a local torchvision vgg16 state "
                "dict, or drop the perceptual term with --no_lpips."
            ) from error
    else:
        logger.warning("LPIPS perceptual loss DISABLED (--lpips_weight 0 / --no_lpips).")
    vae_loss = VAEReconstructionLoss(
        lpips, args.l1_weight, args.lpips_weight, args.kl_weight, args.disc_weight, args.disc_start, args.disc_factor
    )

    def adamw(params, lr):
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )

    vae_module = VAEWithPosterior(vae)
    optimizer_vae = adamw(vae_module.parameters(), args.vae_learning_rate)
    optimizer_disc = adamw(discriminator.parameters(), args.disc_learning_rate)
    optimizer_sit = adamw(list(transformer.parameters()) + list(projector.parameters()), args.learning_rate)
    if args.compile:
        transformer = torch.compile(transformer)
    (vae_module, transformer, projector, discriminator, optimizer_vae, optimizer_disc, optimizer_sit) = (
        accelerator.prepare(
            vae_module, transformer, projector, discriminator, optimizer_vae, optimizer_disc, optimizer_sit
        )
    )
    if not data.streaming:
        dataloader = accelerator.prepare(dataloader)
    # A streamed dataset is already sharded per process (split_dataset_by_node): accelerate must not re-shard or
    # dispatch it, so its DataLoader stays unprepared, batches move to the device below, and its exact stream
    # position is checkpointed per process.
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
    generators = ProcessGenerators(accelerator, args.seed)
    history = LossHistory()
    # The latent BN has no parameters (DDP refuses it), so it is registered like the EMA and the RNG streams.
    accelerator.register_for_checkpointing(latent_norm, models.ema, generators, history)
    if data.streaming:
        accelerator.register_for_checkpointing(PerProcessState(accelerator, data.dataset))
    hp = RepaEHyperParameters(
        encoder_depth=args.encoder_depth,
        proj_coeff=args.proj_coeff,
        vae_align_proj_coeff=args.vae_align_proj_coeff,
        path_type=args.path_type,
        weighting=args.weighting,
        cfg_prob=args.cfg_prob,
        max_grad_norm=args.max_grad_norm,
    )

    global_step = 0
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    if args.resume_from_checkpoint and resume is None:
        logger.info(f"no checkpoint found in {output_dir}; starting a new run")
    if resume is not None:
        logger.info(f"resuming from {resume}")
        accelerator.load_state(str(resume))
        global_step = checkpoint_step(resume)

    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    num_params = {
        "sit": sum(p.numel() for p in accelerator.unwrap_model(transformer).parameters()),
        "projector": sum(p.numel() for p in accelerator.unwrap_model(projector).parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "discriminator": sum(p.numel() for p in accelerator.unwrap_model(discriminator).parameters()),
    }
    logger.info(f"***** REPA-E training: {num_params}, {len(data.dataset)} images, {data.num_classes} classes *****")
    logger.info(
        f"  global batch {args.train_batch_size} = {accelerator.num_processes} processes x {per_process} x "
        f"{args.gradient_accumulation_steps} accumulation; {args.max_train_steps} steps"
    )

    batches_done = global_step * args.gradient_accumulation_steps
    if data.streaming:  # the restored stream state already sits at the right sample
        epoch, skip = 0, 0
    else:
        epoch, skip = divmod(batches_done, len(dataloader))
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    step_start = train_start = time.perf_counter()
    last_checkpoint = resume
    out_of_time = False
    while global_step < args.max_train_steps:
        if not data.streaming:
            dataloader.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        skip = 0
        for batch in epoch_loader:
            if data.streaming:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            logs = train_step(accelerator, models, hp, batch, generators.generator, global_step)
            if not accelerator.sync_gradients:
                continue
            if not all_finite(accelerator, logs):
                bad = {k: float(v) for k, v in logs.items() if not math.isfinite(float(v))}
                raise RuntimeError(
                    f"non-finite loss at step {global_step + 1}: {bad}. Stopping; the last good checkpoint is "
                    f"{last_checkpoint or 'none (no checkpoint saved yet)'}. Try a lower learning rate, bf16 "
                    "instead of fp16, or resume from that checkpoint."
                )
            global_step += 1
            progress.update(1)
            elapsed = time.perf_counter() - step_start
            step_start = time.perf_counter()
            scalars = {k: accelerator.reduce(v.to(accelerator.device), "mean").item() for k, v in logs.items()}
            scalars["lr/sit"] = optimizer_sit.param_groups[0]["lr"]
            scalars["lr/vae"] = optimizer_vae.param_groups[0]["lr"]
            scalars["lr/disc"] = optimizer_disc.param_groups[0]["lr"]
            scalars["throughput/images_per_s"] = args.train_batch_size / max(elapsed, 1e-9)
            if accelerator.is_main_process:
                history.append(global_step, scalars)
            accelerator.log(scalars, step=global_step)
            progress.set_postfix(sit=f"{scalars['sit/loss']:.4f}", vae=f"{scalars['vae/loss']:.4f}")

            if args.max_train_minutes is not None:  # every process must agree to stop at the same step
                late = torch.tensor([time.perf_counter() - train_start > 60 * args.max_train_minutes], dtype=torch.int)
                out_of_time = accelerator.reduce(late.to(accelerator.device), "max").item() > 0
                if out_of_time:
                    logger.info(f"--max_train_minutes {args.max_train_minutes} reached at step {global_step}")
            final_step = global_step == args.max_train_steps or out_of_time
            if global_step % args.checkpointing_steps == 0 or final_step:
                last_checkpoint = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                logger.info(f"saved {last_checkpoint}")
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(args, accelerator, models, data, global_step)
            if final_step:
                break
        if out_of_time:
            break
        epoch += 1

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipeline = build_pipeline(args, accelerator, models, data)
        pipeline.save_pretrained(output_dir)
        accelerator.unwrap_model(projector).save_pretrained(output_dir / "projector")
        accelerator.unwrap_model(discriminator).save_pretrained(output_dir / "discriminator")
        (output_dir / "README.md").write_text(model_card(args, data, num_params, global_step))
        if history.records:
            plot_loss_curves(history, output_dir / "loss_curves.png")
        logger.info(f"pipeline saved to {output_dir} (loss curves: {output_dir / 'loss_curves.png'})")
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""What the training scripts share: their common flags, the step loop, validation grids and export.

The scripts stay linear (diffusers-examples style); this module holds the pieces that would otherwise be
copied between them. Nothing here reads ``sys.argv``: the flag helpers only add arguments to a parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm

from ..cli import UserError
from ..models.discriminator import PatchGANDiscriminator
from ..models.latent_norm import LatentBatchNorm
from ..pipelines.hub import push_folder_to_hub
from ..recipes import build_component, resolve_recipe
from .checkpointing import (
    LossHistory,
    all_finite,
    check_output_dir,
    checkpoint_step,
    load_checkpoint,
    remove_incomplete_checkpoints,
    remove_previous_run,
    resolve_resume_checkpoint,
    save_checkpoint,
    weights_finite,
)
from .data import TrainingData
from .losses import LPIPS_INPUT_RANGES, PATH_TYPES, WEIGHTINGS, VAEReconstructionLoss, load_lpips

logger = logging.getLogger(__name__)

# RepaEPipeline's registered sampling settings, as recipes' model_index.json stores them.
SAMPLING_DEFAULT_KEYS = ("default_num_inference_steps", "default_guidance_scale", "default_guidance_interval")


def add_sit_training_args(parser: argparse.ArgumentParser, tracker_project_name: str) -> argparse.ArgumentParser:
    """Flags of the SiT side of training (encoders, REPA objective) plus `add_run_args`.

    Defaults are the original's (SPEC sections 6-7).
    """
    enc = parser.add_argument_group("vision encoders and REPA")
    enc.add_argument(
        "--enc_type",
        type=str,
        default="dinov2-vit-b",
        help="Vision encoder(s) to align with, comma separated (e.g. dinov2-vit-b, efficientnet-lite0).",
    )
    enc.add_argument(
        "--encoder_paths",
        type=str,
        nargs="*",
        default=None,
        help="Local encoder folders instead of the Hub, as NAME=PATH (e.g. dinov2-vit-b=/models/dinov2-base).",
    )
    enc.add_argument(
        "--encoder_depth",
        type=int,
        default=None,
        help="SiT block (1-based) whose tokens are aligned. Default: the recipe's projector config (8 for XL).",
    )
    enc.add_argument(
        "--projector_dim", type=int, default=None, help="Hidden width of the projector MLP (default: recipe, 2048)."
    )
    enc.add_argument("--proj_coeff", type=float, default=0.5, help="Alignment weight in the SiT loss.")
    enc.add_argument("--cfg_prob", type=float, default=0.1, help="Probability of dropping a label to null.")
    enc.add_argument("--path_type", type=str, default="linear", choices=PATH_TYPES, help="Interpolant path.")
    enc.add_argument("--prediction", type=str, default="v", choices=["v"], help="Prediction target (v only).")
    enc.add_argument(
        "--weighting", type=str, default="uniform", choices=WEIGHTINGS, help="Training time distribution."
    )

    opt, log = add_run_args(parser, tracker_project_name)
    opt.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate of the SiT.")
    opt.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay of the SiT and BN statistics.")
    opt.add_argument("--compile", action="store_true", help="torch.compile the SiT.")
    log.add_argument(
        "--num_validation_classes", type=int, default=16, help="Classes in the validation grid (one image each)."
    )
    log.add_argument(
        "--validation_inference_steps", type=int, default=None, help="Sampler steps (default: the recipe's)."
    )
    log.add_argument(
        "--validation_guidance_scale", type=float, default=None, help="CFG scale for validation (default: recipe)."
    )
    return parser


def add_run_args(parser: argparse.ArgumentParser, tracker_project_name: str) -> tuple:
    """Flags every training script has (output, batch, steps, AdamW, precision, checkpoints, logging).

    Returns the ``(optimisation, logging)`` argument groups so a script can add its own flags to them.
    """
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--output_dir", type=str, default="repae-output", help="Checkpoints, logs and the pipeline.")
    opt.add_argument("--seed", type=int, default=0, help="Seed (model init, data order; +rank for step noise).")
    opt.add_argument(
        "--train_batch_size",
        type=int,
        default=32,
        help="Batch size PER DEVICE (process) and micro-step, as in diffusers' examples; the global batch is "
        "train_batch_size x processes x gradient_accumulation_steps. The original's global 256: 8 GPUs x 32 "
        "(accelerate launch --num_processes 8 ... --train_batch_size 32), or 1 GPU x 32 x 8 accumulation steps.",
    )
    opt.add_argument("--max_train_steps", type=int, default=400_000, help="Optimizer steps to train for.")
    opt.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Also stop (checkpoint and export) once training has run this many minutes: for demos on slow "
        "hardware. Off by default.",
    )
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    opt.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (every optimiser).")
    opt.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (every optimiser).")
    opt.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay (every optimiser).")
    opt.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon (every optimiser).")
    opt.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (each model).")
    opt.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=[kind.value for kind in SchedulerType if kind != SchedulerType.PIECEWISE_CONSTANT],
        help="Learning-rate schedule of every optimiser over --max_train_steps (diffusers.optimization; the "
        "original: constant).",
    )
    opt.add_argument(
        "--lr_warmup_steps", type=int, default=0, help="Optimizer steps of linear warm-up (schedules that have one)."
    )
    opt.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="bitsandbytes' 8-bit AdamW instead of torch's fused AdamW (less optimizer memory; needs CUDA and "
        "`pip install bitsandbytes`).",
    )
    opt.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass instead of storing them (less memory, about 30%% slower): "
        "the SiT's blocks, and the VAE where it trains.",
    )
    opt.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast precision. Default: what `accelerate launch --mixed_precision` or the accelerate config "
        "says ('no' without either); a value here overrides both. The original trains in fp16 (the recipes' "
        "commands pass --mixed_precision fp16). The alignment cosine and the VAE losses stay fp32.",
    )
    opt.add_argument(
        "--allow_tf32",
        action="store_true",
        default=True,
        help="TF32 matmuls/convolutions on CUDA Ampere+ (on by default, as in the original).",
    )
    opt.add_argument(
        "--no_allow_tf32", dest="allow_tf32", action="store_false", help="Full fp32 matmuls/convolutions (no TF32)."
    )
    opt.add_argument(
        "--dataloader_num_workers", type=int, default=4, help="DataLoader worker processes (0: main process)."
    )

    log = parser.add_argument_group("checkpoints, logging, validation")
    log.add_argument("--checkpointing_steps", type=int, default=50_000, help="Save a checkpoint every N steps.")
    log.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    log.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint-N folder (a path, or a name inside --output_dir), or 'latest' for the newest in "
        "--output_dir (starts fresh if none).",
    )
    log.add_argument(
        "--overwrite",
        action="store_true",
        help="Start over in an --output_dir that holds a run: its checkpoints and exported pipeline are removed "
        "first. Without it such a folder is refused (unless --resume_from_checkpoint).",
    )
    log.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        choices=["tensorboard", "wandb", "none"],
        help="Experiment tracker.",
    )
    log.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    log.add_argument("--tracker_project_name", type=str, default=tracker_project_name, help="Tracker project name.")
    log.add_argument(
        "--validation_steps",
        type=int,
        default=10_000,
        help="Write validation images (samples of the EMA model; train_vae.py: reconstructions) every N steps.",
    )
    log.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the exported folder (pipeline with its code, or LoRA; model card, plots) to the Hub at the "
        "end; checkpoints and logs stay local.",
    )
    log.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository (user/name); default: --output_dir's name."
    )
    log.add_argument("--hub_token", type=str, default=None, help="Hub token; default: the one `hf auth login` stored.")
    return opt, log


def push_output_to_hub(args: argparse.Namespace, output_dir: Path) -> str | None:
    """``--push_to_hub``: upload what the run exported (not checkpoints, logs or hidden files); the repo id."""
    if not args.push_to_hub:
        return None
    skip = ["checkpoint-*", "checkpoint-*/**", f"{args.logging_dir}/**", ".*", ".*/**"]
    repo_id = args.hub_model_id or Path(output_dir).resolve().name
    return push_folder_to_hub(
        output_dir, repo_id, args.hub_token, commit_message="End of training", ignore_patterns=skip
    )


def check_sit_training_args(args: argparse.Namespace) -> None:
    """Bad values of the shared flags, each a ValueError naming the flag, the value and what is allowed."""
    check_run_args(args)
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1], got {args.ema_decay}.")
    if not 0.0 <= args.cfg_prob < 1.0:
        raise ValueError(f"--cfg_prob must be in [0, 1), got {args.cfg_prob}.")


def check_run_args(args: argparse.Namespace) -> None:
    """Bad values of the `add_run_args` flags, each a ValueError naming the flag."""
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if not 0 <= args.lr_warmup_steps <= args.max_train_steps:
        raise ValueError(f"--lr_warmup_steps must be in [0, --max_train_steps], got {args.lr_warmup_steps}.")
    import importlib.util

    if getattr(args, "report_to", None) == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError("--report_to wandb needs the wandb package (pip install wandb); or use tensorboard or none.")


def add_vae_loss_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the VAE's losses and discriminator (train_repae.py and train_vae.py); defaults are REPA-E's."""
    group = parser.add_argument_group("VAE losses and discriminator")
    group.add_argument("--l1_weight", type=float, default=1.0, help="Weight of the L1 reconstruction loss.")
    group.add_argument(
        "--lpips_weight",
        type=float,
        default=1.0,
        help="Weight of the LPIPS (VGG) perceptual loss; 0 drops it (needs no VGG weights).",
    )
    group.add_argument(
        "--no_lpips",
        action="store_true",
        help="Drop the perceptual term (same as --lpips_weight 0), e.g. offline without torchvision's VGG16.",
    )
    group.add_argument(
        "--lpips_vgg_path",
        type=str,
        default=None,
        help="Local torchvision vgg16 state dict (.pth/.safetensors) for LPIPS, instead of downloading it.",
    )
    group.add_argument(
        "--lpips_input_range",
        type=str,
        default="correct",
        choices=LPIPS_INPUT_RANGES,
        help="'correct' (default): LPIPS sees images in [-1, 1], the range it expects. 'original': as REPA-E, whose "
        "LPIPS maps its [-1, 1] input by x * 2 - 1 again (VGG sees [-3, 1]): the published VAEs' exact objective.",
    )
    group.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the KL term.")
    group.add_argument("--disc_weight", type=float, default=0.1, help="Weight of the generator's GAN term.")
    group.add_argument("--disc_start", type=int, default=0, help="Step from which the GAN terms are active.")
    group.add_argument("--disc_factor", type=float, default=1.0, help="Factor on the GAN terms once active.")
    group.add_argument(
        "--adaptive_disc_weight",
        action="store_true",
        help="Scale the GAN term by taming/LDM's adaptive weight (gradient-norm ratio of the reconstruction and GAN "
        "losses at the decoder's last layer, times --disc_weight). REPA-E does not (off by default).",
    )
    group.add_argument(
        "--discriminator_checkpoint",
        type=str,
        default=None,
        help="Starting discriminator: a PatchGANDiscriminator folder (save_pretrained) or a .safetensors file.",
    )
    group.add_argument("--disc_ndf", type=int, default=64, help="Channels of the discriminator's first conv.")
    group.add_argument("--disc_layers", type=int, default=3, help="Strided blocks of the PatchGAN discriminator.")
    group.add_argument("--vae_learning_rate", type=float, default=1e-4, help="AdamW learning rate of the VAE.")
    group.add_argument(
        "--disc_learning_rate", type=float, default=1e-4, help="AdamW learning rate of the discriminator."
    )
    return parser


def check_vae_loss_args(args: argparse.Namespace) -> None:
    """``--no_lpips`` means ``--lpips_weight 0``; negative weights and steps are refused."""
    if args.no_lpips:
        args.lpips_weight = 0.0
    for name in ("l1_weight", "lpips_weight", "kl_weight", "disc_weight", "disc_factor", "disc_start"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    layers, resolution = getattr(args, "disc_layers", None), getattr(args, "resolution", None)
    if layers is not None and resolution is not None and resolution < 3 * 2**layers:
        # n stride-2 convs then two 4x4 stride-1 convs: the patch map needs resolution / 2^n - 2 >= 1
        raise ValueError(
            f"--resolution {resolution} is too small for a discriminator with --disc_layers {layers}: use "
            f"--resolution >= {3 * 2**layers} or fewer --disc_layers."
        )


def build_vae_loss(args: argparse.Namespace, device: torch.device) -> VAEReconstructionLoss:
    """The VAE loss of the `add_vae_loss_args` flags, with LPIPS loaded (or a clear error when it cannot be)."""
    lpips = None
    if args.lpips_weight != 0:
        try:
            lpips = load_lpips(args.lpips_vgg_path).to(device)
        except Exception as error:  # the download of torchvision's VGG16 fails offline
            raise RuntimeError(
                "could not load LPIPS' VGG16 backbone; pass --lpips_vgg_path to a local torchvision vgg16 state "
                "dict, or drop the perceptual term with --no_lpips."
            ) from error
    else:
        logger.warning("LPIPS perceptual loss DISABLED (--lpips_weight 0 / --no_lpips).")
    return VAEReconstructionLoss(
        lpips, args.l1_weight, args.lpips_weight, args.kl_weight, args.disc_weight, args.disc_start, args.disc_factor,
        args.adaptive_disc_weight, args.lpips_input_range,
    )  # fmt: skip


def load_starting_vae(args: argparse.Namespace) -> AutoencoderKL:
    """``--vae`` (an AutoencoderKL folder or a pipeline folder) or the ``--recipe``'s VAE with random weights."""
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


def configure_tf32(allow: bool) -> bool:
    """TF32 for matmuls and cuDNN convolutions on CUDA Ampere+ when ``allow`` (the original always enables it),
    strict fp32 otherwise; returns whether TF32 is on. Nothing to set without CUDA."""
    if not torch.cuda.is_available():
        return False
    enabled = allow and torch.cuda.get_device_capability()[0] >= 8
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The autocast dtype of the run's mixed precision (None for 'no'): the vision encoders run under it."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


def setup_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator of a training run (seedable sampler for exact resume), logging, TF32, seed, output folder."""
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
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        # accelerate accepts it, but no fp16 autocast happens on the CPU: refuse rather than claim fp16
        raise UserError(
            "--mixed_precision fp16 needs a GPU; on the CPU use bf16 (fast where the CPU has bf16 units) or no."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    source = "--mixed_precision" if args.mixed_precision is not None else "accelerate launch/config"
    logger.info(f"mixed precision: {accelerator.mixed_precision} (from {source}; the original trains in fp16)")
    tf32 = configure_tf32(args.allow_tf32)
    logger.info(f"TF32 matmuls/convolutions: {'on' if tf32 else 'off'}")
    set_seed(args.seed)  # identical on every process: same init and the same (sharded) data order
    previous = check_output_dir(output_dir, args.resume_from_checkpoint, args.overwrite)  # on every process
    if accelerator.is_main_process:
        remove_previous_run(output_dir, previous)
        remove_incomplete_checkpoints(output_dir)  # the folder itself is made by the first write: a run refused
        # later (bad data, flags) leaves no empty --output_dir behind
    return accelerator


def resume_and_start_trackers(args: argparse.Namespace, accelerator: Accelerator) -> tuple[int, Path | None]:
    """Loads ``--resume_from_checkpoint`` (all registered state) and starts the trackers.

    Returns ``(global_step, checkpoint)``; ``(0, None)`` for a new run.
    """
    global_step = 0
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint and resume is None:
        logger.info(f"no checkpoint found in {args.output_dir}; starting a new run")
    if resume is not None:
        logger.info(f"resuming from {resume}")
        load_checkpoint(accelerator, resume)  # safetensors/JSON and weights-only loads: runs no code
        global_step = checkpoint_step(resume)
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    return global_step, resume


def per_process_batch_size(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """Images per process and micro-step: ``--train_batch_size`` (per device, as in diffusers' examples)."""
    return args.train_batch_size


def global_batch_size(args: argparse.Namespace, num_processes: int) -> int:
    """Images per optimizer step: per-device batch x processes x accumulation steps."""
    return args.train_batch_size * num_processes * args.gradient_accumulation_steps


def enable_gradient_checkpointing(args: argparse.Namespace, *models: torch.nn.Module) -> None:
    """``--gradient_checkpointing``: diffusers' ``enable_gradient_checkpointing`` on each model that trains."""
    if args.gradient_checkpointing:
        for model in models:
            model.enable_gradient_checkpointing()


def make_lr_schedulers(
    args: argparse.Namespace,
    optimizers: dict[str, torch.optim.Optimizer],
    global_step: int = 0,
    lr_factors: dict[str, Callable[[int], float]] | None = None,
) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
    """``--lr_scheduler`` / ``--lr_warmup_steps`` on each optimiser (``diffusers.optimization.get_scheduler``),
    counted in optimizer steps and positioned at ``global_step``; ``lr_factors[name](step)``, where given,
    multiplies that optimiser's schedule (a phase of the run that anneals one model, say).

    The schedules are pure functions of the step, so a resumed run rebuilds them at its step instead of storing
    them: the base rate is the optimiser's ``initial_lr`` (saved with its state), the current one follows.
    """
    lr_factors = lr_factors or {}
    unknown = set(lr_factors) - set(optimizers)
    if unknown:
        raise ValueError(f"lr_factors for unknown optimisers {sorted(unknown)}; known: {sorted(optimizers)}")
    schedulers = {}
    for name, optimizer in optimizers.items():
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        schedule = _schedule_multiplier(args, optimizer.param_groups[0]["initial_lr"])
        factor = lr_factors.get(name, _unit_factor)
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step, schedule=schedule, factor=factor: schedule(step) * factor(step), global_step - 1
        )
    return schedulers


def linear_decay_factor(start: int, end: int) -> Callable[[int], float]:
    """A learning-rate multiplier for ``lr_factors``: 1 before step ``start``, then linear to 0 at step ``end``."""

    def factor(step: int) -> float:
        if step < start:
            return 1.0
        return max(0.0, (end - step) / max(1, end - start))

    return factor


def _unit_factor(step: int) -> float:
    return 1.0


def _schedule_multiplier(args: argparse.Namespace, base_lr: float) -> Callable[[int], float]:
    """``--lr_scheduler``'s multiplier of ``base_lr`` at a step, read off the scheduler diffusers builds for it
    (some schedules, such as polynomial, depend on the base rate)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = get_scheduler(
        args.lr_scheduler, probe, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    return scheduler.lr_lambdas[0]


def make_adamw(args: argparse.Namespace, params, lr: float) -> torch.optim.Optimizer:
    """AdamW with the shared ``--adam_*`` flags over the trainable ``params``.

    ``fused=True``: one kernel for the whole update, 4x faster than the for-loop implementation on a SiT-B/2
    step (benchmarks/bench_sit.py) and within 1.5e-8 of it after one step. ``--use_8bit_adam``: bitsandbytes'
    ``AdamW8bit`` (optional dependency, imported only then).
    """
    optimizer_class, extra = torch.optim.AdamW, {"fused": True}
    if getattr(args, "use_8bit_adam", False):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` (CUDA), or "
                "drop the flag."
            ) from None
        optimizer_class, extra = bnb.optim.AdamW8bit, {}
    return optimizer_class(
        [p for p in params if p.requires_grad],
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **extra,
    )


def parse_encoder_paths(items: list[str] | None) -> dict[str, str]:
    """``--encoder_paths NAME=PATH ...`` -> ``{NAME: PATH}``."""
    paths = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--encoder_paths entries must look like NAME=PATH, got {item!r}.")
        paths[name] = path
    return paths


def latent_size(vae, resolution: int) -> int:
    """Side of the VAE latent for square images of ``resolution`` px."""
    return resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def vae_with_stats(vae, norm: torch.nn.Module):
    """Writes a (EMA) latent BatchNorm's statistics into the VAE config (``latents_mean``, ``latents_std``)."""
    exported = LatentBatchNorm(norm.num_features)
    exported.load_state_dict(norm.state_dict())
    mean, std = exported.to_latents_stats()
    vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=1.0)
    return vae


def recipe_sampling_defaults(recipe: str | Path) -> dict:
    """The recipe's recommended sampling settings, as ``RepaEPipeline`` keyword arguments."""
    index = json.loads((resolve_recipe(recipe) / "model_index.json").read_text())
    return {key: index[key] for key in SAMPLING_DEFAULT_KEYS if key in index}


@torch.no_grad()
def sample_grid(pipeline, class_ids: list[int], seed: int, num_inference_steps=None, guidance_scale=None):
    """One image per class from a fixed seed, as a float ``[N, H, W, 3]`` array in [0, 1]."""
    pipeline.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    generator = torch.Generator().manual_seed(seed)
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


def log_validation(args, accelerator: Accelerator, pipeline, data: TrainingData, global_step: int) -> None:
    """Sample a grid with ``pipeline`` (the EMA model); save it as a PNG and send it to the trackers."""
    class_ids = list(range(min(args.num_validation_classes, data.num_classes)))
    images = sample_grid(
        pipeline, class_ids, args.seed, args.validation_inference_steps, args.validation_guidance_scale
    )
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
    """Every logged loss term against the step, one panel per group that was logged (sit/, vae/, the KL, decoder/
    (trained alone after the freeze), disc/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the KL (summed over latent elements) dwarfs the other VAE terms: it gets its own panel
    groups = {
        "sit": lambda k: k.startswith("sit/"),
        "vae": lambda k: k.startswith("vae/") and k != "vae/kl",
        "vae/kl": lambda k: k == "vae/kl",
        "decoder": lambda k: k.startswith("decoder/"),
        "disc": lambda k: k.startswith("disc/"),
    }
    logged = {k for r in history.records for k in r}
    panels = {name: sorted(filter(selected, logged)) for name, selected in groups.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    steps = [r["step"] for r in history.records]
    for axis, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            axis.plot(steps, [r.get(key, float("nan")) for r in history.records], label=key.split("/", 1)[1])
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_training_loop(
    args,
    accelerator: Accelerator,
    data: TrainingData,
    dataloader,
    step_fn: Callable[[dict, int], dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    history: LossHistory,
    global_step: int,
    last_checkpoint: Path | None,
    validate: Callable[[int], None] | None = None,
    postfix_keys: tuple[str, ...] = ("sit/loss",),
    lr_factors: dict[str, Callable[[int], float]] | None = None,
) -> int:
    """Steps until ``--max_train_steps`` (or ``--max_train_minutes``), with exact-resume data order, logging,
    checkpoints and validation; returns the final step.

    ``step_fn(batch, global_step)`` runs one (micro-)step and returns its loss terms. A non-finite loss on any
    process stops every process with a message naming the last good checkpoint. Each optimiser's learning rate
    follows ``--lr_scheduler`` (one scheduler step per optimizer step), times ``lr_factors[name]`` where given.
    """
    output_dir = Path(args.output_dir)
    lr_schedulers = make_lr_schedulers(args, optimizers, global_step, lr_factors)
    batches_done = global_step * args.gradient_accumulation_steps
    if data.streaming:  # a restored stream sits at its exact position, in its own epoch
        epoch, skip = data.dataset.epoch, 0
    else:
        epoch, skip = divmod(batches_done, len(dataloader))
    first_epoch = epoch
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    step_start = train_start = time.perf_counter()
    out_of_time = False
    skipped_images = 0
    while global_step < args.max_train_steps and not out_of_time:
        if not data.streaming:
            dataloader.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        skip = 0
        if data.streaming:
            logger.info(f"process {accelerator.process_index}: stream epoch {epoch} (window shuffle seed {args.seed})")
        batches_this_epoch = 0
        for batch in epoch_loader:
            batches_this_epoch += 1
            if data.streaming:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if isinstance(batch, dict) and "num_skipped" in batch:  # unreadable files replaced by a neighbour
                skipped_images += int(batch["num_skipped"].sum())
            logs = step_fn(batch, global_step)
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
            scalars.update({f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in optimizers.items()})
            with warnings.catch_warnings():  # an optimiser that has not stepped yet (the discriminator before
                # --disc_start, or the first step after a resume) would make torch warn; schedules count steps anyway
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                for lr_scheduler in lr_schedulers.values():  # after logging the rate this step used
                    lr_scheduler.step()
            images = global_batch_size(args, accelerator.num_processes)
            scalars["throughput/images_per_s"] = images / max(elapsed, 1e-9)
            skipped = torch.tensor(float(skipped_images), device=accelerator.device)
            scalars["data/skipped_images"] = accelerator.reduce(skipped, "sum").item()  # this run, all processes
            if accelerator.is_main_process:
                history.append(global_step, scalars)
            accelerator.log(scalars, step=global_step)
            progress.set_postfix({k.split("/")[0]: f"{scalars[k]:.4f}" for k in postfix_keys if k in scalars})

            if args.max_train_minutes is not None:  # every process must agree to stop at the same step
                late = torch.tensor([time.perf_counter() - train_start > 60 * args.max_train_minutes], dtype=torch.int)
                out_of_time = accelerator.reduce(late.to(accelerator.device), "max").item() > 0
                if out_of_time:
                    logger.info(f"--max_train_minutes {args.max_train_minutes} reached at step {global_step}")
            final_step = global_step == args.max_train_steps or out_of_time
            if global_step % args.checkpointing_steps == 0 or final_step:
                if not weights_finite(accelerator, optimizers.values()):  # never save a checkpoint that is broken
                    raise RuntimeError(
                        f"non-finite weights after step {global_step} (the losses were finite). Stopping; the last "
                        f"good checkpoint is {last_checkpoint or 'none (no checkpoint saved yet)'}. Try a lower "
                        "learning rate, bf16 instead of fp16, or resume from that checkpoint."
                    )
                last_checkpoint = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                logger.info(f"saved {last_checkpoint}")
            if validate and args.validation_steps and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    validate(global_step)
            if final_step:
                break
        resumed_at_the_end = epoch == first_epoch and global_step > 0  # a stream checkpointed just before its end
        if batches_this_epoch == 0 and global_step < args.max_train_steps and not resumed_at_the_end:
            raise UserError(
                f"process {accelerator.process_index} read no full batch of {args.train_batch_size} in epoch {epoch}: "
                "the dataset (its shard, when streamed over several processes) is too small; lower "
                "--train_batch_size or use more images."
            )
        epoch += 1
    return global_step

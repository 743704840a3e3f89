"""The command-line layer of the training scripts: the flags they share, their range checks, and the plain values
(`RunConfig`, keyword arguments) the library is called with.

Each script builds its parser from these groups and adds its own flags beside them; nothing in the library
imports this module (the library takes plain values, never an ``argparse.Namespace``).
"""

from __future__ import annotations

import argparse
import importlib.util

from diffusers.optimization import SchedulerType

from .cli import (
    finite_float,
    non_empty_path,
    non_negative_float,
    non_negative_int,
    not_nan_float,
    positive_float,
    positive_int,
    seed_int,
)
from .data_args import add_data_args, dataset_options, training_data_from_args  # noqa: F401 (the scripts' flags)
from .training.loop import RunConfig
from .training.losses import LPIPS_INPUT_RANGES, PATH_TYPES, WEIGHTINGS


def training_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A training script's parser; ``epilog`` (the script's docstring, its example commands) is kept as written."""
    if epilog is None:
        return argparse.ArgumentParser(description=description)
    return argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_recipe_arg(group, default: str, help: str) -> None:
    """``--recipe``: a pipelines/ name or a folder in RepaEPipeline layout; ``help`` says what the script takes
    from it."""
    group.add_argument("--recipe", type=str, default=default, help=help)


def add_vae_arg(group, help: str) -> None:
    """``--vae``: an AutoencoderKL folder (or a pipeline folder with vae/); ``help`` says what the script does
    with it."""
    group.add_argument("--vae", type=str, default=None, help=help)


def vae_encoding_parser(description: str) -> argparse.ArgumentParser:
    """The parser of a script that encodes a dataset with a VAE (cache_latents.py, compute_latent_stats.py): the
    script's docstring kept as written, and the required ``--vae``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae",
        type=str,
        required=True,
        help="A diffusers AutoencoderKL folder, a pipeline folder with vae/, or a recipe name (random weights).",
    )
    return parser


def add_run_args(parser: argparse.ArgumentParser, tracker_project_name: str) -> tuple:
    """Flags every training script has (output, batch, steps, AdamW, precision, checkpoints, logging).

    Returns the ``(optimisation, logging)`` argument groups so a script can add its own flags to them.
    """
    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--output_dir", type=non_empty_path, default="repae-output", help="Checkpoints, logs and the pipeline."
    )
    opt.add_argument("--seed", type=seed_int, default=0, help="Seed (model init, data order; +rank for step noise).")
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
        type=positive_float,
        default=None,
        help="Also stop (checkpoint and export) once training has run this many minutes: for demos on slow "
        "hardware. Off by default.",
    )
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    opt.add_argument("--adam_beta1", type=finite_float, default=0.9, help="AdamW beta1 (every optimiser).")
    opt.add_argument("--adam_beta2", type=finite_float, default=0.999, help="AdamW beta2 (every optimiser).")
    opt.add_argument(
        "--adam_weight_decay", type=non_negative_float, default=0.0, help="AdamW weight decay (every optimiser)."
    )
    opt.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon (every optimiser).")
    opt.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="Gradient clipping norm (each model).")
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
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="DataLoader worker processes (0: main process). Default: 4, or 0 with --streaming, whose exact resume "
        "needs the stream read in the main process.",
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
    log.add_argument("--logging_dir", type=non_empty_path, default="logs", help="Tracker folder inside --output_dir.")
    log.add_argument("--tracker_project_name", type=str, default=tracker_project_name, help="Tracker project name.")
    log.add_argument(
        "--validation_steps",
        type=non_negative_int,
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


def check_run_args(args: argparse.Namespace) -> None:
    """Bad values of the `add_run_args` flags, each a ValueError naming the flag."""
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if not 0 <= args.lr_warmup_steps <= args.max_train_steps:
        raise ValueError(f"--lr_warmup_steps must be in [0, --max_train_steps], got {args.lr_warmup_steps}.")
    streaming = getattr(args, "streaming", False)
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 0 if streaming else 4
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if streaming and args.dataloader_num_workers > 0:
        raise ValueError(
            f"--dataloader_num_workers {args.dataloader_num_workers} with --streaming: a checkpoint holds the "
            "stream's position as the main process sees it, and workers would read ahead of it, so a resume would "
            "not continue where the run stopped. Use --dataloader_num_workers 0 (one process decodes about 180 "
            "images/s at 256 px; benchmarks/README.md)."
        )
    if getattr(args, "report_to", None) == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError("--report_to wandb needs the wandb package (pip install wandb); or use tensorboard or none.")


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
        type=positive_int,
        default=None,
        help="SiT block (1-based) whose tokens are aligned. Default: the recipe's projector config (8 for XL).",
    )
    enc.add_argument(
        "--projector_dim",
        type=positive_int,
        default=None,
        help="Hidden width of the projector MLP (default: recipe, 2048).",
    )
    enc.add_argument("--proj_coeff", type=non_negative_float, default=0.5, help="Alignment weight in the SiT loss.")
    enc.add_argument("--cfg_prob", type=finite_float, default=0.1, help="Probability of dropping a label to null.")
    enc.add_argument("--path_type", type=str, default="linear", choices=PATH_TYPES, help="Interpolant path.")
    enc.add_argument("--prediction", type=str, default="v", choices=["v"], help="Prediction target (v only).")
    enc.add_argument(
        "--weighting", type=str, default="uniform", choices=WEIGHTINGS, help="Training time distribution."
    )

    opt, log = add_run_args(parser, tracker_project_name)
    opt.add_argument("--learning_rate", type=positive_float, default=1e-4, help="AdamW learning rate of the SiT.")
    opt.add_argument("--ema_decay", type=finite_float, default=0.9999, help="EMA decay of the SiT and BN statistics.")
    opt.add_argument("--compile", action="store_true", help="torch.compile the SiT.")
    log.add_argument(
        "--num_validation_classes",
        type=positive_int,
        default=16,
        help="Classes in the validation grid (one image each).",
    )
    log.add_argument(
        "--validation_inference_steps", type=positive_int, default=None, help="Sampler steps (default: the recipe's)."
    )
    log.add_argument(
        "--validation_guidance_scale",
        type=finite_float,
        default=None,
        help="CFG scale for validation (default: recipe).",
    )
    return parser


def check_sit_training_args(args: argparse.Namespace) -> None:
    """Bad values of the shared flags, each a ValueError naming the flag, the value and what is allowed."""
    check_run_args(args)
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1], got {args.ema_decay}.")
    if not 0.0 <= args.cfg_prob < 1.0:
        raise ValueError(f"--cfg_prob must be in [0, 1), got {args.cfg_prob}.")


def add_vae_loss_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the VAE's losses and discriminator (train_repae.py and train_vae.py); defaults are REPA-E's."""
    group = parser.add_argument_group("VAE losses and discriminator")
    group.add_argument("--l1_weight", type=not_nan_float, default=1.0, help="Weight of the L1 reconstruction loss.")
    group.add_argument(
        "--lpips_weight",
        type=not_nan_float,
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
    group.add_argument("--kl_weight", type=not_nan_float, default=1e-6, help="Weight of the KL term.")
    group.add_argument("--disc_weight", type=not_nan_float, default=0.1, help="Weight of the generator's GAN term.")
    group.add_argument(
        "--disc_start", type=non_negative_int, default=0, help="Step from which the GAN terms are active."
    )
    group.add_argument("--disc_factor", type=not_nan_float, default=1.0, help="Factor on the GAN terms once active.")
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
    group.add_argument("--disc_ndf", type=positive_int, default=64, help="Channels of the discriminator's first conv.")
    group.add_argument(
        "--disc_layers", type=positive_int, default=3, help="Strided blocks of the PatchGAN discriminator."
    )
    group.add_argument(
        "--vae_learning_rate", type=positive_float, default=1e-4, help="AdamW learning rate of the VAE."
    )
    group.add_argument(
        "--disc_learning_rate", type=positive_float, default=1e-4, help="AdamW learning rate of the discriminator."
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


def parse_encoder_paths(items: list[str] | None) -> dict[str, str]:
    """``--encoder_paths NAME=PATH ...`` -> ``{NAME: PATH}``."""
    paths = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--encoder_paths entries must look like NAME=PATH, got {item!r}.")
        paths[name] = path
    return paths


def run_config(args: argparse.Namespace) -> RunConfig:
    """The `add_run_args` flags as the library's `RunConfig`."""
    return RunConfig(
        output_dir=args.output_dir, seed=args.seed, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_train_steps=args.max_train_steps,
        max_train_minutes=args.max_train_minutes, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps, mixed_precision=args.mixed_precision, allow_tf32=args.allow_tf32,
        dataloader_num_workers=args.dataloader_num_workers, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, resume_from_checkpoint=args.resume_from_checkpoint,
        overwrite=args.overwrite, validation_steps=args.validation_steps, report_to=args.report_to,
        logging_dir=args.logging_dir, tracker_project_name=args.tracker_project_name, push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id, hub_token=args.hub_token,
    )  # fmt: skip


def tracker_config(args: argparse.Namespace) -> dict:
    """The flags the trackers record with the run (the plain ones)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def adamw_options(args: argparse.Namespace) -> dict:
    """The shared ``--adam_*`` / ``--use_8bit_adam`` flags as `make_adamw` keyword arguments."""
    return {
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
        "use_8bit": getattr(args, "use_8bit_adam", False),
    }


def vae_loss_options(args: argparse.Namespace) -> dict:
    """The `add_vae_loss_args` flags as `build_vae_loss` keyword arguments."""
    names = ("l1_weight", "lpips_weight", "kl_weight", "disc_weight", "disc_start", "disc_factor")
    options = {name: getattr(args, name) for name in names}
    options.update(
        adaptive_disc_weight=args.adaptive_disc_weight,
        lpips_input_range=args.lpips_input_range,
        lpips_vgg_path=args.lpips_vgg_path,
    )
    return options


def validation_options(args: argparse.Namespace) -> dict:
    """The validation-grid flags of `add_sit_training_args` as `log_validation` keyword arguments."""
    return {
        "output_dir": args.output_dir,
        "seed": args.seed,
        "num_classes": args.num_validation_classes,
        "num_inference_steps": args.validation_inference_steps,
        "guidance_scale": args.validation_guidance_scale,
    }

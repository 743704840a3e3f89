"""Sample a grid of class-conditional images from a REPA-E pipeline folder (or a recipe, with random weights).

    python training/sample.py --pretrained tiny-cpu --class_labels 0 1 2 3 --num_inference_steps 4 --output grid.png
    python training/sample.py --pretrained path/to/saved_pipeline --class_labels 207 "golden retriever" \
        --sampler sde --num_inference_steps 250 --guidance_scale 2.2 --guidance_interval 0 0.65 --seed 0
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from diffusers_repae import RepaEPipeline
from diffusers_repae.cli import (
    UserError,
    device_name,
    finite_float,
    positive_int,
    refuse_overwrite,
    run_cli,
    seed_int,
)  # fmt: skip
from diffusers_repae.recipes import resolve_recipe
from diffusers_repae.schedulers import SAMPLERS
from diffusers_repae.weight_files import loading


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained",
        required=True,
        help="A RepaEPipeline.save_pretrained folder, or a recipe (name like 'tiny-cpu' or folder) without weights: "
        "then the models get RANDOM weights (a smoke test, not a model).",
    )
    parser.add_argument(
        "--class_labels", nargs="+", required=True, help="Class ids or names (e.g. 207 'golden retriever')."
    )
    parser.add_argument(
        "--num_inference_steps", type=positive_int, default=None, help="Sampler steps (default: the model card's)."
    )
    parser.add_argument(
        "--sampler", choices=sorted(SAMPLERS), default=None, help="Sampler (default: the pipeline's scheduler)."
    )
    parser.add_argument(
        "--guidance_scale", type=finite_float, default=None, help="Classifier-free guidance; <= 1 disables it."
    )
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="Apply guidance only for LOW <= t <= HIGH (default: the model card's).",
    )
    parser.add_argument("--num_images_per_label", type=positive_int, default=1, help="Images per class label.")
    parser.add_argument(
        "--seed", type=seed_int, default=0, help="Seed of the generator (initial noise and SDE noise)."
    )
    parser.add_argument("--float64", action="store_true", help="Run the sampler state in float64, like the original.")
    parser.add_argument(
        "--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device."
    )
    parser.add_argument(
        "--num_threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's; 1 suits tiny models).",
    )
    parser.add_argument("--output", default="grid.png", help="Where to write the image grid (PNG).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    parser.add_argument(
        "--lora", default=None, help="A LoRA folder written by train_ldm.py --lora_rank (OUTPUT_DIR/lora) to load."
    )
    return parser.parse_args(argv)


def has_weights(folder: Path) -> bool:
    """True when the transformer folder holds a weight file (a saved pipeline rather than a bare recipe)."""
    return any((folder / "transformer").glob("*.safetensors")) or any((folder / "transformer").glob("*.bin"))


def load_pipeline(pretrained: str) -> RepaEPipeline:
    folder = resolve_recipe(pretrained)
    if has_weights(folder):
        return RepaEPipeline.from_pretrained(folder)
    print(
        "\n" + "!" * 100 + f"\nWARNING: {folder} has no weights: building the recipe with RANDOM weights. "
        "The images are meaningless;\nthis only shows that sampling runs. Pass a save_pretrained folder for real "
        "samples.\n" + "!" * 100 + "\n",
        file=sys.stderr,
    )
    return RepaEPipeline.from_recipe(folder)


def parse_label(label: str) -> int | str:
    return int(label) if label.lstrip("-").isdigit() else label


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    refuse_overwrite(
        args.output, "--output", {"--pretrained": args.pretrained, "--lora": args.lora}, overwrite=args.overwrite
    )
    if Path(args.output).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--output {args.output!r} must end in .png, .jpg or .webp (the grid is an image).")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    pipe = load_pipeline(args.pretrained)
    if args.lora is not None:
        with loading("--lora", args.lora, "LoRA folder (OUTPUT_DIR/lora of train_ldm.py --lora_rank)"):
            pipe.load_lora_weights(args.lora)  # diffusers' loader; new classes and their names come with it
    pipe = pipe.to(args.device)
    batch = len(args.class_labels) * args.num_images_per_label
    pipe.check_batch_fits(
        batch, f"--class_labels x --num_images_per_label ({batch} images in one call)", "ask for fewer images"
    )
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    images = pipe(
        class_labels=[parse_label(label) for label in args.class_labels],
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        num_images_per_label=args.num_images_per_label,
        sampler=args.sampler,
        sampling_dtype=torch.float64 if args.float64 else torch.float32,
        generator=generator,
    ).images
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    images += [images[0].point(lambda _: 0)] * (rows * cols - len(images))  # pad with black tiles
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=rows, cols=cols).save(args.output)
    print(f"wrote {args.output} ({len(args.class_labels) * args.num_images_per_label} images, {rows}x{cols} grid)")


if __name__ == "__main__":
    run_cli(main)

"""Generate many samples for FID (ADM protocol) on any number of GPUs; resumable; PNGs + ADM-style ``.npz``.

    accelerate launch --num_processes 8 training/sample_fid.py --pretrained path/to/pipeline \
        --output_dir samples/sit-xl-2 --num_samples 50000 --sampler sde --num_inference_steps 250 \
        --guidance_scale 2.2 --guidance_interval 0 0.65 --batch_size 64

Every sample depends only on its global index and ``--seed`` (label and all its noise), so the result is the same
for any number of processes or batch size. Re-running the same command after an interruption makes only the
missing PNGs; raising ``--num_samples`` extends a finished run (labels and noise of existing indices stay the
same). Other settings are recorded in ``sampling_config.json`` and a mismatch is refused. At the end the main
process packs ``images/*.png`` into ``samples_NxHxWx3.npz`` (``arr_0`` uint8 images, ``arr_1`` labels) for
``training/evaluate.py`` or ADM's evaluator. On CPU, ``torchrun --nproc_per_node 2 ... --cpu`` runs 2 processes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from diffusers_repae import RepaEPipeline
from diffusers_repae.cli import (
    UserError,
    finite_float,
    foreign_entries,
    non_empty_path,
    positive_int,
    refuse_overwrite,
    remove_ours,
    run_cli,
    seed_int,
)
from diffusers_repae.evaluation.sampling import (
    LABEL_SAMPLING,
    RUN_CONFIG_NAME,
    check_run_config,
    collect_npz,
    config_matches,
    missing_indices,
    run_sampling,
    sample_labels,
)
from diffusers_repae.memory import check_fits
from diffusers_repae.recipes import resolve_recipe
from diffusers_repae.run_lock import LOCK_NAME, check_not_locked, folder_lock
from diffusers_repae.schedulers import SAMPLERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained",
        required=True,
        help="RepaEPipeline.save_pretrained folder, or a recipe name/folder (RANDOM weights: a smoke test only).",
    )
    parser.add_argument(
        "--output_dir",
        type=non_empty_path,
        required=True,
        help="Folder for images/, the .npz and sampling_config.json.",
    )
    parser.add_argument(
        "--num_samples", type=positive_int, default=50000, help="Total number of samples (ADM: 50000)."
    )
    parser.add_argument(
        "--label_sampling",
        choices=LABEL_SAMPLING,
        default="balanced",
        help="balanced: label = index %% num_classes (50 per class for 50k on ImageNet); random: uniform labels.",
    )
    parser.add_argument(
        "--num_classes", type=positive_int, default=None, help="Classes to sample (default: the model's)."
    )
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="Sampler (default: pipeline's).")
    parser.add_argument(
        "--num_inference_steps", type=positive_int, default=None, help="Sampler steps (default: model card)."
    )
    parser.add_argument("--guidance_scale", type=finite_float, default=None, help="CFG scale; <= 1 disables guidance.")
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="Apply guidance only for LOW <= t <= HIGH (default: the model card's).",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="Run seed; sample i uses a generator from (seed, i).")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="Images per forward pass per process.")
    parser.add_argument("--float64", action="store_true", help="Sampler state in float64, like the original.")
    parser.add_argument(
        "--model_dtype", choices=sorted(DTYPES), default="float32", help="dtype of the transformer and VAE weights."
    )
    parser.add_argument(
        "--cpu", action="store_true", help="Run on CPU (several CPU processes via torchrun use the gloo backend)."
    )
    parser.add_argument("--npz_path", default=None, help="Where to write the .npz (default: in --output_dir).")
    parser.add_argument("--skip_npz", action="store_true", help="Only write PNGs (pack them later by re-running).")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Start over where a previous sampling run of other settings is (its images, .npz and config are "
        "removed; a run of the same settings resumes), and replace an existing --npz_path. A folder holding "
        "anything a sampling run does not write is refused.",
    )
    return parser.parse_args(argv)


def load_pipeline(pretrained: str, dtype: torch.dtype) -> RepaEPipeline:
    folder = resolve_recipe(pretrained)
    if any((folder / "transformer").glob("*.safetensors")) or any((folder / "transformer").glob("*.bin")):
        return RepaEPipeline.from_pretrained(folder, dtype=dtype)
    print(f"WARNING: {folder} has no weights: sampling a RANDOM model (a smoke test, not a result).", file=sys.stderr)
    pipe = RepaEPipeline.from_recipe(folder)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def weights_fingerprint(pretrained: str) -> str:
    """sha256 over the pipeline's weight and config files (names and bytes): what was sampled, not only where."""
    folder = resolve_recipe(pretrained)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def ours_in(output: Path):
    """What a sampling run writes in its --output_dir, as a test of an entry: images/NNNNNN.png (and the hidden
    temporary files of its atomic writes), samples_*.npz, sampling_config.json and the lock."""

    def is_ours(entry: Path) -> bool:
        parts = entry.relative_to(output).parts
        if parts[0] == "images":
            return entry.is_dir() if len(parts) == 1 else (len(parts) == 2 and entry.suffix == ".png")
        return len(parts) == 1 and (
            entry.name in (RUN_CONFIG_NAME, LOCK_NAME) or (entry.name.startswith("samples_") and ".npz" in entry.name)
        )

    return is_ours


def check_output_dir(args: argparse.Namespace) -> bool:
    """Checks every path before anything is written; returns True when --overwrite must empty --output_dir of a
    previous sampling run (done only once the model has loaded: nothing is deleted for a command that fails)."""
    output = Path(args.output_dir)
    if not output.is_dir() or not any(output.iterdir()):
        return False
    if args.overwrite:
        foreign = foreign_entries(output, ours_in(output))
        if foreign:
            raise UserError(
                f"--output_dir {str(output)!r} holds {str(foreign[0].relative_to(output))!r}, which no sampling run "
                "wrote: --overwrite removes only a previous run's own files. Move it, or choose another folder."
            )
        return not (output / RUN_CONFIG_NAME).is_file()  # a run of other settings is replaced at check_run_config
    if not (output / RUN_CONFIG_NAME).is_file():
        raise UserError(
            f"--output_dir {str(output)!r} is not empty and holds no sampling run: choose another folder, or pass "
            "--overwrite to replace what a previous sampling run left there."
        )
    return False


def check_paths(args: argparse.Namespace) -> None:
    """Every path and number, before the output folder is touched."""
    if not args.output_dir.strip():
        raise UserError("--output_dir must be a path, got '' (an empty path means the current folder).")
    refuse_overwrite(args.output_dir, "--output_dir", {"--pretrained": args.pretrained}, overwrite=True)
    try:  # a missing --pretrained fails here, before anything is written or removed
        resolve_recipe(args.pretrained)
    except (ValueError, OSError) as error:
        raise UserError(f"--pretrained: {error}") from None
    if args.npz_path:
        refuse_overwrite(args.npz_path, "--npz_path", {"--pretrained": args.pretrained}, overwrite=args.overwrite)
    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num_samples and --batch_size must be >= 1.")
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num_classes must be >= 1, got {args.num_classes}.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state = PartialState(cpu=args.cpu)
    if state.is_main_process:
        check_paths(args)
        check_not_locked(args.output_dir)
        start_over = check_output_dir(args)
    state.wait_for_everyone()
    with folder_lock(args.output_dir, enabled=state.is_main_process):  # one sampling run per folder
        sample(args, state, start_over if state.is_main_process else False)


def check_sizes_fit(args: argparse.Namespace, pipe: RepaEPipeline, device) -> None:
    """Sizes that cannot fit in memory are refused before the first sample: one batch on the device and, unless
    --skip_npz, the .npz of every sample (assembled in RAM), plus the labels of all samples."""
    batch = min(args.batch_size, args.num_samples)
    pipe.check_batch_fits(batch, f"--batch_size {args.batch_size}", "pass a smaller --batch_size")
    side = pipe.image_size
    per_sample = 8 + (0 if args.skip_npz else side * side * 3)  # an int64 label, and uint8 pixels
    what = f"--num_samples {args.num_samples:,} at {side} px" + ("" if args.skip_npz else " (the .npz is in RAM)")
    check_fits(args.num_samples * per_sample, what, "pass fewer --num_samples, or --skip_npz to keep only PNGs")


def sample(args: argparse.Namespace, state: PartialState, start_over: bool) -> None:
    pipe = load_pipeline(args.pretrained, DTYPES[args.model_dtype]).to(state.device)
    check_sizes_fit(args, pipe, state.device)
    pipe.set_progress_bar_config(disable=True)
    num_classes = args.num_classes or pipe.transformer.config.num_classes
    if not 1 <= num_classes <= pipe.transformer.config.num_classes:
        raise ValueError(f"num_classes must be in [1, {pipe.transformer.config.num_classes}], got {num_classes}.")
    labels = sample_labels(args.num_samples, num_classes, args.label_sampling, args.seed)
    call_kwargs = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": args.guidance_interval,
        "sampler": args.sampler,
        "sampling_dtype": torch.float64 if args.float64 else torch.float32,
    }
    run_config = {
        "pretrained": str(args.pretrained),
        "label_sampling": args.label_sampling,
        "num_classes": num_classes,
        "seed": args.seed,
        "sampler": args.sampler,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": args.guidance_interval,
        "float64": args.float64,
        "model_dtype": args.model_dtype,
        # a retrained model at the same path is refused (only the main process checks: only it hashes)
        "weights_sha256": weights_fingerprint(args.pretrained) if state.is_main_process else None,
    }
    if state.is_main_process:
        if not config_matches(args.output_dir, run_config):
            if not any((Path(args.output_dir) / "images").glob("*.png")):  # a failed run that made no sample: it
                (Path(args.output_dir) / RUN_CONFIG_NAME).unlink()  # blocks no corrected command
            elif args.overwrite:
                start_over = True  # another run's samples: replaced
        if start_over:
            remove_ours(args.output_dir, "--output_dir", ours_in(Path(args.output_dir)), keep=(LOCK_NAME,))
        check_run_config(args.output_dir, run_config)
    state.wait_for_everyone()
    todo = missing_indices(args.output_dir, args.num_samples)  # every process reads this before anyone writes
    state.wait_for_everyone()

    done = args.num_samples - len(todo)
    share = -(-len(todo) // state.num_processes)
    if state.is_main_process:
        print(f"{done} of {args.num_samples} samples already exist; {len(todo)} to make on {state.num_processes} "
              f"process(es) with batch size {args.batch_size}.")  # fmt: skip
    bar = tqdm(total=share, desc="sampling (this process)", unit="img", disable=not state.is_main_process)
    start = time.perf_counter()
    made = run_sampling(
        pipe, args.output_dir, todo, labels, args.seed, args.batch_size,
        state.process_index, state.num_processes, on_batch=bar.update, **call_kwargs,
    )  # fmt: skip
    bar.close()
    elapsed = time.perf_counter() - start
    state.wait_for_everyone()
    if state.is_main_process:
        rate = made / elapsed if elapsed > 0 and made else 0.0
        print(f"main process made {made} images in {elapsed:.1f} s ({rate:.2f} img/s per process)")
        if not args.skip_npz:
            path = collect_npz(args.output_dir, args.num_samples, labels, args.npz_path)
            print(f"wrote {path}")
    state.wait_for_everyone()


if __name__ == "__main__":
    run_cli(main)

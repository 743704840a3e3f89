#!/usr/bin/env python
"""`make demo`: REPA-E's stages, composed on a 2-core CPU in under 10 minutes, fully offline.

Renders the embedded OpenMoji emoji at 32 px (or reads your images: ``--train_data_dir`` / ``--dataset_name``) and
runs the package's own scripts, one per stage, each writing a normal folder you can reuse:

    demo/stage1-repae/    train_repae.py   end-to-end REPA-E: VAE + SiT + alignment to EfficientNet-Lite0 together
    demo/latents/         cache_latents.py the stage-1 VAE's posterior of every training image
    demo/stage2-ldm/      train_ldm.py     stage 2: the stage-1 SiT trains on in the frozen end-to-end VAE's latent
                                           space (cached), its learning rate decaying to 0
    demo/stage3-decoder/  train_vae.py     the stage-1 decoder fine-tuned on the frozen encoder, on noise-perturbed
                                           latents (so it decodes a SiT's imperfect latents well), with a patch-GAN
                                           term and a decaying learning rate in its second half
    demo/pipeline/        RepaEPipeline.from_pretrained("demo/pipeline"): the stage-2 SiT with the stage-3 VAE

and then reports on itself:

    demo/metrics.json          FD-EfficientNetLite0 / precision / recall of class-balanced samples against the
                               training images (the offline extractor; not comparable with FID), of the VAE's
                               reconstructions alone, and what each stage cost
    demo/samples.png           one labelled row per class
    demo/reconstructions.png   real training images above their VAE reconstructions
    demo/loss_curves.png       the training curves of the three training stages

Departures from the paper's recipe, all because this is a 10-minute CPU run (the log and model cards say so): no
LPIPS term (torchvision's VGG16 weights cannot be had offline), the GAN term only in the decoder stage, the VAE
starts from random weights (REPA-E starts from a trained VAE), a tiny VAE and SiT at 32 px, batch 16, lognormal time
sampling, higher learning rates with warm-up, EMA decay 0.995, 50 SDE steps with guidance 3.0, and the decoder
stage, which the paper does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diffusers_repae import RepaEPipeline
from diffusers_repae.cli import UserError, refuse_moved_flags, refuse_overwrite, run_cli
from diffusers_repae.evaluation.quick_score import (
    balanced_latents,
    cached_reference_features,
    dataset_images,
    decoded_samples,
    pooled_features,
    reconstructions,
    score_features,
)
from diffusers_repae.recipes import DEMO_RECIPE
from diffusers_repae.run_lock import check_not_locked, folder_lock
from diffusers_repae.training.data import load_training_dataset
from diffusers_repae.training.loop import cpu_has_bf16
from diffusers_repae.training.stages import stage_command

REPO = Path(__file__).resolve().parents[1]
RECIPE = DEMO_RECIPE
# Flags of the former single-run demo: what replaced each one.
MOVED_FLAGS = {
    "--max_train_steps": "the demo runs stages now: --stage1_steps, --stage2_steps and --decoder_steps",
    "--vae_freeze_step": "stage 1 ends after --stage1_steps; stage 2 trains the SiT on the frozen VAE",
    "--decoder_only_step": "the decoder trains in its own stage (--decoder_steps)",
    "--gan_start": "--decoder_gan_start (a step of the decoder stage)",
    "--max_train_minutes": "the demo trains its recipe's steps; lower the stages' steps for a shorter run",
    "--vae_warmup_steps": "there is no VAE warm-up; train a VAE first with training/train_vae.py",
    "--constant_sit_lr": "stage 2's learning rate always decays (train_ldm.py --lr_scheduler linear)",
    "--no_decoder_training": "--decoder_steps 0",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    refuse_moved_flags(argv, MOVED_FLAGS, "a demo option")
    parser = argparse.ArgumentParser(
        description="REPA-E demo: its stages on OpenMoji (or your images) on the CPU, offline, in under 10 minutes, "
        "then scores and shows what it learned.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", type=str, default=str(REPO / "demo"), help="Where everything goes.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")
    data = parser.add_argument_group("data (default: the embedded OpenMoji emoji, labelled by Unicode group)")
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Your own images instead: a folder with one sub-folder per class (class_name/xxx.png).",
    )
    data.add_argument("--dataset_name", type=str, default=None, help="Or a `datasets` dataset (Hub id or local).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Its configuration, if it has several.")
    data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    data.add_argument("--label_column", type=str, default="label", help="Label column of --dataset_name.")
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Stream --dataset_name instead of downloading it: every stage streams, stage 2 encodes its latents on "
        "the fly (the latent cache is for downloaded data) and the scores use the stream's first images.",
    )
    data.add_argument("--resolution", type=int, default=32, help="Image side in pixels (a multiple of 16).")
    stages = parser.add_argument_group("stages")
    stages.add_argument("--stage1_steps", type=int, default=1000, help="Steps of end-to-end REPA-E (train_repae.py).")
    stages.add_argument(
        "--stage2_steps",
        type=int,
        default=1000,
        help="Steps of the SiT on the frozen stage-1 VAE (train_ldm.py), its learning rate decaying linearly to 0.",
    )
    stages.add_argument(
        "--decoder_steps",
        type=int,
        default=2000,
        help="Steps of decoder fine-tuning on the frozen stage-1 encoder (train_vae.py --freeze_encoder). 0: keep "
        "the stage-1 decoder.",
    )
    stages.add_argument(
        "--decoder_latent_noise",
        type=float,
        default=0.8,
        help="The decoder stage decodes latents plus Gaussian noise of up to this times each channel's std, so "
        "that it decodes the SiT's imperfect latents well. 0: no noise.",
    )
    stages.add_argument(
        "--decoder_gan_start",
        type=int,
        default=1000,
        help="Step of the decoder stage from which its loss has a patch-GAN term (adaptive weight, as in "
        "taming/LDM) and its learning rate decays linearly to 0.",
    )
    stages.add_argument(
        "--gan_weight", type=float, default=0.25, help="The GAN term's weight relative to the reconstruction's."
    )
    stages.add_argument("--train_batch_size", type=int, default=16, help="Batch size of every stage.")
    stages.add_argument("--learning_rate", type=float, default=5e-4, help="Learning rate of the SiT.")
    stages.add_argument("--vae_learning_rate", type=float, default=1e-3, help="Learning rate of the VAE.")
    stages.add_argument("--ema_decay", type=float, default=0.995, help="EMA decay of the SiT.")
    stages.add_argument("--seed", type=int, default=0, help="Seed for training and sampling.")
    stages.add_argument(
        "--mixed_precision",
        choices=["auto", "no", "bf16"],
        default="auto",
        help="'auto': bf16 autocast when the CPU has bf16 units (avx512_bf16 / amx_bf16), fp32 otherwise.",
    )
    sampling = parser.add_argument_group("sampling and scoring")
    sampling.add_argument("--num_eval_samples", type=int, default=360, help="Samples scored against the data.")
    sampling.add_argument(
        "--num_reference_images",
        type=int,
        default=2000,
        help="Training images the samples are scored against: the first N in dataset order (OpenMoji: all 1,898).",
    )
    sampling.add_argument("--num_inference_steps", type=int, default=50, help="Sampler steps.")
    sampling.add_argument("--guidance_scale", type=float, default=3.0, help="Classifier-free guidance scale.")
    sampling.add_argument("--sampler", choices=["sde", "euler", "heun"], default="sde", help="Sampler.")
    args = parser.parse_args(argv)
    if args.dataset_name and args.train_data_dir:
        parser.error("give --train_data_dir or --dataset_name, not both.")
    if args.streaming and not args.dataset_name:
        parser.error("--streaming streams a --dataset_name; give one (image folders and OpenMoji are read directly).")
    if args.num_reference_images < 10:
        parser.error(f"--num_reference_images must be >= 10, got {args.num_reference_images}.")
    for flag in ("stage1_steps", "stage2_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.decoder_steps < 0:
        parser.error(f"--decoder_steps must be >= 0, got {args.decoder_steps}.")
    if args.decoder_steps and not 0 <= args.decoder_gan_start < args.decoder_steps:
        parser.error(
            f"--decoder_gan_start must be in [0, --decoder_steps={args.decoder_steps}), got {args.decoder_gan_start}."
        )
    if args.decoder_latent_noise < 0 or args.gan_weight <= 0:
        parser.error(
            f"--decoder_latent_noise must be >= 0 and --gan_weight > 0, got {args.decoder_latent_noise} and "
            f"{args.gan_weight}."
        )
    if args.num_eval_samples < 10:
        parser.error(f"--num_eval_samples must be >= 10, got {args.num_eval_samples}.")
    return args


def data_options(args) -> dict:
    """The demo's data, as every stage's keyword arguments."""
    options = {"resolution": args.resolution, "train_data_dir": args.train_data_dir}
    if args.dataset_name:
        options.update(
            dataset_name=args.dataset_name, image_column=args.image_column, label_column=args.label_column,
            dataset_config_name=args.dataset_config_name, streaming=args.streaming,
        )  # fmt: skip
    return options


def run_options(args, output_dir: Path, steps: int, precision: str) -> dict:
    """What every training stage shares: batch, steps, precision, one checkpoint at the end, no validation."""
    return {
        "output_dir": output_dir, "max_train_steps": steps, "train_batch_size": args.train_batch_size,
        "mixed_precision": precision, "seed": args.seed, "checkpointing_steps": steps, "checkpoints_total_limit": 1,
        "validation_steps": 0, "dataloader_num_workers": 0, "report_to": "tensorboard", **data_options(args),
    }  # fmt: skip


def gan_options(args, start: int) -> dict:
    """A small patch-GAN discriminator, adaptively weighted, active from ``start``."""
    return {"disc_start": start, "disc_ndf": 32, "adaptive_disc_weight": True, "disc_weight": args.gan_weight}


Step = tuple[str, "list[str] | Callable[[], None]"]  # (name, a stage's command line, or work for this process)
Lane = list[Step]  # steps run one after the other


def stage_commands(args, out: Path, precision: str) -> list[list[Lane]]:
    """Groups of lanes, in order: each group reads the folders the earlier groups wrote, and the lanes of one group
    run side by side (the latent cache then stage 2 in one lane, the decoder stage in the other: both start from
    stage 1)."""
    stage1, latents, stage2, stage3 = (
        out / name for name in ("stage1-repae", "latents", "stage2-ldm", "stage3-decoder")
    )

    def warmup(steps: int) -> dict:
        return {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": min(100, steps)}

    encoder = {"enc_type": "efficientnet-lite0", "weighting": "lognormal", "ema_decay": args.ema_decay}
    stage_1 = ("stage 1: end-to-end REPA-E (VAE + SiT + alignment)", stage_command(
        "train_repae", recipe=RECIPE, **encoder, no_lpips=True, **gan_options(args, 1_000_000_000),
        **warmup(args.stage1_steps), learning_rate=args.learning_rate, vae_learning_rate=args.vae_learning_rate,
        **run_options(args, stage1, args.stage1_steps, precision),
    ))  # fmt: skip
    cache = ("latent cache of the stage-1 VAE", stage_command(
        "cache_latents", vae=stage1, output_dir=latents, **data_options(args),
    ))  # fmt: skip
    stage_2 = ("stage 2: the SiT on the frozen end-to-end VAE", stage_command(
        "train_ldm", pretrained_model_name_or_path=stage1,
        latents_dir=None if args.streaming else latents,  # a stream is encoded on the fly
        **encoder, learning_rate=args.learning_rate, lr_scheduler="linear", lr_warmup_steps=0,
        **run_options(args, stage2, args.stage2_steps, precision),
    ))  # fmt: skip
    ldm_lane = [stage_2] if args.streaming else [cache, stage_2]
    if not args.decoder_steps:
        return [[[stage_1]], [ldm_lane]]
    stage_3 = ("stage 3: the decoder on the frozen encoder", stage_command(
        "train_vae", vae=stage1, freeze_encoder=True, decoder_latent_noise=args.decoder_latent_noise,
        no_lpips=True, **gan_options(args, args.decoder_gan_start), **warmup(args.decoder_steps),
        lr_decay_start=args.decoder_gan_start, vae_learning_rate=args.vae_learning_rate,
        **run_options(args, stage3, args.decoder_steps, precision),
    ))  # fmt: skip
    return [[[stage_1]], [ldm_lane, [stage_3]]]


def run_lanes(lanes: list[Lane], out: Path) -> dict[str, float]:
    """Runs the lanes side by side, sharing the cores (a lone lane gets them all and prints to the terminal; side by
    side, each script writes ``out/<its folder>.log`` and this process's own work gets one lane's share). Returns
    each step's wall time in minutes; a failed step stops every lane."""
    threads = max(1, (os.cpu_count() or 1) // len(lanes))
    side_by_side = len(lanes) > 1
    minutes, failures, running = {}, [], []
    stopped = threading.Event()

    def run_script(name: str, command: list[str]) -> None:
        print(f"      {name}: python training/{Path(command[1]).name} {' '.join(command[2:])}", flush=True)
        log_path = out / f"{Path(command[command.index('--output_dir') + 1]).name}.log" if side_by_side else None
        if log_path:
            print(f"        (side by side, {threads} thread(s); log: {log_path})", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if side_by_side else None
        with open(log_path or os.devnull, "w") as log:
            output = {"stdout": log, "stderr": subprocess.STDOUT} if log_path else {}
            process = subprocess.Popen(command, env=env, **output)
            running.append(process)
            status = process.wait()
        if status != 0 and not stopped.is_set():
            where = f"its log is {log_path}" if log_path else "its output is above"
            raise UserError(f"{name} failed (exit status {status}); {where}.")

    def run_lane(lane: Lane) -> None:
        for name, work in lane:
            if stopped.is_set():
                return
            began = time.perf_counter()
            try:
                if callable(work):
                    # this process's share of the cores: all of those the finished lanes left
                    share = max(1, (os.cpu_count() or 1) // sum(worker.is_alive() for worker in workers))
                    torch.set_num_threads(share)
                    print(f"      {name} (in this process, {share} thread(s))", flush=True)
                    work()
                else:
                    run_script(name, work)
            except BaseException as error:  # noqa: BLE001 - the main thread re-raises it
                failures.append(error)
                stopped.set()
                return
            minutes[name] = round((time.perf_counter() - began) / 60, 2)

    previous_threads = torch.get_num_threads()  # each in-process step sets its own share; restored below
    workers = [threading.Thread(target=run_lane, args=(lane,), daemon=True) for lane in lanes]
    try:
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers) and not stopped.wait(0.5):
            pass
    finally:
        stopped.set()  # a failure or Ctrl-C: no lane starts another step, and running scripts are stopped
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
        torch.set_num_threads(previous_threads)
    for worker in workers:  # not reached on Ctrl-C: this process's own work is left to end with it
        worker.join()
    if failures:
        raise failures[0]
    return minutes


def compose_pipeline(out: Path, args) -> Path:
    """demo/pipeline: the stage-2 pipeline with the stage-3 VAE (same encoder, so the same latents and statistics),
    sampling by default as the demo scores."""
    from diffusers import AutoencoderKL

    stage2, stage3, pipeline_dir = out / "stage2-ldm", out / "stage3-decoder", out / "pipeline"
    vae = AutoencoderKL.from_pretrained(stage3) if args.decoder_steps else None
    pipe = RepaEPipeline.from_pretrained(stage2, **({"vae": vae} if vae is not None else {}))
    pipe.save_pretrained(pipeline_dir)
    set_sampling_defaults(pipeline_dir, args.num_inference_steps, args.guidance_scale)
    card = (stage2 / "README.md").read_text()
    if args.decoder_steps:
        card += f"\n\nThe VAE's decoder was then fine-tuned on the frozen encoder: see {stage3 / 'README.md'}.\n"
    (pipeline_dir / "README.md").write_text(card)
    return pipeline_dir


def combined_loss_curves(out: Path) -> None:
    """The stages' loss curves side by side in one picture."""
    from PIL import Image

    parts = [Image.open(path) for name in ("stage1-repae", "stage2-ldm", "stage3-decoder")
             if (path := out / name / "loss_curves.png").is_file()]  # fmt: skip
    if not parts:
        return
    height = max(part.height for part in parts)
    canvas = Image.new("RGB", (sum(part.width for part in parts), height), "white")
    x = 0
    for part in parts:
        canvas.paste(part, (x, 0))
        x += part.width
    canvas.save(out / "loss_curves.png")


def set_sampling_defaults(pipeline_dir: Path, num_inference_steps: int, guidance_scale: float) -> None:
    """Make the demo's sampler settings the exported pipeline's defaults (model_index.json), so that
    ``RepaEPipeline.from_pretrained(pipeline_dir)(class_labels=...)`` samples as the demo scored."""
    index_path = pipeline_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(default_num_inference_steps=num_inference_steps, default_guidance_scale=guidance_scale)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def named_scores(scores: dict) -> dict:
    """``score_features``' fd / precision / recall under their metrics.json names, rounded for reading."""
    return {
        "FD-EfficientNetLite0": round(scores["fd"], 2),
        "precision-EfficientNetLite0": round(scores["precision"], 4),
        "recall-EfficientNetLite0": round(scores["recall"], 4),
    }


def labelled_rows(images: np.ndarray, labels: np.ndarray, names: dict[int, str], per_row: int = 8, zoom: int = 2):
    """One row per class: its name on the left, then ``per_row`` samples, each enlarged ``zoom`` times."""
    from PIL import Image, ImageDraw, ImageFont

    side = images.shape[1] * zoom
    classes = sorted(names)
    titles = {class_id: names[class_id][:24] for class_id in classes}
    font = ImageFont.load_default()
    # The label column is as wide as the longest title, so short names leave no empty band.
    label_width = 8 + max(round(font.getlength(title)) for title in titles.values())
    grid = Image.new("RGB", (label_width + per_row * side, len(classes) * side), "white")
    draw = ImageDraw.Draw(grid)
    for row, class_id in enumerate(classes):
        draw.text((4, row * side + side // 2 - 6), titles[class_id], fill="black", font=font)
        for column, image in enumerate(images[labels == class_id][:per_row]):
            tile = Image.fromarray(image).resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_width + column * side, row * side))
    return grid


def reconstruction_grid(vae, images: np.ndarray, zoom: int = 2):
    """Real images (top row of each pair) above their VAE reconstructions (posterior mean), enlarged ``zoom``x."""
    from PIL import Image

    pairs = [np.concatenate(list(part), axis=1) for part in (images, reconstructions(vae, images))]
    grid = np.concatenate(pairs, axis=0)
    return Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST)


def spread_over_classes(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` items taking classes in turn (so the reconstruction grid shows every class)."""
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    picked = []
    while len(picked) < count and any(by_class):
        for members in by_class:
            if members and len(picked) < count:
                picked.append(members.pop(0))
    return np.array(picked)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    check_not_locked(out)  # a demo running into this folder is reported before anything is removed
    refuse_overwrite(out, "--output_dir", {"--train_data_dir": args.train_data_dir}, overwrite=args.overwrite)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with folder_lock(out):  # one demo per folder
        return run_demo(args, out, start)


def run_demo(args, out: Path, start: float) -> dict:
    """Trains the stages into the empty folder ``out``, scores the result and draws the pictures."""
    precision = "bf16" if args.mixed_precision == "auto" and cpu_has_bf16() else args.mixed_precision
    precision = "no" if precision == "auto" else precision

    print(f"[1/4] loading the training images at {args.resolution} px ...", flush=True)
    data = load_training_dataset(
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        dataset_config_name=args.dataset_config_name,
        image_column=args.image_column,
        label_column=args.label_column,
        resolution=args.resolution,
        streaming=args.streaming,
    )
    print(f"      {data.describe_size()}, {data.num_classes} classes ({data.source})")
    if data.attribution:
        print(f"      {data.attribution}")

    print("[2/4] training, stage by stage (each stage is a script run; its folder is reusable) ...", flush=True)
    print(
        "      NOTE: no LPIPS term (VGG16 weights are not available offline); the GAN term only in the decoder stage."
    )
    print(f"      precision: {'bf16 autocast' if precision == 'bf16' else 'fp32'}; {torch.get_num_threads()} threads")
    call = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "sampler": args.sampler,
    }
    prepared = {}  # what this process prepares for the scores while the decoder stage still trains

    # read here, in the main thread: a stream's file system objects are per thread, and copying one in another
    # thread changes what is being copied
    reference, reference_labels = dataset_images(data.dataset, limit=args.num_reference_images)

    def reference_features() -> None:
        prepared["extractor"], prepared["features"] = cached_reference_features(reference)

    def sample_latents() -> None:
        # the SiT is final after stage 2; only the decoder of the composed pipeline is still training
        pipe = RepaEPipeline.from_pretrained(out / "stage2-ldm")
        pipe.set_progress_bar_config(disable=True)
        prepared["latents"], prepared["labels"] = balanced_latents(pipe, args.num_eval_samples, args.seed, **call)

    groups = stage_commands(args, out, precision)
    groups[-1][0] += [("reference features of the training images", reference_features),
                      ("the samples' latents from the stage-2 SiT", sample_latents)]  # fmt: skip
    stage_minutes = {}
    train_start = time.perf_counter()
    for lanes in groups:
        stage_minutes.update(run_lanes(lanes, out))
    pipeline_dir = compose_pipeline(out, args)
    train_minutes = (time.perf_counter() - train_start) / 60

    print("[3/4] decoding the samples and scoring them against the training images ...", flush=True)
    pipe = RepaEPipeline.from_pretrained(pipeline_dir)
    samples, labels = decoded_samples(pipe, prepared["latents"]), prepared["labels"]
    extractor, reference_features = prepared["extractor"], prepared["features"]
    scores = score_features(reference_features, pooled_features(extractor, samples))
    # the VAE alone, on as many training images as samples: the bound its reconstructions put on the samples
    reconstructed_ids = np.random.default_rng(args.seed).permutation(len(reference))[: len(samples)]
    vae_scores = score_features(
        reference_features, pooled_features(extractor, reconstructions(pipe.vae, reference[reconstructed_ids]))
    )
    metrics = {
        **named_scores(scores),
        "vae_reconstructions": {**named_scores(vae_scores), "num_images": len(reconstructed_ids)},
        "num_samples": len(samples),
        "num_reference_images": len(reference),
        "data": data.source,
        "resolution": args.resolution,
        "sampler": {"name": args.sampler, **{k: v for k, v in call.items() if k != "sampler"}},
        "seed": args.seed,
        "stage_minutes": stage_minutes,  # with this process's work beside the decoder stage
        "train_minutes": round(train_minutes, 2),
    }

    print("[4/4] pictures ...", flush=True)
    names = {int(k): v for k, v in pipe.id2label.items()}
    labelled_rows(samples, labels, names).save(out / "samples.png")
    picked = spread_over_classes(reference_labels, 16)
    reconstruction_grid(pipe.vae, reference[picked]).save(out / "reconstructions.png")
    combined_loss_curves(out)
    metrics["total_minutes"] = round((time.perf_counter() - start) / 60, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print()
    print(f"done in {metrics['total_minutes']:.1f} min (the stages, with the scores' preparation beside them: "
          f"{train_minutes:.1f} min)")  # fmt: skip
    for name, minutes in stage_minutes.items():
        print(f"      {minutes:5.1f} min  {name}")
    print(
        f"  score against the {len(reference)} training images, {len(samples)} samples "
        f"({args.sampler}, {args.num_inference_steps} steps, guidance {args.guidance_scale}):"
    )
    print(
        f"      FD-EfficientNetLite0 {metrics['FD-EfficientNetLite0']:.1f}   precision "
        f"{metrics['precision-EfficientNetLite0']:.3f}   recall {metrics['recall-EfficientNetLite0']:.3f}"
    )
    print(
        f"  the VAE alone ({len(reconstructed_ids)} training images through encode/decode): FD-EfficientNetLite0 "
        f"{vae_scores['fd']:.1f}   precision {vae_scores['precision']:.3f}"
    )
    print(f"  metrics:                        {out / 'metrics.json'}")
    print(f"  samples, one row per class:     {out / 'samples.png'}")
    print(f"  real above reconstructed:       {out / 'reconstructions.png'}")
    print(f"  loss curves (stages 1, 2, 3):   {out / 'loss_curves.png'}")
    print(f"  pipeline:                       RepaEPipeline.from_pretrained({str(pipeline_dir)!r})")
    print(f"  each stage's output folder:     {out}/stage1-repae, stage2-ldm, stage3-decoder")
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)

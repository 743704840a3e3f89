#!/usr/bin/env python
"""The vanilla / REPA / REPA-E study: the same SiT trained three ways from the same VAE, scored every K steps.

    make study                                   # offline: embedded OpenMoji, the demo's recipe, 3 seeds
    python benchmarks/ablation.py --train_data_dir ./my_images --steps 2000 --seeds 0 1 2 --output_dir study

Arms (same starting VAE, data, SiT recipe, steps, batch, learning rates, EMA and seeds; by default the demo's
recipe and settings, ``training/demo.py``):

* ``vanilla``: ``train_ldm.py`` on the frozen VAE without alignment (``--proj_coeff 0``);
* ``repa``: ``train_ldm.py`` on the frozen VAE with REPA alignment (``--proj_coeff 0.5``);
* ``repae``: ``train_repae.py``, VAE + SiT + alignment end-to-end, starting from the same VAE and its statistics.

The starting VAE is ``--vae`` or is trained first by ``train_vae.py`` (``--vae_steps``). Each arm runs in segments
of ``--eval_every`` steps, resuming from its checkpoint (resume is exact, so this equals one uninterrupted run);
after each segment the exported EMA pipeline is scored: FD-EfficientNetLite0 / precision / recall of
``--num_eval_samples`` samples against the training images, the alignment cosine (the SiT training pass's
``-sit/proj_loss``, mean over the segment), the VAE's reconstruction L1 on fixed training images and the per-channel
mean/std of their normalised latents (what the SiT sees; 0/1 when the statistics fit). The LPIPS and GAN terms are
off in both VAE trainings (no VGG weights offline; GAN off as in the demo). Writes ``results.json`` and
``fd_vs_step.png`` (median over seeds, min-max band) to ``--output_dir`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_repae import RepaEPipeline
from diffusers_repae.cli import UserError, run_cli
from diffusers_repae.evaluation import build_feature_extractor
from diffusers_repae.evaluation.quick_score import (
    balanced_samples,
    dataset_images,
    pooled_features,
    score_features,
)
from diffusers_repae.recipes import DEMO_RECIPE
from diffusers_repae.training.checkpointing import list_checkpoints, read_project_state
from diffusers_repae.training.loop import cpu_has_bf16
from diffusers_repae.training_args import add_data_args, training_data_from_args

SCRIPTS = Path(__file__).resolve().parents[1] / "training"

ARMS = {"vanilla": "SiT, frozen VAE, no alignment", "repa": "SiT + REPA, frozen VAE", "repae": "REPA-E end-to-end"}
FD_NAME = "FD-EfficientNetLite0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study = parser.add_argument_group("study")
    study.add_argument("--output_dir", type=str, default="study", help="Where results.json, the plot and runs go.")
    study.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")
    study.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="Arms to run.")
    study.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Training seeds (one run each).")
    study.add_argument("--steps", type=int, default=None, help="SiT steps per run (default 1000 without minutes).")
    study.add_argument(
        "--minutes_per_arm",
        type=float,
        default=None,
        help="Instead of --steps: the step count that lets one REPA-E run (the slowest arm) train about this many "
        "minutes, measured on its first segment; every arm then trains that many steps.",
    )
    study.add_argument("--eval_every", type=int, default=250, help="Score every arm every K steps.")
    study.add_argument("--num_eval_samples", type=int, default=300, help="Samples per score (balanced classes).")
    study.add_argument("--num_inference_steps", type=int, default=30, help="Sampler steps for the scored samples.")
    study.add_argument("--guidance_scale", type=float, default=3.0, help="Classifier-free guidance scale.")
    study.add_argument("--eval_seed", type=int, default=0, help="Sampling seed (the same noise for every arm).")
    train = parser.add_argument_group("training (shared by all arms; defaults: the demo's)")
    train.add_argument("--recipe", type=str, default=DEMO_RECIPE, help="SiT / projector / VAE recipe.")
    train.add_argument("--vae", type=str, default=None, help="Starting VAE folder; default: train one first.")
    train.add_argument("--vae_steps", type=int, default=1500, help="train_vae.py steps when --vae is not given.")
    train.add_argument("--train_batch_size", type=int, default=16, help="Batch size of every run.")
    train.add_argument("--learning_rate", type=float, default=5e-4, help="AdamW learning rate of the SiT.")
    train.add_argument(
        "--vae_learning_rate", type=float, default=1e-3, help="AdamW learning rate of the VAE (train_vae, REPA-E)."
    )
    train.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear learning-rate warm-up, then constant.")
    train.add_argument("--ema_decay", type=float, default=0.995, help="EMA decay of the SiT.")
    train.add_argument(
        "--mixed_precision",
        choices=["auto", "no", "bf16"],
        default="no",
        help="no (fp32: the study's measured setting; the demo now defaults to auto); auto: bf16 where the CPU has "
        "bf16 units (or on CUDA), else fp32.",
    )
    train.add_argument("--enc_type", type=str, default="efficientnet-lite0", help="Vision encoder to align with.")
    train.add_argument(
        "--weighting", choices=["uniform", "lognormal"], default="lognormal", help="Training time distribution."
    )
    add_data_args(parser)
    parser.set_defaults(resolution=32)
    args = parser.parse_args(argv)
    if args.steps is not None and args.minutes_per_arm is not None:
        raise UserError("give --steps or --minutes_per_arm, not both.")
    if args.steps is None and args.minutes_per_arm is None:
        args.steps = 1000
    for name in ("eval_every", "num_eval_samples", "vae_steps", "train_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not 0 <= args.lr_warmup_steps <= args.eval_every:
        raise UserError(f"--lr_warmup_steps must be in [0, --eval_every], got {args.lr_warmup_steps}.")
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if torch.cuda.is_available() or cpu_has_bf16() else "no"
    if args.num_eval_samples < 4:
        raise UserError("--num_eval_samples must be >= 4 (precision/recall use 3 nearest neighbours).")
    return args


def data_flags(args) -> list[str]:
    flags = ["--resolution", str(args.resolution), "--embedded_label_by", args.embedded_label_by]
    for name in ("dataset_name", "dataset_config_name", "train_data_dir", "cache_dir"):
        if getattr(args, name):
            flags += [f"--{name}", str(getattr(args, name))]
    if args.dataset_name or args.train_data_dir:
        flags += ["--image_column", args.image_column, "--label_column", args.label_column]
    return flags


def run_script(script: str, argv: list[str]) -> None:
    """``python training/SCRIPT ARGV`` in its own process (each run builds its own accelerator); a failure stops
    the study, the script's own message above it."""
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *argv])
    if result.returncode != 0:
        raise UserError(f"training/{script} failed (exit status {result.returncode}); its output is above.")


def train_starting_vae(args, folder: Path) -> Path:
    """Stage 1: train_vae.py on the study's data (LPIPS off, GAN off), exported with measured statistics."""
    run_script(
        "train_vae.py",
        [
            "--recipe", args.recipe, "--no_lpips", "--disc_weight", "0", "--mixed_precision", args.mixed_precision,
            "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.vae_steps),
            "--vae_learning_rate", str(args.vae_learning_rate), "--lr_scheduler", "constant_with_warmup",
            "--lr_warmup_steps", str(min(args.lr_warmup_steps, args.vae_steps)),
            "--checkpointing_steps", str(args.vae_steps), "--checkpoints_total_limit", "1",
            "--validation_steps", "0", "--dataloader_num_workers", "0", "--report_to", "none", "--random_flip",
            "--seed", "0", "--output_dir", str(folder), *data_flags(args),
        ],
    )  # fmt: skip
    return folder


def train_segment(args, arm: str, seed: int, vae: Path, run_dir: Path, end_step: int) -> None:
    """Trains ``arm`` up to ``end_step`` in ``run_dir`` (resuming its latest checkpoint) and exports its pipeline."""
    argv = [
        "--recipe", args.recipe, "--vae", str(vae), "--enc_type", args.enc_type,
        "--mixed_precision", args.mixed_precision, "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(end_step), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", str(args.lr_warmup_steps),
        "--ema_decay", str(args.ema_decay), "--weighting", args.weighting,
        "--checkpointing_steps", str(args.eval_every), "--checkpoints_total_limit", "1", "--validation_steps", "0",
        "--dataloader_num_workers", "0",
        "--report_to", "none", "--seed", str(seed), "--output_dir", str(run_dir), *data_flags(args),
    ]  # fmt: skip
    if list_checkpoints(run_dir):
        argv += ["--resume_from_checkpoint", "latest"]
    if arm == "repae":
        argv += ["--no_lpips", "--disc_weight", "0", "--vae_learning_rate", str(args.vae_learning_rate)]
        run_script("train_repae.py", argv)
    else:
        run_script("train_ldm.py", argv + ["--proj_coeff", "0" if arm == "vanilla" else "0.5"])


@torch.no_grad()
def vae_diagnostics(vae, images: np.ndarray, seed: int) -> dict:
    """Reconstruction L1 (posterior mean, [-1, 1] scale) and per-channel mean/std of normalised posterior samples."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(vae.device) / 127.5 - 1
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.mode()).sample.clamp(-1, 1)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(seed)).to(vae.device)
    z = posterior.mean + posterior.std * noise
    shape = (1, -1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=vae.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=vae.device).view(shape)
    normalised = (z - mean) / std
    return {
        "recon_l1": float((x - reconstruction).abs().mean()),
        "latent_mean": [round(v, 4) for v in normalised.mean(dim=(0, 2, 3)).tolist()],
        "latent_std": [round(v, 4) for v in normalised.std(dim=(0, 2, 3)).tolist()],
    }


def score(args, run_dir: Path, extractor, reference: np.ndarray, vae_images: np.ndarray) -> dict:
    """Generative metrics of the exported EMA pipeline, plus the VAE diagnostics."""
    pipe = RepaEPipeline.from_pretrained(run_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    samples, _ = balanced_samples(pipe, args.num_eval_samples, seed=args.eval_seed, **call)
    metrics = score_features(reference, pooled_features(extractor, samples, desc="features samples"))
    return {**metrics, **vae_diagnostics(pipe.vae, vae_images, args.eval_seed)}


def segment_logs(run_dir: Path, start: int, end: int) -> dict:
    """Alignment cosine and training speed over steps (start, end] from the loss history in the checkpoint."""
    records = read_project_state(run_dir / f"checkpoint-{end}")["history"]["records"]
    records = [r for r in records if start < r["step"] <= end]
    speed = statistics.median(r["throughput/images_per_s"] for r in records)
    return {
        "alignment_cos": -statistics.fmean(r["sit/proj_loss"] for r in records),
        "images_per_s": speed,
    }


def segment_ends(steps: int, eval_every: int) -> list[int]:
    """The steps at which a run is scored: every ``eval_every`` steps, and always at the last step."""
    ends = list(range(eval_every, steps + 1, eval_every))
    return ends if ends and ends[-1] == steps else [*ends, steps]


def run_arm(args, arm, seed, vae, steps, extractor, reference, vae_images, on_record) -> list[dict]:
    """Trains and scores one arm for one seed, segment by segment (segments already on disk are not retrained)."""
    run_dir = Path(args.output_dir) / "runs" / f"{arm}-seed{seed}"
    records, start, wall, cpu = [], 0, 0.0, 0.0
    for end in segment_ends(steps, args.eval_every):
        began, began_cpu = time.perf_counter(), time.process_time()
        if not (run_dir / f"checkpoint-{end}").is_dir():
            train_segment(args, arm, seed, vae, run_dir, end)
        wall += time.perf_counter() - began
        cpu += time.process_time() - began_cpu  # all threads: a load-independent cost, unlike wall time
        record = {"step": end, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1)}
        record.update(segment_logs(run_dir, start, end))
        record.update(score(args, run_dir, extractor, reference, vae_images))
        records.append(record)
        on_record(arm, seed, record)
        start = end
    return records


def calibrate_steps(args, vae: Path) -> int:
    """--minutes_per_arm: the step count a REPA-E run trains in that time, from its first segment's speed."""
    seed = args.seeds[0]
    run_dir = Path(args.output_dir) / "runs" / f"repae-seed{seed}"
    train_segment(args, "repae", seed, vae, run_dir, args.eval_every)
    seconds_per_step = args.train_batch_size / segment_logs(run_dir, 0, args.eval_every)["images_per_s"]
    steps = int(args.minutes_per_arm * 60 / seconds_per_step) // args.eval_every * args.eval_every
    return max(steps, args.eval_every)


def summarise(results: dict) -> dict:
    """Per arm, at the last step: median and [min, max] over seeds of every scalar, and the speed."""
    summary = {}
    for arm, by_seed in results["arms"].items():
        finals = [records[-1] for records in by_seed.values() if records]
        if not finals:
            continue
        row = {}
        for key in ("fd", "precision", "recall", "alignment_cos", "recon_l1"):
            values = [r[key] for r in finals]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        speed = statistics.median(r["images_per_s"] for records in by_seed.values() for r in records)
        row["seconds_per_100_steps"] = 100 * results["config"]["train_batch_size"] / speed
        row["cpu_seconds_per_100_steps"] = statistics.median(100 * r["train_cpu_s"] / r["step"] for r in finals)
        row["latent_std_mean"] = statistics.median(statistics.fmean(r["latent_std"]) for r in finals)
        summary[arm] = row
    return summary


def markdown_table(results: dict) -> str:
    steps = results["config"]["steps"]
    lines = [
        f"| arm | {FD_NAME} @ {steps} | precision | recall | alignment cos | recon L1 | latent std | s / 100 steps |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(stat: dict, digits: int) -> str:
        return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"

    for arm, row in results["summary"].items():
        lines.append(
            f"| {arm} ({ARMS[arm]}) | {cell(row['fd'], 1)} | {cell(row['precision'], 3)} | "
            f"{cell(row['recall'], 3)} | {cell(row['alignment_cos'], 3)} | {cell(row['recon_l1'], 4)} | "
            f"{row['latent_std_mean']:.3f} | {row['seconds_per_100_steps']:.1f} |"
        )
    lines.append("")
    lines.append(
        f"median [min, max] over seeds {results['config']['seeds']}; latent std: of the normalised latents, mean over "
        "channels. vanilla trains no projector (alignment weight 0): its cosine is the untrained baseline."
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """FD against step, one line per arm (median over seeds) with the seeds' min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for arm, by_seed in results["arms"].items():
        runs = [records for records in by_seed.values() if records]
        if not runs:
            continue
        length = min(len(records) for records in runs)
        steps = [runs[0][i]["step"] for i in range(length)]
        fds = np.array([[records[i]["fd"] for i in range(length)] for records in runs])
        (line,) = axis.plot(steps, np.median(fds, axis=0), marker="o", label=f"{arm}: {ARMS[arm]}")
        axis.fill_between(steps, fds.min(axis=0), fds.max(axis=0), color=line.get_color(), alpha=0.2)
    axis.set_xlabel("SiT training step")
    axis.set_ylabel(f"{FD_NAME} (lower is better)")
    config = results["config"]
    axis.set_title(f"{config['data']}, {config['resolution']} px, seeds {config['seeds']}", fontsize=9)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare_output(args) -> Path:
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UserError(f"--output_dir {str(out)!r} already holds results: pass --overwrite to replace them.")
        if args.vae and Path(args.vae).resolve().is_relative_to(out.resolve()):
            raise UserError(f"--vae {args.vae!r} lies inside --output_dir, which --overwrite would delete.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = prepare_output(args)
    started = time.perf_counter()
    data = training_data_from_args(args)
    print(f"[study] data {data.source}: {len(data.dataset)} images, {data.num_classes} classes", flush=True)
    extractor = build_feature_extractor("efficientnet-lite0")
    reference_images, _ = dataset_images(data.dataset)
    reference = pooled_features(extractor, reference_images, desc="features reference")
    vae_images = reference_images[:64]

    vae_timing = None
    if args.vae is None:
        print(f"[study] training the starting VAE ({args.vae_steps} steps) ...", flush=True)
        began, began_cpu = time.perf_counter(), time.process_time()
        vae = train_starting_vae(args, out / "vae")
        vae_timing = {
            "wall_s": round(time.perf_counter() - began, 1),
            "cpu_s": round(time.process_time() - began_cpu, 1),
        }
    else:
        vae = Path(args.vae)
    steps = args.steps or calibrate_steps(args, vae)
    print(f"[study] arms {args.arms}, seeds {args.seeds}, {steps} steps, scored every {args.eval_every}", flush=True)

    config = {
        "data": data.source, "num_images": len(data.dataset), "num_classes": data.num_classes,
        "resolution": args.resolution, "recipe": args.recipe, "mixed_precision": args.mixed_precision,
        "vae": str(vae), "vae_steps": None if args.vae else args.vae_steps, "steps": steps, "seeds": args.seeds,
        "eval_every": args.eval_every, "train_batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate, "vae_learning_rate": args.vae_learning_rate,
        "lr_warmup_steps": args.lr_warmup_steps, "ema_decay": args.ema_decay, "enc_type": args.enc_type,
        "num_eval_samples": args.num_eval_samples, "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale, "feature_extractor": FD_NAME, "num_reference": len(reference),
        "machine": platform.platform(), "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv),
    }  # fmt: skip
    results = {"config": config, "arms": {arm: {} for arm in args.arms}, "summary": {}}

    def write() -> None:
        results["summary"] = summarise(results)
        results["timing"] = {"vae_training": vae_timing, "total_wall_s": round(time.perf_counter() - started, 1)}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    def on_record(arm, seed, record) -> None:
        results["arms"][arm].setdefault(str(seed), []).append(record)
        print(
            f"[study] {arm} seed {seed} step {record['step']}: {FD_NAME} {record['fd']:.1f}, precision "
            f"{record['precision']:.3f}, recall {record['recall']:.3f}, align cos {record['alignment_cos']:.3f}, "
            f"recon L1 {record['recon_l1']:.4f}",
            flush=True,
        )
        write()

    for seed in args.seeds:  # seed-major: an interrupted study still has every arm for the first seeds
        for arm in args.arms:
            results["arms"][arm][str(seed)] = []
            run_arm(args, arm, seed, vae, steps, extractor, reference, vae_images, on_record)
    write()
    plot(results, out / "fd_vs_step.png")
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    total = time.perf_counter() - started
    print(f"[study] done in {total / 60:.1f} min: {out / 'results.json'}, {out / 'fd_vs_step.png'}", flush=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    run_cli(main)

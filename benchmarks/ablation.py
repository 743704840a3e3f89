#!/usr/bin/env python
"""The REPA-E mechanism study: the same SiT trained six ways from the same VAE, data, steps and seeds, scored every
K steps, with the latent diagnostics that show why.

    make study                                   # offline: embedded OpenMoji, the demo's recipe, 3 seeds
    python benchmarks/ablation.py --train_data_dir ./my_images --steps 2000 --seeds 0 1 2 --output_dir study

Arms (``--arms``; by default all but the targeted last one, run in this order for each seed):

* ``vanilla``: ``train_ldm.py`` on the frozen starting VAE without alignment (``--proj_coeff 0``);
* ``repa`` (or ``dropin_start``): ``train_ldm.py`` on the frozen starting VAE with REPA (``--proj_coeff 0.5``);
* ``repae``: ``train_repae.py``, VAE + SiT + alignment end-to-end, starting from the same VAE and its statistics;
* ``naive_e2e``: the paper's negative control, ``train_repae.py --ablation naive_e2e``: the SiT's denoising loss flows
  into the VAE (no stop-gradient) and the alignment loss does not;
* ``dropin_e2e``: a fresh SiT + REPA (``train_ldm.py``) on the frozen VAE that came out of the ``repae`` run;
* ``dropin_control``: a fresh SiT + REPA on the starting VAE after as many VAE-only steps (``train_vae.py``) as the
  ``repae`` run gave it, separating "more VAE training" from "end-to-end tuning";
* ``dropin_e2e_restats`` (a targeted measurement, only when named): ``dropin_e2e`` after re-measuring the REPA-E
  VAE's ``latents_mean`` / ``latents_std`` on the data (``compute_latent_stats.py --write``), separating a mis-scaled
  latent space from a worse one.

The starting VAE is ``--vae`` or is trained first by ``train_vae.py`` (``--vae_steps``). Each arm runs in segments
of ``--eval_every`` steps, resuming from its checkpoint (resume is exact, so this equals one uninterrupted run);
after each segment the exported EMA pipeline is scored: FD-EfficientNetLite0 / precision / recall of
``--num_eval_samples`` samples against the training images, the alignment cosine (the SiT training pass's
``-sit/proj_loss``, mean over the segment), and the arm's VAE alone on as many training images: reconstruction L1
and FD, the per-channel mean/std of the normalised latents (what the SiT sees; 0/1 when the statistics fit) and the
effective rank of their 2x2 patches (the SiT's tokens). The LPIPS and GAN terms are off in every VAE training (no
VGG weights offline; GAN off as in the demo). Writes ``results.json``, ``results.md``, ``claims.md`` (the paper's
claims against the measurements), ``fd_vs_step.png`` and ``diagnostics_vs_step.png`` (median over seeds, min-max
band) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_repae import RepaEPipeline
from diffusers_repae.cli import UserError, positive_int, run_cli
from diffusers_repae.evaluation import build_feature_extractor
from diffusers_repae.evaluation.quick_score import (
    balanced_samples,
    dataset_images,
    pooled_features,
    score_features,
)
from diffusers_repae.evaluation.reconstruction import decoded_to_uint8
from diffusers_repae.recipes import DEMO_RECIPE
from diffusers_repae.training.checkpointing import list_checkpoints, read_project_state
from diffusers_repae.training.loop import cpu_has_bf16
from diffusers_repae.training.stages import run_stage
from diffusers_repae.training_args import add_data_args, training_data_from_args
from study_report import ALIASES, ARMS, FD_NAME, TARGETED_ARMS, claims_table, markdown_table, plot, summarise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study = parser.add_argument_group("study")
    study.add_argument("--output_dir", type=str, default="study", help="Where results.json, the plot and runs go.")
    study.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")
    study.add_argument(
        "--extend",
        action="store_true",
        help="Continue the study in --output_dir to more --steps: its runs resume from their checkpoints (resume is "
        "exact: the same as one longer run) and its records up to then are kept. The other settings must be the "
        "same; --arms and --seeds may be fewer (the dropin_e2e* and dropin_control arms start over, their VAE being "
        "new).",
    )
    study.add_argument(
        "--arms",
        nargs="+",
        default=[arm for arm in ARMS if arm not in TARGETED_ARMS],
        choices=[*ARMS, *ALIASES],
        help="Arms to run: "
        + "; ".join(f"{arm}: {what}" for arm, what in ARMS.items())
        + ". Default: all but the targeted dropin_e2e_restats. dropin_start is another name for repa; dropin_e2e "
        "and dropin_e2e_restats need repae (their VAE comes from that arm).",
    )
    study.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Training seeds (one run each).")
    study.add_argument("--steps", type=int, default=None, help="SiT steps per run (default 500 without minutes).")
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
        "--encoder_depth",
        type=positive_int,
        default=None,
        help="SiT block whose tokens are aligned (REPA, REPA-E); default: the recipe's projector config.",
    )
    train.add_argument(
        "--weighting", choices=["uniform", "lognormal"], default="lognormal", help="Training time distribution."
    )
    add_data_args(parser)
    parser.set_defaults(resolution=32)
    args = parser.parse_args(argv)
    if args.steps is not None and args.minutes_per_arm is not None:
        raise UserError("give --steps or --minutes_per_arm, not both.")
    if args.steps is None and args.minutes_per_arm is None:
        args.steps = 500
    if args.extend and (args.overwrite or args.minutes_per_arm is not None):
        raise UserError("--extend continues a study to more --steps: not with --overwrite or --minutes_per_arm.")
    for name in ("eval_every", "num_eval_samples", "vae_steps", "train_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not 0 <= args.lr_warmup_steps <= args.eval_every:
        raise UserError(f"--lr_warmup_steps must be in [0, --eval_every], got {args.lr_warmup_steps}.")
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if torch.cuda.is_available() or cpu_has_bf16() else "no"
    if args.num_eval_samples < 4:
        raise UserError("--num_eval_samples must be >= 4 (precision/recall use 3 nearest neighbours).")
    chosen = {ALIASES.get(arm, arm) for arm in args.arms}
    args.arms = [arm for arm in ARMS if arm in chosen]
    for arm in ("dropin_e2e", "dropin_e2e_restats"):
        if arm in chosen and "repae" not in chosen:
            raise UserError(f"--arms {arm} needs repae too: its VAE is the one the repae arm tuned end to end.")
    return args


def data_options(args) -> dict:
    """The study's data, as every stage's keyword arguments."""
    options = {
        "resolution": args.resolution, "embedded_label_by": args.embedded_label_by,
        "dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
        "train_data_dir": args.train_data_dir, "cache_dir": args.cache_dir,
    }  # fmt: skip
    if args.dataset_name or args.train_data_dir:
        options.update(image_column=args.image_column, label_column=args.label_column)
    return options


def run_options(args, steps: int, seed: int, output_dir: Path) -> dict:
    """What every training run of the study shares: batch, precision, a constant rate after the warm-up (each caller
    gives its length), no validation."""
    return {
        "mixed_precision": args.mixed_precision, "train_batch_size": args.train_batch_size,
        "max_train_steps": steps, "lr_scheduler": "constant_with_warmup", "checkpoints_total_limit": 1,
        "validation_steps": 0,
        "dataloader_num_workers": 0, "report_to": "none", "seed": seed, "output_dir": output_dir,
        **data_options(args),
    }  # fmt: skip


def train_vae_only(args, folder: Path, steps: int, seed: int, start: Path | None = None) -> Path:
    """train_vae.py on the study's data (LPIPS off, GAN off), exported with measured statistics: the starting VAE
    (from the recipe's random weights), or ``steps`` more VAE-only steps from ``start`` (the drop-in control)."""
    run_stage(
        "train_vae",
        vae=start, recipe=None if start else args.recipe, no_lpips=True, disc_weight=0, random_flip=True,
        vae_learning_rate=args.vae_learning_rate, checkpointing_steps=steps,
        lr_warmup_steps=min(args.lr_warmup_steps, steps), **run_options(args, steps, seed, folder),
    )  # fmt: skip
    return folder


OWN_VAE = {"dropin_control": "control-vae", "dropin_e2e_restats": "restats-vae"}  # + "-seedS", like the runs


def arm_vae(args, arm: str, seed: int, start: Path, steps: int) -> Path:
    """The VAE an arm's SiT trains on (and REPA-E / the ablation start from): the starting VAE, the REPA-E arm's
    VAE after its run (dropin_e2e), or the starting VAE after as many VAE-only steps as REPA-E gave it
    (dropin_control, trained here once per seed), or the REPA-E arm's VAE with re-measured latent statistics
    (dropin_e2e_restats)."""
    runs = Path(args.output_dir) / "runs"
    if arm == "dropin_e2e":
        return runs / f"repae-seed{seed}" / "vae"
    if arm in OWN_VAE:
        folder = runs / f"{OWN_VAE[arm]}-seed{seed}"
        if (folder / "config.json").is_file():
            return folder
        if arm == "dropin_control":
            print(f"[study] control VAE for seed {seed}: {steps} VAE-only steps from the starting VAE", flush=True)
            return train_vae_only(args, folder, steps, seed, start=start)
        print(f"[study] re-measuring the latent statistics of seed {seed}'s REPA-E VAE", flush=True)
        run_stage(
            "compute_latent_stats",
            vae=runs / f"repae-seed{seed}" / "vae", write=folder, plot=folder.with_suffix(".png"), seed=seed,
            overwrite=True, **data_options(args),
        )  # fmt: skip
        return folder
    return start


def train_segment(args, arm: str, seed: int, vae: Path, run_dir: Path, end_step: int) -> None:
    """Trains ``arm`` up to ``end_step`` in ``run_dir`` (resuming its latest checkpoint) and exports its pipeline."""
    shared = {
        "recipe": args.recipe, "vae": vae, "enc_type": args.enc_type, "encoder_depth": args.encoder_depth,
        "learning_rate": args.learning_rate, "ema_decay": args.ema_decay, "weighting": args.weighting,
        "checkpointing_steps": args.eval_every,
        "lr_warmup_steps": args.lr_warmup_steps,  # not capped at end_step: the same in every segment of a run
        "resume_from_checkpoint": "latest" if list_checkpoints(run_dir) else None,
        **run_options(args, end_step, seed, run_dir),
    }  # fmt: skip
    if arm in ("repae", "naive_e2e"):
        run_stage(
            "train_repae", no_lpips=True, disc_weight=0, vae_learning_rate=args.vae_learning_rate,
            ablation="naive_e2e" if arm == "naive_e2e" else None, **shared,
        )  # fmt: skip
    else:
        run_stage("train_ldm", proj_coeff=0 if arm == "vanilla" else 0.5, **shared)


def patch_spectrum(latents: torch.Tensor, patch: int = 2) -> tuple[torch.Tensor, float]:
    """Eigenvalues (descending, summing to 1) of the covariance of ``patch`` x ``patch`` latent patches (the SiT's
    tokens), and their effective rank ``exp(entropy)`` (Roy & Vetterli 2007): 1 when one direction holds all the
    variance, the patch dimension when all hold the same."""
    patches = torch.nn.functional.unfold(latents.double(), kernel_size=patch, stride=patch)  # [N, C*p*p, L]
    vectors = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    vectors = vectors - vectors.mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(vectors.T @ vectors / (len(vectors) - 1)).clamp(min=0).flip(0)
    share = eigenvalues / eigenvalues.sum()
    entropy = -(share[share > 0] * share[share > 0].log()).sum()
    return share, float(entropy.exp())


@torch.no_grad()
def vae_diagnostics(vae, images: np.ndarray, seed: int, extractor, reference: np.ndarray) -> dict:
    """The VAE alone: reconstruction L1 (posterior mean, [-1, 1] scale) and FD of its reconstructions against the
    training images; per-channel mean/std and the patch spectrum of normalised posterior samples (what the SiT
    sees)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(vae.device) / 127.5 - 1
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.mode()).sample.clamp(-1, 1)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(seed)).to(vae.device)
    z = posterior.mean + posterior.std * noise
    shape = (1, -1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=vae.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=vae.device).view(shape)
    normalised = (z - mean) / std
    spectrum, rank = patch_spectrum(normalised.cpu())
    # rounded as `evaluation.reconstruction.reconstruct` rounds them, from the decode above (not a second one)
    reconstructed = decoded_to_uint8(reconstruction).permute(0, 2, 3, 1).cpu().numpy()
    recon_fd = score_features(reference, pooled_features(extractor, reconstructed, desc="recon"))
    return {
        "recon_l1": float((x - reconstruction).abs().mean()),
        "recon_fd": recon_fd["fd"],
        "latent_mean": [round(v, 4) for v in normalised.mean(dim=(0, 2, 3)).tolist()],
        "latent_std": [round(v, 4) for v in normalised.std(dim=(0, 2, 3)).tolist()],
        "effective_rank": rank,
        "latent_spectrum": [round(v, 5) for v in spectrum.tolist()],
    }


FROZEN_VAE_ARMS = ("vanilla", "repa", "dropin_e2e", "dropin_control")
_frozen_vae_diagnostics: dict[str, dict] = {}  # a frozen VAE's diagnostics, by its weights file: computed once


def score(args, arm: str, vae: Path, run_dir: Path, extractor, reference: np.ndarray, vae_images: np.ndarray) -> dict:
    """Generative metrics of the exported EMA pipeline, plus the diagnostics of its VAE (``vae``, when ``arm``
    keeps it frozen)."""
    pipe = RepaEPipeline.from_pretrained(run_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    samples, _ = balanced_samples(pipe, args.num_eval_samples, seed=args.eval_seed, **call)
    metrics = score_features(reference, pooled_features(extractor, samples, desc="features samples"))
    weights = vae / "diffusion_pytorch_model.safetensors"  # folder and date: a folder rewritten is another VAE
    key = f"{weights.resolve()}@{weights.stat().st_mtime_ns}" if arm in FROZEN_VAE_ARMS else None
    diagnostics = _frozen_vae_diagnostics.get(key) if key else None
    if diagnostics is None:
        diagnostics = vae_diagnostics(pipe.vae, vae_images, args.eval_seed, extractor, reference)
        if key:
            _frozen_vae_diagnostics[key] = diagnostics
    return {**metrics, **diagnostics}


def cpu_seconds() -> float:
    """CPU time of this process and of the finished training scripts it ran (all threads): unlike wall time, it
    does not depend on how busy the machine is."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


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


def run_arm(args, arm, seed, vae, steps, extractor, reference, vae_images, on_record, done=()) -> list[dict]:
    """Trains and scores one arm for one seed, segment by segment, after the records ``done`` (an earlier run of
    the same arm that --extend continues: its segments are neither retrained nor scored again)."""
    run_dir = Path(args.output_dir) / "runs" / f"{arm}-seed{seed}"
    records = list(done)
    start = records[-1]["step"] if records else 0
    wall = records[-1]["train_wall_s"] if records else 0.0
    cpu = records[-1]["train_cpu_s"] if records else 0.0
    for end in [end for end in segment_ends(steps, args.eval_every) if end > start]:
        began, began_cpu = time.perf_counter(), cpu_seconds()
        if not (run_dir / f"checkpoint-{end}").is_dir():  # --minutes_per_arm trained the first one already
            train_segment(args, arm, seed, vae, run_dir, end)
        wall += time.perf_counter() - began
        cpu += cpu_seconds() - began_cpu
        record = {"step": end, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1)}
        record.update(segment_logs(run_dir, start, end))
        record.update(score(args, arm, vae, run_dir, extractor, reference, vae_images))
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


# settings an --extend run must share with the study it continues
SAME_WHEN_EXTENDED = (
    "recipe", "resolution", "mixed_precision", "eval_every", "train_batch_size", "learning_rate", "vae_learning_rate",
    "lr_warmup_steps", "ema_decay", "enc_type", "encoder_depth", "num_eval_samples", "num_inference_steps",
    "guidance_scale",
)  # fmt: skip


def earlier_results(args) -> dict | None:
    """--extend: the results.json of the study being continued, after checking that it can be."""
    if not args.extend:
        return None
    path = Path(args.output_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"--extend continues a study, but {str(path)!r} does not exist: run the study first.")
    earlier = json.loads(path.read_text())
    config = earlier["config"]
    changed = [name for name in SAME_WHEN_EXTENDED if config.get(name) != getattr(args, name)]
    if changed:
        raise UserError(f"--extend needs the same {', '.join('--' + n for n in changed)} as {str(path)!r}.")
    if args.steps <= config["steps"]:
        raise UserError(f"--extend needs more --steps than the study's {config['steps']}, got {args.steps}.")
    return earlier


STARTS_OVER_WHEN_EXTENDED = ("dropin_e2e", "dropin_control", "dropin_e2e_restats")  # their VAE depends on --steps


def earlier_records(earlier: dict | None, arm: str, seed: int) -> list[dict]:
    """The records of ``arm`` / ``seed`` that an --extend run keeps."""
    if not earlier or arm in STARTS_OVER_WHEN_EXTENDED:
        return []
    return earlier["arms"].get(arm, {}).get(str(seed), [])


def prepare_output(args) -> Path:
    out = Path(args.output_dir)
    if args.extend:
        return out
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
    earlier = earlier_results(args)
    out = prepare_output(args)
    started = time.perf_counter()
    data = training_data_from_args(args)
    print(f"[study] data {data.source}: {len(data.dataset)} images, {data.num_classes} classes", flush=True)
    extractor = build_feature_extractor("efficientnet-lite0")
    reference_images, _ = dataset_images(data.dataset)
    reference = pooled_features(extractor, reference_images, desc="features reference")
    # the VAE diagnostics' images: as many as the samples scored, the same ones for every arm
    vae_images = reference_images[np.random.default_rng(0).permutation(len(reference_images))[: args.num_eval_samples]]

    vae_timing = None
    if earlier:
        vae = Path(earlier["config"]["vae"])
    elif args.vae is None:
        print(f"[study] training the starting VAE ({args.vae_steps} steps) ...", flush=True)
        began, began_cpu = time.perf_counter(), cpu_seconds()
        vae = train_vae_only(args, out / "vae", args.vae_steps, seed=0)
        vae_timing = {"wall_s": round(time.perf_counter() - began, 1), "cpu_s": round(cpu_seconds() - began_cpu, 1)}
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
        "encoder_depth": args.encoder_depth,
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

    if earlier:  # the study continued: its starting VAE, and this run's wall time counted apart
        vae_timing = earlier.get("timing", {}).get("vae_training")
        config.update(vae_steps=earlier["config"]["vae_steps"], extended_from_steps=earlier["config"]["steps"])
    for seed in args.seeds:  # seed-major: an interrupted study still has every arm for the first seeds
        for arm in args.arms:
            if earlier and arm in STARTS_OVER_WHEN_EXTENDED:
                for name in (arm, OWN_VAE.get(arm)):
                    if name:
                        shutil.rmtree(out / "runs" / f"{name}-seed{seed}", ignore_errors=True)
            done = earlier_records(earlier, arm, seed)
            results["arms"][arm][str(seed)] = list(done)
            arm_start = arm_vae(args, arm, seed, vae, steps)
            run_arm(args, arm, seed, arm_start, steps, extractor, reference, vae_images, on_record, done)
    write()
    plot(results, out)
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    claims = claims_table(results)
    (out / "claims.md").write_text(claims + "\n")
    print(table)
    print()
    print(claims)
    total = time.perf_counter() - started
    print(f"[study] done in {total / 60:.1f} min: {out}/results.json, results.md, claims.md, fd_vs_step.png, "
          "diagnostics_vs_step.png", flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    run_cli(main)

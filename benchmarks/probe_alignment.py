#!/usr/bin/env python
"""Why REPA does not beat vanilla in the mechanism study: how much of the vision encoder's tokens a linear probe
reads from a trained SiT's tokens after the aligned block, with and without REPA.

REPA's premise is that a diffusion transformer learns the encoder's kind of representation slowly on its own, and
that aligning one block to it speeds training. If a vanilla SiT's tokens already predict the encoder's tokens about
as well as a REPA SiT's do (a ridge regression fitted on some training images, scored by cosine on held-out ones),
the alignment loss has little to add at this scale. A SiT with its initial, untrained weights is the floor: how much
the noisy latents alone give away.

    python benchmarks/ablation.py --arms vanilla repa --output_dir study       # or make study
    python benchmarks/probe_alignment.py --study_dir study --seeds 0 1 2

Writes ``probe.json`` and ``probe.md`` into ``--study_dir``: per SiT, the held-out cosine and R^2 median [min, max]
over seeds at each noise level t (the probe reads the tokens at each run's own ``encoder_depth``, or ``--block``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from diffusers_repae import RepaEPipeline, SiTTransformer2DModel
from diffusers_repae.cli import UserError, refuse_overwrite, run_cli
from diffusers_repae.evaluation.quick_score import dataset_images
from diffusers_repae.models.vae import normalize_latents
from diffusers_repae.training.encoders import load_vision_encoders
from diffusers_repae.training.latent_stats import encode_posterior
from diffusers_repae.training.losses import noisy_latents_and_target
from diffusers_repae.training_args import add_data_args, training_data_from_args

UNTRAINED = "untrained"  # the vanilla run's SiT config with fresh weights: the floor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study_dir", type=str, required=True, help="A finished ablation.py --output_dir.")
    parser.add_argument("--arms", nargs="+", default=["vanilla", "repa"], help="Arms whose SiTs are probed.")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Seeds (default: the study's).")
    parser.add_argument("--num_images", type=int, default=900, help="Training images: 2/3 fit the probe, 1/3 score.")
    parser.add_argument("--times", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="Noise levels t.")
    parser.add_argument("--ridge", type=float, default=1e-2, help="Ridge penalty, relative to the mean variance.")
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        help="Probe the tokens after this SiT block in every run (writes probe-blockN.json / .md); default: each "
        "run's own encoder_depth (probe.json / .md).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace this probe's earlier probe*.json / .md.")
    add_data_args(parser)
    parser.set_defaults(resolution=32)
    args = parser.parse_args(argv)
    if args.num_images < 6:
        raise UserError(f"--num_images must be >= 6 (a third is held out), got {args.num_images}.")
    if args.block is not None and args.block < 1:
        raise UserError(f"--block must be >= 1, got {args.block}.")
    if not all(0 <= t < 1 for t in args.times):
        raise UserError(f"--times must lie in [0, 1), got {args.times}.")
    return args


def ridge_probe(train_x, train_y, test_x, test_y, ridge: float) -> dict[str, float]:
    """Fits ``y ~ x W + b`` by ridge regression on the training tokens and scores the held-out tokens: the mean
    cosine between predicted and true tokens (what REPA's loss maximises) and the fraction of their variance the
    prediction explains (R^2: the cosine also rewards the tokens' common direction, which the mean alone gets)."""
    x_mean, y_mean = train_x.mean(0), train_y.mean(0)
    x, y = train_x - x_mean, train_y - y_mean
    gram = x.T @ x
    penalty = ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weights = torch.linalg.solve(gram + penalty, x.T @ y)
    predicted = (test_x - x_mean) @ weights + y_mean
    residual = (test_y - predicted).pow(2).sum() / (test_y - test_y.mean(0)).pow(2).sum()
    return {
        "cosine": float(torch.nn.functional.cosine_similarity(predicted, test_y, dim=-1).mean()),
        "r2": float(1 - residual),
    }


@torch.no_grad()
def sit_tokens(transformer, latents, labels, t: float, depth: int, seed: int) -> torch.Tensor:
    """The SiT's tokens after block ``depth`` for the latents noised to time ``t`` (fixed noise), ``[N, T, D]``."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    times = torch.full((len(latents),), t)
    x_t, _ = noisy_latents_and_target(latents, noise, times)
    output = transformer(x_t, times, labels, return_hidden_states_at=depth, align_only=True)
    return output.hidden_states.double()


def probe_run(transformer, depth, latents, labels, targets, split, times, ridge) -> dict[str, dict]:
    """Held-out probe scores at each noise level."""
    scores = {}
    for t in times:
        tokens = sit_tokens(transformer.eval(), latents, labels, t, depth, seed=0)
        fit, held = tokens[:split].flatten(0, 1), tokens[split:].flatten(0, 1)
        scores[str(t)] = ridge_probe(fit, targets[:split].flatten(0, 1), held, targets[split:].flatten(0, 1), ridge)
    return scores


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    study = Path(args.study_dir)
    if not (study / "results.json").is_file():
        raise UserError(f"--study_dir {args.study_dir!r} holds no results.json: run benchmarks/ablation.py first.")
    stem = study / (f"probe-block{args.block}" if args.block else "probe")
    json_path, table_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    for output in (json_path, table_path):
        refuse_overwrite(output, "the probe's output", overwrite=args.overwrite)
    seeds = args.seeds or json.loads((study / "results.json").read_text())["config"]["seeds"]
    runs = {(arm, seed): study / "runs" / f"{arm}-seed{seed}" for arm in args.arms for seed in seeds}
    missing = [str(path) for path in runs.values() if not (path / "model_index.json").is_file()]
    if missing:
        raise UserError(f"no exported run in {', '.join(missing)}: choose --arms / --seeds the study trained.")

    data = training_data_from_args(args)
    images, labels = dataset_images(data.dataset, limit=args.num_images)
    order = np.random.default_rng(0).permutation(len(images))  # the held-out third is spread over classes
    images, labels = torch.from_numpy(images[order]).permute(0, 3, 1, 2), torch.from_numpy(labels[order]).long()
    split = 2 * len(images) // 3
    mean_only = None  # the cosine of predicting every held-out token by the fitted tokens' mean: the cosine's floor

    results = {"times": args.times, "num_fit": split, "num_held_out": len(images) - split, "arms": {}}
    encoder, vae_weights, latents = None, None, None
    for (arm, seed), folder in runs.items():
        pipe = RepaEPipeline.from_pretrained(folder)
        depth = args.block or json.loads((folder / "projector" / "config.json").read_text())["encoder_depth"]
        if encoder is None:
            tokens = (pipe.transformer.config.sample_size // pipe.transformer.config.patch_size) ** 2
            encoder = load_vision_encoders("efficientnet-lite0", args.resolution, tokens)[0]
            targets = torch.cat([encoder(batch) for batch in images.split(128)]).double()
            fitted_mean = targets[:split].flatten(0, 1).mean(0, keepdim=True)
            mean_only = float(torch.nn.functional.cosine_similarity(fitted_mean, targets[split:], dim=-1).mean())
        weights = (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
        if weights != vae_weights:  # frozen-VAE arms share the starting VAE: encoded once
            vae_weights = weights
            with torch.no_grad():
                means = torch.cat([encode_posterior(pipe.vae, batch)[0] for batch in images.split(128)])
                latents = normalize_latents(pipe.vae, means).float()
        probed = {arm: pipe.transformer}
        if arm == args.arms[0] and seed == seeds[0]:
            torch.manual_seed(0)
            probed[UNTRAINED] = SiTTransformer2DModel.from_config(pipe.transformer.config)
        for name, transformer in probed.items():
            scores = probe_run(transformer, depth, latents, labels, targets, split, args.times, args.ridge)
            results["arms"].setdefault(name, {})[str(seed)] = {"encoder_depth": depth, "scores": scores}
            print(f"[probe] {name} seed {seed} (block {depth}): " + ", ".join(
                f"t={t} cos {c['cosine']:.3f} R2 {c['r2']:.3f}" for t, c in scores.items()), flush=True)  # fmt: skip

    results["mean_only_cosine"] = mean_only
    table = probe_table(results)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    table_path.write_text(table + "\n")
    print(table)
    return results


def probe_table(results: dict) -> str:
    times = results["times"]
    lines = [
        "| SiT | " + " | ".join(f"cosine at t={t} | R^2 at t={t}" for t in times) + " |",
        "|---|" + "---|---|" * len(times),
    ]
    for name, by_seed in results["arms"].items():
        cells = []
        for t in times:
            for key, digits in (("cosine", 3), ("r2", 3)):
                values = [run["scores"][str(t)][key] for run in by_seed.values()]
                cells.append(
                    f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"
                )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"held-out scores of a ridge probe from the SiT's tokens after its aligned block to the encoder's "
              f"tokens, fitted on {results['num_fit']} training images, scored on {results['num_held_out']}; median "
              f"[min, max] over seeds. Predicting every token by the mean token scores cosine "
              f"{results['mean_only_cosine']:.3f}, R^2 0."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)

"""What the mechanism study (``ablation.py``) reports: the arms it knows, the summary and the tables of
``results.json``, the paper's claims against the measurements (``claims.md``), and the plots."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

ARMS = {  # in the order they run for each seed (dropin_e2e needs the repae arm's VAE)
    "vanilla": "SiT, frozen starting VAE, no alignment",
    "repa": "SiT + REPA, frozen starting VAE (= dropin_start)",
    "repae": "REPA-E end-to-end",
    "naive_e2e": "ablation: denoising loss into the VAE, no alignment into it",
    "dropin_e2e": "fresh SiT + REPA, frozen REPA-E VAE",
    "dropin_control": "fresh SiT + REPA, frozen starting VAE after as many VAE-only steps",
    "dropin_e2e_restats": "fresh SiT + REPA, frozen REPA-E VAE with its latent statistics re-measured",
}
TARGETED_ARMS = ("dropin_e2e_restats",)  # targeted measurements: run only when --arms names them
ALIASES = {"dropin_start": "repa"}  # a fresh SiT + REPA on the starting VAE is the repa arm
FD_NAME = "FD-EfficientNetLite0"


def summarise(results: dict) -> dict:
    """Per arm, at the last step: median and [min, max] over seeds of every scalar, and the speed."""
    summary = {}
    for arm, by_seed in results["arms"].items():
        finals = [records[-1] for records in by_seed.values() if records]
        if not finals:
            continue
        row = {}
        for key in ("fd", "precision", "recall", "alignment_cos", "recon_l1", "recon_fd", "effective_rank"):
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
        f"| arm | {FD_NAME} @ {steps} | precision | recall | alignment cos | recon L1 | recon FD | effective rank "
        "| latent std | s / 100 steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(stat: dict, digits: int) -> str:
        return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"

    for arm, row in results["summary"].items():
        lines.append(
            f"| {arm} ({ARMS[arm]}) | {cell(row['fd'], 1)} | {cell(row['precision'], 3)} | "
            f"{cell(row['recall'], 3)} | {cell(row['alignment_cos'], 3)} | {cell(row['recon_l1'], 4)} | "
            f"{cell(row['recon_fd'], 1)} | {cell(row['effective_rank'], 2)} | {row['latent_std_mean']:.3f} | "
            f"{row['seconds_per_100_steps']:.1f} |"
        )
    lines.append("")
    lines.append(
        f"median [min, max] over seeds {results['config']['seeds']}; latent std: of the normalised latents, mean over "
        "channels; recon FD / L1 and effective rank (of 2x2 latent patches): the arm's VAE alone. vanilla trains no "
        "projector (alignment weight 0): its cosine is the untrained baseline."
    )
    return "\n".join(lines)


# (claim, what the paper reports, metric, arm claimed better, arm claimed worse, lower is better)
CLAIMS = [
    ("Back-propagating the diffusion loss into the VAE hurts generation",
     "naive end-to-end training (diffusion loss into the VAE) generates far worse than REPA-E; the reason for the "
     "stop-gradient and the alignment-only VAE update", "fd", "repae", "naive_e2e", True),
    ("... because it collapses the latent space",
     "the diffusion loss drives the latents towards a simpler space, easier to denoise (less variance, less "
     "structure)", "effective_rank", "repae", "naive_e2e", False),
    ("The end-to-end VAE is a better drop-in for a fresh SiT + REPA than the VAE it started from",
     "SiT-XL/1 + REPA on E2E-VA-VAE: gFID 1.69 / 1.12 with CFG (800 epochs), LightningDiT-XL/1 on VA-VAE: "
     "2.05 / 1.25", "fd", "dropin_e2e", "repa", True),
    ("... and not merely because the VAE trained longer",
     "no such control in the paper", "fd", "dropin_e2e", "dropin_control", True),
    ("REPA-E trains faster than REPA", "> 17x fewer steps to REPA's gFID", "fd", "repae", "repa", True),
    ("REPA-E trains faster than a vanilla SiT", "> 45x fewer steps to the vanilla gFID", "fd", "repae", "vanilla",
     True),
    ("REPA trains faster than a vanilla SiT", "REPA's premise (REPA paper: 17.5x for SiT-XL/2)", "fd", "repa",
     "vanilla", True),
    ("End-to-end tuning improves the VAE itself",
     "better latent structure (PCA pictures) while keeping reconstruction quality", "recon_fd", "dropin_e2e",
     "dropin_control", True),
    ("(targeted) The drop-in gap is the exported latent scale",
     "not in the paper: re-measuring the REPA-E VAE's latents_mean / latents_std on the data before the drop-in",
     "fd", "dropin_e2e_restats", "dropin_e2e", True),
]  # fmt: skip


def finals(results: dict, arm: str, key: str) -> dict[str, float]:
    """``key`` at the last scored step of each seed of ``arm`` (seed -> value)."""
    by_seed = results["arms"].get(arm, {})
    return {seed: record_value(records[-1], key) for seed, records in by_seed.items() if records}


def verdict(better: list[float], worse: list[float], lower_is_better: bool) -> str:
    """holds / does not hold when the seeds' [min, max] ranges separate (in the claimed direction or against it),
    inconclusive when they overlap."""
    if not lower_is_better:
        better, worse = [-v for v in better], [-v for v in worse]
    if max(better) < min(worse):
        return "holds"
    if max(worse) < min(better):
        return "does not hold"
    return "inconclusive (seed ranges overlap)"


def claims_table(results: dict) -> str:
    """The paper's claims against this study's measurements, one row per claim whose arms ran."""
    config = results["config"]
    lines = [
        f"| claim | what the paper reports | what we measured at step {config['steps']} (median [min, max] over "
        "seeds) | verdict at this scale | command |",
        "|---|---|---|---|---|",
    ]
    for claim, paper, key, better_arm, worse_arm, lower in CLAIMS:
        better, worse = finals(results, better_arm, key), finals(results, worse_arm, key)
        seeds = sorted(better.keys() & worse.keys(), key=int)
        if not seeds:
            continue
        b, w = [better[seed] for seed in seeds], [worse[seed] for seed in seeds]
        wins = sum((x < y) == lower for x, y in zip(b, w))
        name = "lower" if lower else "higher"
        measured = (
            f"{key} ({name} is better): {better_arm} {statistics.median(b):.2f} [{min(b):.2f}, {max(b):.2f}] vs "
            f"{worse_arm} {statistics.median(w):.2f} [{min(w):.2f}, {max(w):.2f}]; {better_arm} better in {wins} of "
            f"{len(seeds)} seeds"
        )
        arms = [
            arm
            for arm in ARMS
            if arm in {better_arm, worse_arm} or (arm == "repae" and better_arm.startswith("dropin_e2e"))
        ]
        command = (
            f"`python benchmarks/ablation.py --arms {' '.join(arms)} --steps {config['steps']} --seeds "
            f"{' '.join(map(str, config['seeds']))}`"
        )
        lines.append(f"| {claim} | {paper} | {measured} | {verdict(b, w, lower)} | {command} |")
    return "\n".join(lines)


DIAGNOSTICS = {  # results.json key -> axis label, for diagnostics_vs_step.png
    "effective_rank": "effective rank of latent patches",
    "latent_std_mean": "std of normalised latents (channel mean)",
    "recon_fd": f"reconstruction {FD_NAME}",
    "recon_l1": "reconstruction L1",
    "alignment_cos": "alignment cosine (SiT training)",
    "precision": "precision of samples",
}


def plot_banded(axis, results: dict, key: str) -> None:
    """``key`` against step, one line per arm (median over seeds) with the seeds' min-max band."""
    for arm, by_seed in results["arms"].items():
        runs = [records for records in by_seed.values() if records]
        if not runs:
            continue
        length = min(len(records) for records in runs)
        steps = [runs[0][i]["step"] for i in range(length)]
        values = np.array([[record_value(records[i], key) for i in range(length)] for records in runs])
        (line,) = axis.plot(steps, np.median(values, axis=0), marker="o", label=f"{arm}: {ARMS[arm]}")
        axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    axis.set_xlabel("SiT training step")


def record_value(record: dict, key: str) -> float:
    return statistics.fmean(record["latent_std"]) if key == "latent_std_mean" else record[key]


def plot(results: dict, out: Path) -> None:
    """fd_vs_step.png (FD against step) and diagnostics_vs_step.png (the latent and VAE diagnostics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    title = f"{config['data']}, {config['resolution']} px, seeds {config['seeds']} (median, min-max band)"
    fig, axis = plt.subplots(figsize=(7, 4.5))
    plot_banded(axis, results, "fd")
    axis.set_ylabel(f"{FD_NAME} (lower is better)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fd_vs_step.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for axis, (key, label) in zip(axes.flat, DIAGNOSTICS.items()):
        plot_banded(axis, results, key)
        axis.set_ylabel(label, fontsize=8)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "diagnostics_vs_step.png", dpi=100)
    plt.close(fig)

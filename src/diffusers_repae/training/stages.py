"""The paper's stages as calls with keyword arguments, for what composes them (the demo, the mechanism study).

``run_stage("train_ldm", vae=folder, max_train_steps=500, proj_coeff=0)`` runs ``training/train_ldm.py --vae folder
--max_train_steps 500 --proj_coeff 0`` in its own process: each stage builds its own accelerator and frees its
memory when it ends, and what a user reruns by hand is exactly what ran. The keywords are the scripts' flags.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..errors import UserError

# the stage scripts: they live beside the library in a clone (``pip install -e .``), not inside the package
SCRIPTS = Path(__file__).resolve().parents[3] / "training"
STAGES = {
    "train_vae": "the VAE alone (the starting VAE, a decoder stage, the study's control VAE)",
    "train_repae": "VAE + SiT + alignment end to end (REPA-E)",
    "train_ldm": "a SiT on a frozen VAE (REPA, or vanilla with proj_coeff=0)",
    "cache_latents": "a frozen VAE's latents of a dataset, for train_ldm",
    "compute_latent_stats": "a VAE's latent statistics measured on a dataset",
}


def stage_flags(**flags) -> list[str]:
    """Keywords as command-line flags: ``steps=5`` -> ``--steps 5``, ``flip=True`` -> ``--flip``, ``False`` or
    ``None`` -> nothing, a list or tuple -> ``--name a b``."""
    argv = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if isinstance(value, (list, tuple)):
            argv += [str(v) for v in value]
        elif value is not True:
            argv.append(str(value))
    return argv


def stage_command(stage: str, **flags) -> list[str]:
    """``[python, training/<stage>.py, flags...]``."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}.")
    script = SCRIPTS / f"{stage}.py"
    if not script.is_file():
        raise UserError(f"{str(script)!r} is missing: the stages run from a clone of the repository.")
    return [sys.executable, str(script), *stage_flags(**flags)]


def run_stage(stage: str, **flags) -> None:
    """Runs ``stage`` to its end; a failure raises, the stage's own message printed above."""
    status = subprocess.run(stage_command(stage, **flags)).returncode
    if status != 0:
        raise UserError(f"training/{stage}.py failed (exit status {status}); its output is above.")

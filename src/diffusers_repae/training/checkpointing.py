"""Crash-safe accelerate checkpoints and the extra state an exact resume needs.

``accelerator.save_state`` writes into a folder in place: a crash half-way leaves a broken ``checkpoint-N``
and, with diffusers' usual rotate-then-save order, the previous one already deleted. Here the state goes to a
hidden temporary folder that is renamed to ``checkpoint-N`` only when complete, and old checkpoints are removed
only after that.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders in ``output_dir``, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The global step encoded in a ``checkpoint-N`` folder name."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"resume_from_checkpoint {str(path)!r} is not a folder named checkpoint-<step>.")
    return int(match.group(1))


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint in ``output_dir`` (None if there is none)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint {resume_from_checkpoint!r} is not a folder (or 'latest').")
    checkpoint_step(path)
    return path


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, global_step: int, total_limit: int | None = None
) -> Path:
    """``save_state`` into ``.checkpoint-N.tmp``, rename it to ``checkpoint-N``, then drop checkpoints over the limit.

    Must be called on every process (accelerate gathers per-process state); only the main process renames and
    deletes.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{global_step}"
    temporary = root / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved twice: replace only once the new copy is complete
            stale = root / f".checkpoint-{global_step}.old"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            temporary.rename(final)
            shutil.rmtree(stale)
        else:
            temporary.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(root)[: max(0, len(list_checkpoints(root)) - total_limit)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted saves (``.checkpoint-N.tmp``); returns what was removed."""
    root = Path(output_dir)
    removed = [p for p in root.glob(".checkpoint-*.tmp") if p.is_dir()] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path)
    return removed


class ProcessGenerators:
    """Checkpointable per-process ``torch.Generator`` (t, noise, label dropout, posterior samples).

    accelerate saves registered objects from the main process only, so ``state_dict`` gathers every process's
    generator state (a collective: ``save_state`` calls it on all processes) and each process picks its own row
    back on load. A dedicated generator, rather than the global RNG, keeps DataLoader iterator creation (which
    draws from the global RNG) from shifting the random stream when a run resumes mid-epoch.
    """

    def __init__(self, accelerator: Accelerator, seed: int):
        self.accelerator = accelerator
        self.generator = torch.Generator().manual_seed(seed + accelerator.process_index)

    def state_dict(self) -> dict:
        state = self.generator.get_state().to(self.accelerator.device).unsqueeze(0)
        return {"states": self.accelerator.gather(state).cpu()}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["states"]
        if states.shape[0] != self.accelerator.num_processes:
            raise ValueError(
                f"the checkpoint holds random states of {states.shape[0]} processes but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes."
            )
        self.generator.set_state(states[self.accelerator.process_index].clone())


class PerProcessState:
    """Checkpoints an object whose state differs per process (e.g. a sharded stream's position).

    Like `ProcessGenerators`: the main process saves every process's ``state_dict`` (gathered), each process
    loads its own.
    """

    def __init__(self, accelerator: Accelerator, obj):
        self.accelerator, self.obj = accelerator, obj

    def state_dict(self) -> dict:
        from accelerate.utils import gather_object

        return {"states": gather_object([self.obj.state_dict()])}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["states"]
        if len(states) != self.accelerator.num_processes:
            raise ValueError(
                f"the checkpoint holds the state of {len(states)} processes but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes."
            )
        self.obj.load_state_dict(states[self.accelerator.process_index])


class LossHistory:
    """Per-step logged scalars (main process), checkpointed so the final loss-curve plot covers resumed runs."""

    def __init__(self):
        self.records: list[dict[str, float]] = []

    def append(self, step: int, logs: dict[str, float]) -> None:
        self.records.append({"step": step, **logs})

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = list(state_dict["records"])


def all_finite(accelerator: Accelerator, logs: dict[str, torch.Tensor]) -> bool:
    """True when every loss on every process is finite (one collective, so all processes stop together).

    Gradient norms are not checked: with fp16 the gradient scaler legitimately sees inf norms and skips steps.
    """
    losses = [v for k, v in logs.items() if not k.startswith("grad_norm/")]
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in losses])
    bad = (~torch.isfinite(values)).sum().to(accelerator.device).reshape(1)
    return accelerator.reduce(bad, reduction="sum").item() == 0

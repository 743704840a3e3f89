"""Crash-safe accelerate checkpoints that load without executing code, and the extra state an exact resume needs.

``accelerator.save_state`` writes into a folder in place: a crash half-way leaves a broken ``checkpoint-N``
and, with diffusers' usual rotate-then-save order, the previous one already deleted. Here the state goes to a
hidden temporary folder that is renamed to ``checkpoint-N`` only when complete, and old checkpoints are removed
only after that.

Safe loading: accelerate pickles objects registered with ``register_for_checkpointing`` and unpickles them with
``weights_only=False`` (a downloaded checkpoint could run code). The project's own state (EMA, latent BN, random
streams, loss history, stream positions, the run's settings) is therefore registered with
`register_checkpoint_state` instead and written as ``project_state.safetensors`` + ``project_state.json``.
`load_checkpoint` first opens every file of the folder safely (safetensors headers, ``torch.load`` with
``weights_only=True`` and the explicit `ALLOWED_GLOBALS`), refusing anything else with a `CheckpointError`, then
lets accelerate load its own files through the same restricted loader.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
import shutil
import weakref
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from ..disk import writing
from ..errors import UserError
from ..run_lock import LOCK_NAME

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
        raise UserError(f"--resume_from_checkpoint {str(path)!r} is not a folder named checkpoint-<step>.")
    return int(match.group(1))


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint in ``output_dir`` (None if there is none);
    a path, or a checkpoint name inside ``output_dir`` (``checkpoint-2``, as diffusers' examples accept)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        available = [p.name for p in list_checkpoints(output_dir)]
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is neither a folder nor a checkpoint in "
            f"--output_dir {str(output_dir)!r} (available: {available or 'none'}; or pass 'latest')."
        )
    checkpoint_step(path)
    return path


# What a finished training run leaves in its --output_dir besides checkpoints (and its --logging_dir).
RUN_OUTPUTS = (
    "model_index.json", "transformer", "vae", "scheduler", "projector", "discriminator", "lora", "README.md",
    "loss_curves.png", "validation",
)  # fmt: skip
LEFTOVER_PATTERN = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")  # an interrupted save


def _sort_entries(root: Path, logging_dir: str) -> tuple[list[Path], list[Path], bool]:
    """``(ours, foreign, holds_run)``: the entries of ``root`` a training run of ours wrote and the others.

    Run outputs count as ours only beside evidence of a run (a checkpoint, or an export other than README.md): a
    user's own README.md in an otherwise empty folder is the user's.
    """
    entries = sorted(root.iterdir()) if root.is_dir() else []
    logs = Path(logging_dir).parts[0] if logging_dir and not Path(logging_dir).is_absolute() else None
    names = set(RUN_OUTPUTS) | ({logs} if logs else set())
    holds_run = bool(list_checkpoints(root)) or any(p.name in RUN_OUTPUTS and p.name != "README.md" for p in entries)
    ours, foreign = [], []
    for entry in entries:
        if entry.name == LOCK_NAME or LEFTOVER_PATTERN.match(entry.name):
            continue  # the lock, and leftovers `remove_incomplete_checkpoints` removes
        checkpoint = entry.is_dir() and CHECKPOINT_PATTERN.match(entry.name)
        (ours if checkpoint or (holds_run and entry.name in names) else foreign).append(entry)
    return ours, foreign, holds_run


def check_output_dir(
    output_dir: str | Path, resume_from_checkpoint: str | None, overwrite: bool, logging_dir: str = "logs"
) -> list[Path]:
    """Refuses to train into a folder holding a run (checkpoints or an exported pipeline) unless resuming or
    ``--overwrite``, and into a folder whose own files a run would write over; returns what ``--overwrite`` must
    remove (`remove_previous_run`). ``--overwrite`` removes only what a run of ours wrote: a folder holding anything
    else is refused, naming it, before anything is deleted."""
    root = Path(output_dir)
    if not str(output_dir).strip():
        raise UserError("--output_dir must be a path, got '' (an empty path means the current folder).")
    if overwrite and resume_from_checkpoint:
        raise UserError("--overwrite starts over and --resume_from_checkpoint continues: pass only one of them.")
    if root.exists() and not root.is_dir():
        raise UserError(f"--output_dir {str(output_dir)!r} is a file, not a folder.")
    if resume_from_checkpoint:
        resolve_resume_checkpoint(resume_from_checkpoint, root)  # a bad name fails now, not after model loading
        return []
    previous, foreign, _ = _sort_entries(root, logging_dir)
    if overwrite and foreign:
        raise UserError(
            f"--output_dir {str(output_dir)!r} holds {foreign[0].name!r}, which no training run of ours wrote: "
            "--overwrite removes only a previous run's own files. Move it, or choose another folder."
        )
    clash = [p.name for p in foreign if p.name in RUN_OUTPUTS]
    if clash:
        raise UserError(
            f"--output_dir {str(output_dir)!r} holds {clash[0]!r}, which no training run of ours wrote and this run "
            "would write over: move it, or choose another folder."
        )
    if not previous:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise UserError(
            f"--output_dir {str(output_dir)!r} already holds a run ({names}): pass --resume_from_checkpoint latest to "
            "continue it, --overwrite to replace it (its checkpoints are removed), or choose another folder."
        )
    return previous


def remove_previous_run(output_dir: str | Path, previous: list[Path]) -> None:
    """Deletes the checkpoints and exported files `check_output_dir` found (main process only)."""
    for path in previous:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


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
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    with writing(final, temporary if accelerator.is_main_process else None):  # a full disk: one line, no .tmp left
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


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely or does not fit this run; the message says which file and why."""


# What ``torch.load(weights_only=True)`` may rebuild besides tensors and plain containers: numpy arrays and dtypes
# (accelerate's random_states_*.pkl hold numpy's RNG state) and ``codecs.encode`` (how numpy bytes are pickled).
ALLOWED_GLOBALS = [
    (getattr(np, "_core", None) or np.core).multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    codecs.encode,
] + ([np.dtypes.UInt32DType] if hasattr(np, "dtypes") else [])
PROJECT_STATE = "project_state"  # .json (structure, numbers, strings) + .safetensors (tensors)
PICKLED_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


def safe_torch_load(path, map_location=None, **kwargs):
    """``torch.load`` with ``weights_only=True`` and only `ALLOWED_GLOBALS`, whatever the caller asks for."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


def verify_checkpoint_files(folder: str | Path) -> None:
    """Opens every file of a checkpoint folder without executing anything; `CheckpointError` on the first that
    holds pickled objects outside `ALLOWED_GLOBALS`, is damaged, or is accelerate's unsafe custom state."""
    from safetensors import safe_open

    folder = Path(folder)
    legacy = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
    if legacy:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} holds accelerate custom state ({', '.join(legacy)}), which accelerate "
            "unpickles with code execution; it is not loaded. Resume from a checkpoint written by this version."
        )
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in PICKLED_SUFFIXES:
                try:
                    safe_torch_load(path, map_location="cpu", mmap=True)  # checks the pickle, reads no weights
                except RuntimeError as error:
                    if "mmap" not in str(error):
                        raise
                    safe_torch_load(path, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - every failure to open is reported the same way
            unsafe = "weights only load failed" in str(error).lower() or "unsupported global" in str(error).lower()
            why = "holds pickled objects outside the allowed tensors and numbers (nothing was executed)"
            reason = why if unsafe else f"is damaged or not a checkpoint file ({type(error).__name__})"
            raise CheckpointError(
                f"checkpoint file {str(path)!r} {reason}; refusing to resume from it. Resume from another checkpoint."
            ) from None


def _encode(value, tensors: dict[str, torch.Tensor], key: str):
    """A nested state (dicts with string keys, lists, tuples, tensors, numbers, strings, None) -> JSON tree."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) and not k.startswith("__") for k in value):
            raise TypeError(f"checkpoint state {key!r}: only string keys not starting with '__' are supported.")
        return {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state {key!r}: {type(value).__name__} cannot be saved safely.")


def _decode(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(_decode(v, tensors) for v in tree["__tuple__"])
        return {k: _decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    return tree


def save_project_state(objects: dict, folder: str | Path, write: bool = True) -> None:
    """``state_dict()`` of every named object (on every process: some gather) -> ``project_state.{json,safetensors}``
    in ``folder``, written when ``write`` (the main process)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = {name: _encode(obj.state_dict(), tensors, name) for name, obj in objects.items()}
    if write:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / f"{PROJECT_STATE}.safetensors", folder / f"{PROJECT_STATE}.json"]
        with writing(folder, *files):
            save_file(tensors, str(files[0]), metadata={"format": "pt"})
            files[1].write_text(json.dumps(tree, indent=1))


def read_project_state(folder: str | Path) -> dict:
    """The states `save_project_state` wrote, by object name (safetensors + JSON: nothing is unpickled)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = [folder / f"{PROJECT_STATE}.json", folder / f"{PROJECT_STATE}.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: {', '.join(missing)} missing.")
    return _decode(json.loads(files[0].read_text()), load_file(str(files[1])))


_REGISTERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_checkpoint_state(accelerator: Accelerator, **objects) -> None:
    """Saves these objects (``state_dict``/``load_state_dict``) with every ``save_state`` as safetensors + JSON, and
    `load_checkpoint` restores them; the safe replacement for ``accelerator.register_for_checkpointing``.

    An object with a ``check_resume(state)`` method (e.g. `RunSettings`) is checked before anything is loaded.
    """
    first = accelerator not in _REGISTERED
    registry = _REGISTERED.setdefault(accelerator, {})
    clash = set(registry) & set(objects)
    if clash:
        raise ValueError(f"checkpoint state names registered twice: {sorted(clash)}")
    registry.update(objects)
    if first:

        def save_hook(models, weights, output_dir):
            save_project_state(registry, output_dir, write=accelerator.is_main_process)

        accelerator.register_save_state_pre_hook(save_hook)


def load_checkpoint(accelerator: Accelerator, folder: str | Path) -> None:
    """Resumes from ``folder``: verifies every file (`verify_checkpoint_files`), checks the run's settings, restores
    the registered project state, then accelerate's models/optimizers/RNG with the restricted loader."""
    import accelerate.checkpointing

    folder = Path(folder)
    verify_checkpoint_files(folder)
    registry = _REGISTERED.get(accelerator, {})
    state = read_project_state(folder) if registry or (folder / f"{PROJECT_STATE}.json").exists() else {}
    missing = sorted(set(registry) - set(state))
    if missing:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} lacks the state of {missing}: it is from another kind of run."
        )
    for name, obj in registry.items():
        if hasattr(obj, "check_resume"):
            obj.check_resume(state[name])
    for name, obj in registry.items():
        obj.load_state_dict(state[name])
    patch = contextlib.ExitStack()
    with patch:
        original = accelerate.checkpointing.load
        accelerate.checkpointing.load = safe_torch_load
        patch.callback(setattr, accelerate.checkpointing, "load", original)
        try:
            accelerator.load_state(str(folder))
        except (RuntimeError, KeyError) as error:  # e.g. size mismatches: the checkpoint is of another model
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"checkpoint {str(folder)!r} does not fit this run's models ({first_line[:300]}); resume with the "
                "settings it was trained with."
            ) from None


class RunSettings:
    """The settings a run cannot change on resume (recipe, resolution, class count...), saved in each checkpoint.

    ``check_resume`` raises one sentence naming every setting that differs.
    """

    def __init__(self, **settings):
        self.settings = {k: v for k, v in settings.items()}

    def state_dict(self) -> dict:
        return dict(self.settings)

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # nothing to restore: check_resume compared them

    def check_resume(self, saved: dict) -> None:
        diffs = [
            f"{k} {saved.get(k)!r} in the checkpoint, {v!r} now"
            for k, v in self.settings.items()
            if k in saved and saved[k] != v
        ]
        if diffs:
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with other settings ({'; '.join(diffs)}). Use the same "
                "settings, or start a new run in another --output_dir."
            )


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


def weights_finite(accelerator: Accelerator, optimizers) -> bool:
    """True when every parameter the optimizers update is finite on every process (one collective)."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    bad = sum(int(not bool(torch.isfinite(p.detach()).all())) for p in params)
    bad = torch.tensor([bad], device=accelerator.device)
    return accelerator.reduce(bad, reduction="sum").item() == 0


def all_finite(accelerator: Accelerator, logs: dict[str, torch.Tensor]) -> bool:
    """True when every loss on every process is finite (one collective, so all processes stop together).

    Gradient norms are not checked: with fp16 the gradient scaler legitimately sees inf norms and skips steps.
    """
    losses = [v for k, v in logs.items() if not k.startswith("grad_norm/")]
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in losses])
    bad = (~torch.isfinite(values)).sum().to(accelerator.device).reshape(1)
    return accelerator.reduce(bad, reduction="sum").item() == 0

"""The one wrapper every command-line script runs its ``main`` through.

User errors (bad paths, values, formats, missing offline weights, Hub ids while offline) end with one line
``error: ...`` on stderr and exit status 2, like argparse's own errors; anything else is a bug and keeps its
traceback. ``REPAE_TRACEBACK=1`` shows the traceback of user errors too.

    from diffusers_repae.cli import run_cli

    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .disk import disk_full_message, is_disk_full, writing
from .errors import UserError
from .run_lock import LOCK_NAME, carry_lock, release_all

__all__ = [
    "UserError", "check_written", "device_name", "finite_float", "foreign_entries", "non_empty_path",
    "non_negative_float", "non_negative_int", "not_nan_float", "positive_float", "positive_int", "refuse_moved_flags",
    "refuse_overwrite", "remove_ours", "replacing_folder", "run_cli", "seed_int", "unit_interval",
    "user_error_message",
]  # fmt: skip

OFFLINE_HINT = (
    " Offline (HF_HUB_OFFLINE=1) only local folders load: pass a local path (for vision encoders "
    "--encoder_paths NAME=PATH)."
)


def _hub_error_types() -> tuple[type[BaseException], ...]:
    try:
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

        return (HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled)
    except ImportError:  # pragma: no cover - older huggingface_hub
        return ()


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error, or None when ``error`` is a bug (to be shown with its traceback)."""
    text = " ".join(str(error).split()) or type(error).__name__
    hub_errors = _hub_error_types()
    if hub_errors and isinstance(error, hub_errors):
        return text + OFFLINE_HINT
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return text
    if is_disk_full(error):  # a write that no `disk.writing` wrapped: name the file when the error knows it
        return disk_full_message(getattr(error, "filename", None))
    if isinstance(error, PermissionError):
        return text
    if isinstance(error, OSError) and any(
        hint in text.lower() for hint in ("huggingface.co", "offline", "couldn't connect", "is not a local folder")
    ):
        return text + OFFLINE_HINT
    if type(error).__name__ == "SafetensorError":  # a damaged .safetensors file
        return f"a .safetensors file is damaged or not a safetensors file ({text})."
    return None


def _argparse_error(self, message: str):
    """argparse's errors as user errors (one line, no usage block): ``argument --x: msg`` -> ``--x msg``."""
    raise UserError(re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1 ", message))


def run_cli(main: Callable[..., object], argv: list[str] | None = None) -> None:
    """Runs ``main(argv)`` (``main()`` when argv is None); user errors -> ``error: ...`` and exit 2. Folder locks
    (`diffusers_repae.run_lock`) the command still holds are released when it ends."""
    original_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error
    try:
        result = main() if argv is None else main(argv)
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_error_message(error)
        if message is None or os.environ.get("REPAE_TRACEBACK") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        argparse.ArgumentParser.error = original_error
        release_all()
    if isinstance(result, int) and not isinstance(result, bool):
        raise SystemExit(result)


def refuse_overwrite(
    path: str | Path, flag: str, inputs: dict[str, str | Path | None] | None = None, overwrite: bool = False
) -> None:
    """Refuses to write ``path`` (given by ``flag``) over or inside one of ``inputs`` ({flag: path}), always, and
    over an existing file or non-empty folder unless ``overwrite`` (the script's ``--overwrite``)."""
    target = Path(path).resolve()
    for name, source in (inputs or {}).items():
        if source is None or not Path(source).exists():
            continue
        source = Path(source).resolve()
        if target == source or source.is_relative_to(target) or (source.is_dir() and target.is_relative_to(source)):
            raise UserError(
                f"{flag} {str(path)!r} would overwrite the input {name} {str(source)!r}: choose another path."
            )
    # a lone lock file is what a killed run of ours leaves in the folder it created: no reason to refuse
    holds_something = target.is_dir() and any(entry.name != LOCK_NAME for entry in target.iterdir())
    if not overwrite and (target.is_file() or holds_something):
        raise UserError(f"{flag} {str(path)!r} already exists and is not empty: pass --overwrite to replace it.")


@contextlib.contextmanager
def replacing_folder(path: str | Path):
    """Yields a hidden sibling folder to write into; on success it replaces ``path`` as a whole (nothing stale from
    an older folder survives), on failure it is removed and ``path`` is left as it was (a full disk: one
    `DiskFullError` line). A lock this process holds on ``path`` moves into the new folder with it."""
    target = Path(path)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with writing(target, staging):
        staging.mkdir(parents=True)
        yield staging
    if target.exists():
        carry_lock(target, staging)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        staging.rename(target)


def check_written(folder: str | Path, names: list[str]) -> None:
    """Raises when one of ``names`` is missing in ``folder`` (so a command never reports success for nothing)."""
    missing = [name for name in names if not (Path(folder) / name).is_file()]
    if missing:
        raise RuntimeError(f"nothing usable was written to {str(folder)!r}: {', '.join(missing)} missing.")


# ------------------------------------------------------------------ argparse types: values checked where they enter


def refuse_moved_flags(argv: list[str] | None, moved: dict[str, str], no_longer: str) -> None:
    """One ``error:`` line for a flag that moved elsewhere (``moved``: flag -> where it lives now), instead of
    argparse's 'unrecognized arguments'. ``no_longer`` completes "FLAG is no longer ...", e.g. "a demo option"."""
    for item in sys.argv[1:] if argv is None else argv:
        flag = item.split("=", 1)[0]
        if flag in moved:
            raise UserError(f"{flag} is no longer {no_longer}: {moved[flag]}.")


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _at_least(kind, bound, strict: bool, name: str, doc: str):
    """An argparse ``type=`` function: a number of ``kind`` >= ``bound`` (> when ``strict``)."""

    def parse(text: str):
        value = _number(kind, text)
        if value < bound or (strict and value == bound):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {bound}, got {value}")
        return value

    parse.__name__, parse.__doc__ = name, doc
    return parse


positive_int = _at_least(int, 1, False, "positive_int", "argparse ``type=``: an integer >= 1.")
non_negative_int = _at_least(int, 0, False, "non_negative_int", "argparse ``type=``: an integer >= 0.")
positive_float = _at_least(float, 0, True, "positive_float", "argparse ``type=``: a finite number > 0.")
non_negative_float = _at_least(float, 0, False, "non_negative_float", "argparse ``type=``: a finite number >= 0.")


def finite_float(text: str) -> float:
    """argparse ``type=``: any finite number (no nan, no inf)."""
    return _number(float, text)


def not_nan_float(text: str) -> float:
    """argparse ``type=``: a number that is not NaN (inf passes: e.g. a loss weight of inf makes the loss non-finite,
    which stops a run with its own message; the script's range checks follow)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """argparse ``type=``: a number in (0, 1] (a momentum, a fraction)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse ``type=``: a seed numpy and torch both accept, in [0, 2**32 - 1]."""
    value = _number(int, text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32 - 1], got {value}")
    return value


def device_name(text: str) -> str:
    """argparse ``type=``: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:0, got {text!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        allowed = "cpu" if count == 0 else f"cpu or cuda:0 to cuda:{count - 1}"
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA GPU(s); pass {allowed}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; pass cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def non_empty_path(text: str) -> str:
    """argparse ``type=``: a path that is not empty or blank (``''`` would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r} (an empty path means the current folder)")
    return text


# ------------------------------------------------------------------ --overwrite removes only what a run of ours wrote


def foreign_entries(folder: str | Path, is_ours: Callable[[Path], bool]) -> list[Path]:
    """The entries of ``folder`` (recursively inside folders of ours) that ``is_ours`` does not claim, sorted."""
    foreign = []
    root = Path(folder)
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not is_ours(entry):
            foreign.append(entry)
        elif entry.is_dir() and not entry.is_symlink():
            foreign += foreign_entries(entry, is_ours)
    return foreign


def remove_ours(folder: str | Path, flag: str, is_ours: Callable[[Path], bool], keep: tuple[str, ...] = ()) -> None:
    """``--overwrite``: removes what a run of ours wrote in ``folder``, after checking every path first; a folder
    holding anything else is refused (naming the first foreign entry) and nothing is deleted. Names in ``keep``
    (e.g. the lock) stay."""
    root = Path(folder)
    foreign = foreign_entries(root, is_ours)
    if foreign:
        raise UserError(
            f"{flag} {str(folder)!r} holds {str(foreign[0].relative_to(root))!r}, which no run of ours wrote: "
            "--overwrite removes only a previous run's own files. Move it, or choose another folder."
        )
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name in keep:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

"""Weight files given on the command line, read safely, with one line when a file is of the wrong kind or shape.

`read_state_dict` looks at a file's first bytes before any loader does, so a text file, an empty file or a foreign
format is named as such (instead of an UnpicklingError or a zip-reader RuntimeError), and never unpickles code:
safetensors, or ``torch.load(weights_only=True)``. `load_weights_into` compares keys and shapes first and names what
does not fit. `loading` does the same for a folder that a ``from_pretrained`` reads (``--vae``, ``--lora``,
``--encoder_paths``). Every message reads ``FLAG PATH is not WHAT (what was found): what to do``.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .disk import is_disk_full
from .errors import UserError

__all__ = ["WeightFileError", "describe_file", "first_line", "load_weights_into", "loading", "read_state_dict"]

_HEAD_BYTES = 512


class WeightFileError(UserError):
    """A weights file or folder of the wrong kind, damaged, or of another architecture."""


def first_line(error: BaseException) -> str:
    """The first line of an error's text (its type's name when it has none: ``EOFError()`` on an empty file)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def describe_file(path: str | Path) -> str | None:
    """What ``path`` holds when it cannot be a weights file (empty, text, unknown format), else None.
    Recognised: safetensors (an 8-byte header size then JSON), torch's zip format, a pickle (legacy torch.save)."""
    with open(path, "rb") as file:
        head = file.read(_HEAD_BYTES)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # torch.save's zip archive, or a pickle
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return None  # safetensors
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"an unknown binary format (first bytes {head[:8].hex(' ')})"
    snippet = " ".join(text.split())[:40]
    return f"a text file (starting {snippet!r})"


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str | Path, flag: str, expected: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a tensors-only torch file at ``path`` (given by ``flag``; ``expected``
    says what it should be, e.g. "torchvision's vgg16-397923af.pth"). Anything else: one `WeightFileError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{flag} {str(path)!r} does not exist or is not a file: pass the path of {expected}.")
    found = describe_file(path)
    if found is not None:
        raise WeightFileError(f"{flag} {str(path)!r} is not a weights file ({found}): pass {expected}.")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        match = re.search(r"GLOBAL (\S+)", str(error))
        what = f"the Python object {match.group(1)}" if match else "Python objects besides tensors"
        raise WeightFileError(
            f"{flag} {str(path)!r} is not a plain weights file (a pickle holding {what}, which is never unpickled: "
            f"that could run code): pass {expected}, or re-save only its tensors (a state dict, or safetensors)."
        ) from None
    except Exception as error:  # noqa: BLE001 - every reader failure of a user's file is the file's fault
        if is_disk_full(error):
            raise
        raise WeightFileError(
            f"{flag} {str(path)!r} is not a readable weights file (damaged or truncated: {first_line(error)}): "
            f"pass {expected}."
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, Mapping) else "a mapping of other things than tensors"
        raise WeightFileError(f"{flag} {str(path)!r} is not a state dict (it holds {kind}): pass {expected}.")
    return dict(state)


def _examples(items: list[str], count: int = 3) -> str:
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def load_weights_into(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], flag: str, path: str | Path, expected: str
) -> torch.nn.Module:
    """``module.load_state_dict(state)``, after checking keys and shapes: what does not fit is one
    `WeightFileError` naming ``flag``, ``path`` and a few of the keys."""
    wanted = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = [key for key in wanted if key not in state]
    unexpected = [key for key in state if key not in wanted]
    mismatched = [
        f"{key} {tuple(state[key].shape)} (expected {wanted[key]})"
        for key in wanted
        if key in state and tuple(state[key].shape) != wanted[key]
    ]
    problems = [
        f"{len(items)} {name} ({_examples(items)})"
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", mismatched))
        if items
    ]
    if problems:
        raise WeightFileError(
            f"{flag} {str(path)!r} is not {expected} (its tensors do not fit: {'; '.join(problems)}): pass {expected}."
        )
    module.load_state_dict(state)
    return module


# What a from_pretrained raises for a folder whose files are of the wrong kind or do not fit the config.
_FOLDER_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, json.JSONDecodeError)


@contextlib.contextmanager
def loading(flag: str, path: str | Path, expected: str):
    """Around a ``from_pretrained(path)``: a folder it cannot load becomes one `WeightFileError` naming ``flag``,
    ``path`` and the first line of the loader's reason (a user's own `UserError` and a full disk pass through)."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        if not isinstance(error, _FOLDER_ERRORS) and type(error).__name__ != "SafetensorError":
            raise
        if is_disk_full(error):
            raise
        raise WeightFileError(
            f"{flag} {str(path)!r} is not a loadable {expected} ({type(error).__name__}: {first_line(error)}): "
            f"pass a folder written by save_pretrained of {expected}, or check its files."
        ) from None

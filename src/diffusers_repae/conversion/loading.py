"""Safe reading of original REPA-E / LightningDiT checkpoints and strict state-dict checks.

Original checkpoints are pickles that carry an ``argparse.Namespace`` (the training arguments) beside the
tensors. ``torch.load(weights_only=True)`` refuses it, and ``weights_only=False`` would execute whatever a
file contains, so the Namespace (and only it) is allow-listed through ``torch.serialization.safe_globals``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..weight_files import describe_file, first_line

ALLOWED_GLOBALS = [argparse.Namespace]

# Prefixes that wrappers add in front of every key: DDP (``module.``), torch.compile (``_orig_mod.``),
# and the full-model checkpoints of latent diffusion (``first_stage_model.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "first_stage_model.")


class ConversionError(ValueError):
    """An input that cannot be converted; the message says what is wrong and what to pass instead."""


def load_checkpoint(path: str | Path) -> dict:
    """Read ``.pt``/``.pth``/``.ckpt`` (weights-only unpickling, Namespace allowed) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist or is not a file.")
    found = describe_file(path)
    if found is not None:  # an empty or text file: say so, rather than what a reader makes of it
        raise ConversionError(
            f"checkpoint {str(path)!r} is not a weights file ({found}): pass the original .pt/.pth/.ckpt or "
            ".safetensors file (is the download or copy complete?)."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ConversionError(
                f"could not read {str(path)!r} as safetensors (truncated or corrupt?): {error}"
            ) from None
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a pickled object of type {found.group(1)!r}" if found else "a pickled object that is not a tensor"
        raise ConversionError(
            f"refusing to load {str(path)!r}: it contains {what}. Only tensors, plain containers and the "
            "argparse.Namespace of the original training scripts are unpickled, because unpickling anything "
            "else can run arbitrary code. If you trust the file, re-save just its weights in a trusted Python "
            "session (torch.save({'model': ckpt['model'], ...}) with plain tensors, or safetensors) and convert that."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(
            f"could not read {str(path)!r}: {error.__class__.__name__}: {first_line(error)} "
            "(is the file truncated, e.g. an interrupted download or copy?)"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{str(path)!r} holds a {type(checkpoint).__name__}, expected a dict of tensors.")
    return dict(checkpoint)


def is_state_dict(obj) -> bool:
    """A non-empty mapping whose values are all tensors."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (DDP, torch.compile, LDM full model) when **every** key carries it."""
    state_dict = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state_dict and all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                changed = True
    return state_dict


def extract_state_dict(checkpoint: Mapping, nested_keys: Iterable[str] = ("state_dict", "model")) -> dict:
    """The state dict of a file that is either a raw state dict or nests one under ``state_dict`` / ``model``.

    Documented layouts: raw state dicts (REPA-E's released VAEs), ``{"state_dict": ...}`` (latent diffusion /
    LightningDiT lightning checkpoints, which add ``global_step`` etc.) and ``{"model": ...}``.
    Non-tensor entries beside the tensors (e.g. ``global_step``) are dropped.
    """
    for key in nested_keys:
        if key in checkpoint and is_state_dict(checkpoint[key]):
            return strip_wrapper_prefixes(checkpoint[key])
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ConversionError(
            f"found no tensors at the top level nor under {list(nested_keys)}; top-level keys: {sorted(checkpoint)}."
        )
    return strip_wrapper_prefixes(tensors)


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size | tuple], what: str
) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch (with both shapes)."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs expected {tuple(expected[key])}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise ConversionError(f"{what} does not match the expected architecture:\n  " + "\n  ".join(problems))


def group_by_prefix(checkpoint: Mapping, groups: Iterable[str]) -> dict:
    """A flat ``{"ema.blocks.0...": tensor}`` dict (how a safetensors file stores a nested checkpoint) ->
    ``{"ema": {"blocks.0...": tensor}, ...}``; other layouts are returned unchanged."""
    groups = tuple(groups)
    if any(group in checkpoint for group in groups) or not is_state_dict(checkpoint):
        return dict(checkpoint)
    if not any(key.startswith(f"{group}.") for key in checkpoint for group in groups):
        return dict(checkpoint)
    nested: dict = {}
    for key, value in checkpoint.items():
        group, _, rest = key.partition(".")
        if group in groups and rest:
            nested.setdefault(group, {})[rest] = value
        else:
            nested[key] = value
    return nested


def namespace_to_dict(args) -> dict:
    """The training arguments as a plain dict (``{}`` when absent), whatever form they were saved in."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    raise ConversionError(f"checkpoint 'args' is a {type(args).__name__}, expected an argparse.Namespace or a dict.")

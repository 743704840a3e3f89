"""Sizes that cannot fit in memory are refused up front, naming the argument, instead of an out-of-memory crash
(or the kernel killing the process) minutes into a run.

The estimates are lower bounds (what the result alone takes), so a refusal is certain; a size that passes may still
run out later with the model's own activations.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError

__all__ = ["available_bytes", "check_fits", "human_bytes"]


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Free memory of ``device`` in bytes (CUDA: the GPU's; else the machine's available RAM), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type not in ("cpu", "cuda"):
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError  # pragma: no cover


def check_fits(needed: int, what: str, advice: str, device: str | torch.device = "cpu", error=UserError) -> None:
    """Raises ``error`` when ``needed`` bytes (for ``what``, e.g. "--num_samples 10000000 at 256 px") exceed the free
    memory of ``device``; ``advice`` says what to do."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise error(
            f"{what} needs at least {human_bytes(needed)}, more than the {human_bytes(free)} of memory free on "
            f"{torch.device(device)}: {advice}."
        )

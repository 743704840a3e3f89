"""Writes that fail for the machine's sake (a full disk) end in one line, and leave no temporary files behind.

A full disk shows up as ``OSError(errno.ENOSPC)``, or wrapped: torch's ``PytorchStreamWriter failed writing file``
(a RuntimeError), safetensors' ``IoError(Os { code: 28, kind: StorageFull ... })``. `writing` turns any of them into
a `UserError` naming the path being written, after removing the temporary files and folders of that write, so the
corrected rerun (after freeing space) finds nothing in its way.

    with writing(path, temporary):
        np.savez(temporary, ...)
        os.replace(temporary, path)
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from .errors import UserError

__all__ = ["DiskFullError", "is_disk_full", "remove_quietly", "writing"]

# How a full disk reads when a library wrapped the OSError into its own exception.
_DISK_FULL_TEXT = ("no space left on device", "storagefull", "code: 28", "file write failed", "disk quota exceeded")


class DiskFullError(UserError):
    """The disk filled up while writing; the message names the path and what to do."""


def is_disk_full(error: BaseException | None) -> bool:
    """True for ENOSPC/EDQUOT, or a library's exception wrapping one (its text, or its cause or context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(path: str | Path | None) -> str:
    where = f"at {str(path)!r}" if path else "while writing"
    return (
        f"the disk is full {where} (no space left on the device): free some space or write elsewhere, then run the "
        "same command again (the partial files of this write were removed)."
    )


def remove_quietly(*paths: str | Path | None) -> None:
    """Removes files or folders that may or may not exist (the temporaries of a failed write)."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def writing(path: str | Path, *temporaries: str | Path | None):
    """On failure, removes ``temporaries``; a full disk becomes one `DiskFullError` naming ``path``."""
    try:
        yield
    except BaseException as error:
        remove_quietly(*temporaries)
        if isinstance(error, Exception) and not isinstance(error, UserError) and is_disk_full(error):
            raise DiskFullError(disk_full_message(path)) from error
        raise

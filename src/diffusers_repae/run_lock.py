"""One run per output folder at a time: an advisory lock file (``.lock``) in the folder.

A writer takes ``fcntl.flock`` on ``FOLDER/.lock`` and writes its pid, host and start time into it; a second writer
finds the lock held and ends with one line naming the holder. The operating system releases a flock when its
process dies, so a ``.lock`` left by a killed run is simply taken over. A finished run removes its lock file (while
still holding it, so no one can take a lock on a file that is about to vanish: a taker checks that the file it
locked is still the one at the path).

With several processes (accelerate), only the main process locks. ``diffusers_repae.cli.run_cli`` releases every
lock its command still holds when the command ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import UserError

__all__ = [
    "LOCK_NAME", "FolderLock", "carry_lock", "check_not_locked", "folder_lock", "release_all", "release_folder",
]  # fmt: skip

LOCK_NAME = ".lock"
_HELD: list[FolderLock] = []


def _holder_text(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another run"
    return f"pid {info['pid']} on host {info.get('host', '?')} (started {info.get('started', '?')})"


def _in_use(folder: Path, flag: str, holder: str) -> UserError:
    return UserError(f"{flag} {str(folder)!r} is in use by {holder}: wait for it or choose another folder.")


def check_not_locked(folder: str | Path, flag: str = "--output_dir") -> None:
    """Raises when another run holds ``folder``'s lock; writes nothing (a refused command leaves no trace). A lock
    this process still holds (an earlier call that failed outside ``run_cli``) is not another run's."""
    if any(lock.folder.resolve() == Path(folder).resolve() for lock in _HELD):
        return
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(Path(folder), flag, _holder_text(fd)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class FolderLock:
    """The lock of one output folder (created, with its parents, if missing; removed again on release if the run
    left it empty)."""

    def __init__(self, folder: str | Path, flag: str = "--output_dir"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.flag} {str(self.folder)!r} is a file, not a folder.")
        for mine in [lock for lock in _HELD if lock.folder.resolve() == self.folder.resolve()]:
            mine.release()  # left by an earlier command of this process that was not run through run_cli
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self.created = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(fd)
                os.close(fd)
                raise _in_use(self.folder, self.flag, holder) from None
            try:  # the holder may have released and removed the file between our open and flock: lock the new one
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        _HELD.append(self)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it (see the module docstring)
        finally:
            os.close(self.fd)
            self.fd = None
            if self in _HELD:
                _HELD.remove(self)
        if self.created:
            with contextlib.suppress(OSError):  # only if the command wrote nothing else
                self.folder.rmdir()


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str = "--output_dir", enabled: bool = True):
    """``with folder_lock(path):`` holds the folder's lock for the block (``enabled=False``: a non-main process)."""
    lock = FolderLock(folder, flag).acquire() if enabled else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def release_folder(folder: str | Path) -> None:
    """Releases this process's lock of ``folder``, if it holds one."""
    target = Path(folder).resolve()
    for lock in list(_HELD):
        if lock.folder.resolve() == target:
            lock.release()


def carry_lock(folder: str | Path, new_folder: str | Path) -> None:
    """Moves this process's held lock file of ``folder`` into ``new_folder``, which is about to replace ``folder``
    (a rename keeps the file, so the lock stays held throughout; see `cli.replacing_folder`)."""
    target = Path(folder).resolve()
    for lock in _HELD:
        if lock.folder.resolve() == target and lock.path.is_file():
            lock.path.rename(Path(new_folder) / LOCK_NAME)


def release_all() -> None:
    """Releases every lock this process holds (the end of a command)."""
    for lock in list(_HELD):
        lock.release()

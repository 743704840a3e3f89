"""One run per output folder at a time (issue 25): a second run into a folder another process holds ends in one
line naming the holder and writes nothing; a lock left by a killed run does not block the next one."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from diffusers_repae.cli import run_cli
from diffusers_repae.run_lock import LOCK_NAME, FolderLock

ROOT = Path(__file__).resolve().parents[2]
# The package without its __init__ (torch, diffusers): a holder process that starts in a fraction of a second.
BARE = (
    "import sys, types; package = types.ModuleType('diffusers_repae'); "
    f"package.__path__ = [{str(ROOT / 'src' / 'diffusers_repae')!r}]; sys.modules['diffusers_repae'] = package; "
    "from diffusers_repae.run_lock import FolderLock; "
)
HOLD = BARE + "FolderLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"lock_{name}", ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    return holder


def train_args(tmp_path: Path, output_dir: Path, *extra: str) -> list[str]:
    images = tmp_path / "images"
    if not images.exists():
        rng = np.random.default_rng(0)
        for name in ("red", "blue"):
            (images / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(images / name / f"{i}.png")
    return ["--recipe", "tiny-cpu", "--train_data_dir", str(images), "--resolution", "32", "--mixed_precision",
            "no", "--report_to", "none", "--dataloader_num_workers", "0", "--output_dir", str(output_dir),
            *extra]  # fmt: skip


def run(name: str, argv: list[str], capsys) -> tuple[int, str]:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(SystemExit) as caught:
        run_cli(script(name).main, argv)
    return caught.value.code, capsys.readouterr().err


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("train_repae", lambda tmp, out: train_args(tmp, out, "--train_batch_size", "2")),
        ("train_repae", lambda tmp, out: train_args(tmp, out, "--overwrite")),
        ("train_ldm", lambda tmp, out: train_args(tmp, out, "--vae", "tiny-cpu")),
        ("sample_fid", lambda tmp, out: ["--pretrained", "tiny-cpu", "--output_dir", str(out), "--cpu"]),
    ],
    ids=["train_repae", "train_repae-overwrite", "train_ldm", "sample_fid"],
)
def test_a_second_run_into_a_held_folder_is_one_line_and_writes_nothing(tmp_path, capsys, name, argv):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        before = snapshot(out)
        code, err = run(name, argv(tmp_path, out), capsys)
        assert snapshot(out) == before
    finally:
        holder.communicate(b"")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert last.startswith(f"error: --output_dir {str(out)!r} is in use by pid {holder.pid} on host "), last
    assert last.endswith("wait for it or choose another folder."), last


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_NAME).is_file() and str(holder.pid) in (out / LOCK_NAME).read_text()
    # the trainer gets past the lock (it fails later, on the batch size: 4 images cannot fill a batch of 8)
    code, err = run("train_repae", train_args(tmp_path, out, "--train_batch_size", "8"), capsys)
    assert code == 2 and "--train_batch_size" in err.strip().splitlines()[-1], err[-2000:]
    assert list(out.iterdir()) == []  # the failed run released its lock and left nothing behind
    lock = FolderLock(out).acquire()  # and the library takes it over as well
    assert str(os.getpid()) in (out / LOCK_NAME).read_text()
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_exclusive_between_processes_and_released_on_exit(tmp_path):
    from diffusers_repae.errors import UserError

    lock = FolderLock(tmp_path / "new").acquire()
    probe = subprocess.run(
        [sys.executable, "-c", BARE + "FolderLock(sys.argv[1]).acquire()", str(tmp_path / "new")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert probe.returncode != 0 and f"in use by pid {os.getpid()}" in probe.stderr
    lock.release()
    assert not (tmp_path / "new").exists()  # the lock made the folder and nothing else was written: removed again
    holder = hold_lock(tmp_path / "new")
    with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
        FolderLock(tmp_path / "new").acquire()
    holder.communicate(b"")  # a clean exit of the holder (no release call) frees the lock too
    FolderLock(tmp_path / "new").acquire().release()


def test_a_lock_this_process_still_holds_does_not_block_its_next_run(tmp_path):
    """A library call that failed outside run_cli keeps its lock; the next call here goes on, another process not."""
    from diffusers_repae.errors import UserError
    from diffusers_repae.run_lock import check_not_locked, release_all

    FolderLock(tmp_path / "run").acquire()  # left held, as by a failed train_repae.main(...) in a notebook
    try:
        check_not_locked(tmp_path / "run")
        FolderLock(tmp_path / "run").acquire()
        probe = subprocess.run(
            [sys.executable, "-c", BARE + "from diffusers_repae.run_lock import check_not_locked; "
             "check_not_locked(sys.argv[1])", str(tmp_path / "run")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert probe.returncode != 0 and f"in use by pid {os.getpid()}" in probe.stderr
    finally:
        release_all()
    with pytest.raises(UserError, match="in use"):  # and a lock another process holds still blocks this one
        holder = hold_lock(tmp_path / "other")
        try:
            check_not_locked(tmp_path / "other")
        finally:
            holder.communicate(b"")

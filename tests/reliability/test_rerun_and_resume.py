"""A failed command blocks no corrected rerun, and a resume refuses settings that change the meaning of the
checkpoint, naming them (issue 25)."""

import importlib.util
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from diffusers_repae.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_setup import write_tiny_setup  # noqa: E402

sys.path.pop(0)


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"rerun_{name}", ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, argv: list[str], capsys) -> tuple[int, str]:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        run_cli(script(name).main, argv)
    except SystemExit as caught:
        return caught.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_a_failed_sample_fid_run_does_not_block_the_corrected_command(tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["--pretrained", "tiny-cpu", "--output_dir", str(out), "--num_samples", "1", "--num_inference_steps", "1",
            "--cpu", "--skip_npz"]  # fmt: skip
    code, err = run("sample_fid", [*argv, "--guidance_interval", "0.8", "0.2"], capsys)
    assert code == 2 and "guidance_interval" in err.strip().splitlines()[-1], err[-2000:]
    assert not list((out / "images").glob("*.png")) if (out / "images").exists() else True
    code, err = run("sample_fid", [*argv, "--guidance_interval", "0", "1"], capsys)
    assert code == 0, err[-2000:]
    assert (out / "images" / "000000.png").is_file() and not (out / ".lock").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step train_repae run with a checkpoint at step 2."""
    setup = write_tiny_setup(tmp_path_factory.mktemp("resume"))
    out = setup / "run"
    argv = [
        "--recipe", str(setup / "recipe"), "--train_data_dir", str(setup / "images"), "--resolution", "32",
        "--enc_type", "efficientnet-lite0", "--no_lpips", "--mixed_precision", "no", "--train_batch_size", "4",
        "--checkpointing_steps", "2", "--validation_steps", "0", "--output_dir", str(out),
        "--dataloader_num_workers", "0", "--disc_ndf", "8", "--report_to", "none",
    ]  # fmt: skip
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run_cli(script("train_repae").main, [*argv, "--max_train_steps", "2"])
    assert (out / "checkpoint-2").is_dir() and not (out / ".lock").exists()  # a finished run leaves no lock
    return argv, out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--path_type", "cosine", "--max_train_steps", "3"], "path_type 'linear' in the checkpoint, 'cosine' now"),
        (["--max_train_steps", "1"], "--max_train_steps 1 is below the step of the checkpoint to resume (2"),
    ],
    ids=["path_type", "max_train_steps"],
)
def test_resume_refuses_settings_that_change_the_checkpoint(finished_run, capsys, extra, expected):
    argv, out = finished_run
    code, err = run("train_repae", [*argv, "--resume_from_checkpoint", "latest", *extra], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and expected in last, err[-2000:]
    assert not (out / "checkpoint-3").exists() and not (out / ".lock").exists()

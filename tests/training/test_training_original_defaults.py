"""Issue 13: the training defaults a user of the original expects (precision source, TF32, LPIPS range, --vae)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from diffusers_repae.run_lock import release_all
from diffusers_repae.training import builders, loop
from diffusers_repae.training_args import run_config, vae_loss_options

SCRIPTS = Path(__file__).resolve().parents[2] / "training"


def _train_repae():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_repae
    finally:
        sys.path.pop(0)
    return train_repae


def _parse(*argv: str):
    return _train_repae().parse_args(["--recipe", "tiny-cpu", "--no_lpips", *argv])


def _accelerator(args, monkeypatch, launched: str | None):
    """`setup_accelerator` as under ``accelerate launch --mixed_precision LAUNCHED`` (which sets this variable)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    if launched is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    try:
        return loop.setup_accelerator(run_config(args)).mixed_precision
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        release_all()  # each call stands for its own launch: its run lock ends with it


def test_mixed_precision_comes_from_accelerate_unless_the_flag_is_given(tmp_path, monkeypatch, caplog):
    """Item 3: no --mixed_precision -> accelerate's launch flag / config decide; the flag, when given, wins."""
    args = _parse("--output_dir", str(tmp_path / "a"))
    assert args.mixed_precision is None
    with caplog.at_level(logging.INFO, logger=loop.logger.name):
        assert _accelerator(args, monkeypatch, launched="bf16") == "bf16"
    assert "mixed precision: bf16 (from accelerate launch/config" in caplog.text
    assert _accelerator(args, monkeypatch, launched=None) == "no"
    explicit = _parse("--output_dir", str(tmp_path / "b"), "--mixed_precision", "no")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=loop.logger.name):
        assert _accelerator(explicit, monkeypatch, launched="bf16") == "no"
    assert "mixed precision: no (from --mixed_precision" in caplog.text


def test_documented_recipe_commands_keep_the_originals_fp16():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("# ImageNet, SiT-XL/2 + SD-VAE, 8 GPUs")
    command = readme[start : readme.index("\n# ", start + 1)]
    assert "--mixed_precision fp16" in command
    assert "--mixed_precision fp16" in (SCRIPTS / "train_repae.py").read_text().split('"""')[1]


@pytest.mark.parametrize(
    ("cuda", "capability", "flags", "expected"),
    [
        (True, (8, 0), (), True),  # Ampere: on by default, as the original
        (True, (9, 0), ("--no_allow_tf32",), False),
        (True, (7, 5), (), False),  # Turing has no TF32
        (False, None, (), False),
    ],
)
def test_tf32_on_by_default_on_ampere(monkeypatch, cuda, capability, flags, expected):
    """Item 10: the original sets allow_tf32 for matmuls and cuDNN; --no_allow_tf32 keeps strict fp32."""
    args = _parse(*flags)
    assert args.allow_tf32 == ("--no_allow_tf32" not in flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not expected
        assert loop.configure_tf32(args.allow_tf32) == expected
        if cuda:
            assert torch.backends.cuda.matmul.allow_tf32 == expected and torch.backends.cudnn.allow_tf32 == expected
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_lpips_input_range_flag_reaches_the_loss():
    """Item 6: --lpips_input_range {correct, original}, default correct (the numbers: test_training_losses.py)."""
    device = torch.device("cpu")
    assert builders.build_vae_loss(device, **vae_loss_options(_parse())).lpips_input_range == "correct"
    original = vae_loss_options(_parse("--lpips_input_range", "original"))
    assert builders.build_vae_loss(device, **original).lpips_input_range == "original"
    with pytest.raises(SystemExit):
        _parse("--lpips_input_range", "zero_one")


def test_help_names_each_recipes_vae(capsys):
    """Item 10: --help says which VAE each recipe starts from."""
    with pytest.raises(SystemExit):
        _train_repae().parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for recipe_and_vae in ("sit-xl-2-sdvae:SD-VAE", "sit-xl-1-vavae:VA-VAE", "sit-xl-1-invae:IN-VAE", "sit-b-2-sdvae"):
        assert recipe_and_vae in text
    assert "RANDOMweights" in text


def test_autocast_dtype_follows_the_mixed_precision():
    class FakeAccelerator:
        mixed_precision = "no"

    accelerator = FakeAccelerator()
    assert loop.autocast_dtype(accelerator) is None
    accelerator.mixed_precision = "fp16"
    assert loop.autocast_dtype(accelerator) == torch.float16
    accelerator.mixed_precision = "bf16"
    assert loop.autocast_dtype(accelerator) == torch.bfloat16

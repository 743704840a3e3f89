"""`--mixed_precision fp16` on the CPU: accelerate silently runs fp32 there, so training refuses it in one line."""

import pytest
from accelerate.state import AcceleratorState, GradientState

from diffusers_repae.cli import UserError
from diffusers_repae.training.loop import RunConfig, setup_accelerator


def _args(tmp_path, precision):
    return RunConfig(output_dir=str(tmp_path), mixed_precision=precision, report_to="none")


def test_fp16_on_cpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(UserError, match="--mixed_precision fp16 needs a GPU"):
        setup_accelerator(_args(tmp_path, "fp16"))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_cpu_precisions_that_do_something_are_accepted(tmp_path, monkeypatch, precision):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = setup_accelerator(_args(tmp_path, precision))
    assert accelerator.mixed_precision == precision
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

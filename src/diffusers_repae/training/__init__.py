"""Training, library part: losses, EMA, data, vision encoders, checkpoints, the shared loop (the [train] extra)."""

from .. import _require_extra

_require_extra("train", "accelerate", "datasets", "peft", "lpips")

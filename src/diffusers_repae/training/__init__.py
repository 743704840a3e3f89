"""Training, library part: losses, EMA, data, vision encoders, checkpoints, optimisers, the shared loop, validation
and export (the [train] extra). The flags that set them live in ``diffusers_repae.training_args``."""

from .. import _require_extra

_require_extra("train", "accelerate", "datasets", "peft", "lpips")

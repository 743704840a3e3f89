"""Checks of RepaEPipeline's call arguments and saved sampling defaults: each names the argument, the value and
what is allowed (the pipeline's ``check_inputs`` and ``prepare_latents`` call them)."""

import math

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SAMPLING_DTYPES = (torch.float32, torch.float64)
# Far beyond any useful grid (the paper uses 250); 10**9 steps would need gigabytes for the time grid alone.
MAX_INFERENCE_STEPS = 100_000


def is_real_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def images_per_label(num_images_per_prompt: int | None, num_images_per_label: int | None) -> int:
    """``num_images_per_prompt`` (diffusers' name) or its older alias ``num_images_per_label``; 1 by default."""
    if None not in (num_images_per_prompt, num_images_per_label) and num_images_per_prompt != num_images_per_label:
        raise ValueError(
            f"num_images_per_prompt={num_images_per_prompt!r} and num_images_per_label={num_images_per_label!r} "
            "disagree; they are the same setting (num_images_per_label is the older name): pass one."
        )
    name = "num_images_per_label" if num_images_per_prompt is None else "num_images_per_prompt"
    value = num_images_per_label if num_images_per_prompt is None else num_images_per_prompt
    value = 1 if value is None else value
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def flatten_label_batch(labels: list | tuple) -> list:
    """A list of labels, or a list of such lists one level deep (``[[1], [1]]``: one list per prompt, as DiT's
    callers and diffusers' batch test helpers pass them), flattened in order. Deeper nesting, or lists mixed
    with plain labels, would be ambiguous: a ValueError."""
    nested = [isinstance(item, (list, tuple)) for item in labels]
    if not any(nested):
        return list(labels)
    if not all(nested):
        raise ValueError(
            f"class_labels: {labels!r} mixes lists with single labels; allowed: a list of labels, or a list of "
            "lists of labels (one level of nesting, e.g. [[1], [2, 3]])."
        )
    flat = []
    for inner in labels:
        if not inner or any(isinstance(item, (list, tuple)) for item in inner):
            raise ValueError(
                f"class_labels: the inner list {inner!r} is {'empty' if not inner else 'nested again'}; allowed: "
                "one level of nesting, each inner list naming at least one class (e.g. [[1], [2, 3]])."
            )
        flat.extend(inner)
    return flat


def check_defaults(steps, scale, interval) -> None:
    """The sampling defaults (``model_index.json``, perhaps edited by hand) are checked like a call's values."""
    whole = isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)
    if not whole or not 1 <= steps <= MAX_INFERENCE_STEPS:
        raise ValueError(
            f"model_index.json: default_num_inference_steps must be an integer in [1, {MAX_INFERENCE_STEPS:,}], "
            f"got {steps!r}."
        )
    if not is_real_number(scale) or not math.isfinite(scale):
        raise ValueError(f"model_index.json: default_guidance_scale must be a finite number, got {scale!r}.")
    try:
        check_guidance_interval(interval)
    except ValueError as error:
        raise ValueError(f"model_index.json: default_{error}") from None
    if not 0 <= float(interval[0]) <= float(interval[1]) <= 1:
        raise ValueError(
            f"model_index.json: default_guidance_interval must satisfy 0 <= low <= high <= 1, got {interval!r}."
        )


def check_guidance_interval(guidance_interval) -> None:
    """A pair of real numbers (a list, tuple, array or tensor of two): a string like "01" has two items too."""
    pair = guidance_interval.tolist() if isinstance(guidance_interval, (torch.Tensor, np.ndarray)) else None
    pair = pair if pair is not None else guidance_interval
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(is_real_number(v) for v in pair):
        raise ValueError(
            f"guidance_interval must be a pair of numbers (low, high) with 0 <= low <= high <= 1, got "
            f"{guidance_interval!r}."
        )


def check_generator(generator, batch_size: int) -> None:
    """One torch.Generator, None, or a list of exactly ``batch_size`` generators (no None among them: which
    images would be drawn from what is then unclear); none of them on the meta device (it has no numbers)."""
    generators = generator if isinstance(generator, list) else [generator]
    allowed = (
        "allowed: a torch.Generator (e.g. torch.Generator().manual_seed(0)), a list of them (one per image), or None."
    )
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(
                f"generator: a list of {len(generator)} generators was given for a batch of {batch_size}; "
                f"allowed: one generator, or a list of exactly {batch_size}."
            )
        wrong = [i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)]
        if wrong:
            item = generator[wrong[0]]
            raise TypeError(f"generator[{wrong[0]}] is {type(item).__name__}, not a torch.Generator; {allowed}")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: got {type(generator).__name__}; {allowed}")
    if any(g is not None and g.device.type == "meta" for g in generators):
        raise ValueError("generator: a meta-device generator draws no numbers; use a cpu or cuda generator.")


def check_latents(latents, shape: tuple) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents: got {type(latents).__name__}; allowed: a torch.Tensor of shape {shape}.")
    if not latents.is_floating_point():
        raise ValueError(
            f"latents: dtype {latents.dtype}; allowed: a floating-point tensor (Gaussian noise, e.g. "
            "torch.randn), not integers or booleans."
        )
    if latents.device.type == "meta":
        raise ValueError("latents: a meta-device tensor holds no values; pass a cpu or cuda tensor.")
    if tuple(latents.shape) != shape:
        raise ValueError(
            f"latents: shape {tuple(latents.shape)} does not match the expected {shape} "
            "(batch, transformer.config.in_channels, sample_size, sample_size)."
        )
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents: holds NaN or infinite values; allowed: finite initial noise.")

"""RepaEPipeline: class-conditional image generation with a REPA-E SiT and its VAE (SPEC section 8)."""

import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..loaders.lora_pipeline import RepaELoraLoaderMixin
from ..memory import check_fits
from ..models.transformer_sit import SiTTransformer2DModel
from ..models.vae import check_latent_stats, denormalize_latents
from ..schedulers import scheduler_for_sampler, set_repae_timesteps
from .hub import RepaEHubMixin
from .input_checks import (
    MAX_INFERENCE_STEPS,
    OUTPUT_TYPES,
    SAMPLING_DTYPES,
    check_defaults,
    check_generator,
    check_guidance_interval,
    check_latents,
    flatten_label_batch,
    images_per_label,
)

logger = logging.get_logger(__name__)

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.json")
EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_repae import RepaEPipeline

        >>> pipe = RepaEPipeline.from_pretrained("path/to/repae-sit-xl-2-sdvae")  # a save_pretrained folder
        >>> generator = torch.Generator().manual_seed(0)
        >>> images = pipe(class_labels=[207, "tabby cat"], generator=generator).images  # recommended settings
        >>> images[0].save("golden_retriever.png")

        >>> # the deterministic ODE samplers, the diffusers way or by name
        >>> from diffusers_repae import FlowMatchHeunScheduler
        >>> pipe.scheduler = FlowMatchHeunScheduler.from_config(pipe.scheduler.config)
        >>> images = pipe(class_labels=207, num_inference_steps=50, sampler="euler").images
        ```
"""


def load_imagenet_id2label() -> dict[str, str]:
    """The 1000 ImageNet-1k class names (comma-separated synonyms), shipped with the package: no network needed."""
    return json.loads(IMAGENET_CLASSES_FILE.read_text(encoding="utf-8"))


class RepaEPipeline(RepaEHubMixin, DiffusionPipeline, RepaELoraLoaderMixin):
    r"""
    Class-conditional generation with a SiT velocity model in a VAE's normalised latent space (REPA / REPA-E).

    The SiT works in normalised latents ``(z - latents_mean) / latents_std`` (the VAE config's statistics), so
    any ``AutoencoderKL`` works, including REPA-E's published ``*-hf`` VAEs. Sampling follows the original
    exactly: the time grid of the scheduler (Euler-Maruyama SDE by default, Euler or Heun ODE by swapping the
    scheduler or passing ``sampler=``), classifier-free guidance with the null class only inside the guidance
    interval, and ``uint8`` images by truncation of ``255 x``.

    Args:
        transformer ([`SiTTransformer2DModel`]): The velocity model; takes t in [0, 1] (t = 1 is noise).
        vae ([`AutoencoderKL`]): Decodes ``latents * latents_std + latents_mean`` to images in [-1, 1].
        scheduler ([`FlowMatchEulerMaruyamaScheduler`], [`FlowMatchHeunScheduler`] or any diffusers flow-matching
            scheduler: [`FlowMatchEulerDiscreteScheduler`], [`DPMSolverMultistepScheduler`] /
            [`UniPCMultistepScheduler`] with ``use_flow_sigmas=True, prediction_type="flow_prediction"``): The
            sampler. It gets REPA-E's grid through ``set_timesteps(sigmas=...)`` where it takes one (the
            scheduler's own ``shift`` / ``flow_shift`` still applies), its own flow grid otherwise.
        id2label (`dict[str, str]`, *optional*): Class id -> comma-separated names. Defaults to the ImageNet-1k
            names when the transformer has 1000 classes (not stored then; a given mapping is stored).
        default_num_inference_steps (`int`, defaults to 250): Steps used when a call does not say.
        default_guidance_scale (`float`, defaults to 1.0): Guidance used when a call does not say (1 = none).
        default_guidance_interval (`list[float]`, defaults to `[0.0, 1.0]`): ``[low, high]`` in t where guidance
            applies, used when a call does not say. The three defaults are the model card's recommendation and
            are saved in ``model_index.json``.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: SiTTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        id2label: dict[str, str] | None = None,
        default_num_inference_steps: int = 250,
        default_guidance_scale: float = 1.0,
        default_guidance_interval: tuple[float, float] | list[float] = (0.0, 1.0),
    ):
        super().__init__()
        if vae is not None:
            check_latent_stats(vae.config)  # a folder whose statistics would turn every image into NaN
        check_defaults(default_num_inference_steps, default_guidance_scale, default_guidance_interval)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if id2label is not None:
            id2label = {str(key): value for key, value in id2label.items()}
        self.register_to_config(
            id2label=id2label,
            default_num_inference_steps=int(default_num_inference_steps),
            default_guidance_scale=float(default_guidance_scale),
            default_guidance_interval=[float(v) for v in default_guidance_interval],
        )
        if id2label is None and transformer is not None and transformer.config.num_classes == 1000:
            id2label = load_imagenet_id2label()
        self.id2label: dict[int, str] = {int(key): value for key, value in (id2label or {}).items()}
        self.labels = self._synonym_index(self.id2label)

    @staticmethod
    def _synonym_index(id2label: dict[int, str]) -> dict[str, list[int]]:
        """Lower-cased synonym -> class ids (a list, since ImageNet reuses some names, e.g. "crane")."""
        index: dict[str, list[int]] = {}
        for class_id, names in sorted(id2label.items()):
            for name in names.split(","):
                name = name.strip().lower()
                if name and class_id not in index.setdefault(name, []):
                    index[name].append(class_id)
        return index

    @classmethod
    def from_recipe(cls, recipe: str | Path, **kwargs) -> "RepaEPipeline":
        """A pipeline with RANDOM weights from a recipe folder (configs only): for demos, tests and smoke runs."""
        from ..recipes import build_from_recipe, resolve_recipe

        folder = resolve_recipe(recipe)
        index = json.loads((folder / "model_index.json").read_text())
        settings = {key: index[key] for key in cls._recipe_settings() if key in index}
        logger.warning(
            f"RepaEPipeline.from_recipe({str(recipe)!r}): the transformer and VAE have RANDOM weights; "
            "the images will be noise-like. Load trained weights with RepaEPipeline.from_pretrained."
        )
        return cls(**build_from_recipe(folder), **{**settings, **kwargs})

    @staticmethod
    def _recipe_settings() -> tuple[str, ...]:
        return ("id2label", "default_num_inference_steps", "default_guidance_scale", "default_guidance_interval")

    def get_label_ids(self, label: int | str | Sequence[int | str]) -> list[int]:
        """Class ids for ints, or names (case-insensitive; any of a class's comma-separated synonyms).

        Also accepted: integer tensors and numpy arrays (any shape, 0-d included) and numpy integer scalars.
        """
        if isinstance(label, (torch.Tensor, np.ndarray)):
            if isinstance(label, torch.Tensor):
                integer = not (label.is_floating_point() or label.is_complex() or label.dtype == torch.bool)
            else:
                integer = np.issubdtype(label.dtype, np.integer)
            if not integer:
                raise TypeError(
                    f"class_labels: a {type(label).__name__} of dtype {label.dtype}; allowed: integer ids."
                )
            label = label.reshape(-1).tolist()
        if isinstance(label, (int, str, np.integer)):
            labels = [label]
        elif isinstance(label, (list, tuple)):
            labels = flatten_label_batch(label)
        else:
            raise TypeError(
                f"class_labels: {type(label).__name__} is not accepted; allowed: an int, a class name, or a list, "
                "tuple, integer tensor or numpy array of them."
            )
        num_classes = self.transformer.config.num_classes
        ids = []
        for item in labels:
            if isinstance(item, str):
                matches = self.labels.get(item.strip().lower())
                if not matches:
                    known = "none (this pipeline has no id2label)" if not self.labels else f"{len(self.labels)} names"
                    raise ValueError(
                        f"class_labels: unknown class name {item!r}; allowed: ints in [0, {num_classes - 1}] or one "
                        f"of "
                        f"the names in pipe.id2label ({known})."
                    )
                if len(matches) > 1:
                    options = ", ".join(f"{i} ({self.id2label[i]!r})" for i in matches)
                    raise ValueError(
                        f"class_labels: name {item!r} is ambiguous, it names classes {options}; pass the id."
                    )
                ids.append(matches[0])
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if not 0 <= int(item) < num_classes:
                    raise ValueError(
                        f"class_labels: label {int(item)} is out of range; allowed: [0, {num_classes - 1}] "
                        f"(transformer.config.num_classes = {num_classes}; {num_classes} is the null class)."
                    )
                ids.append(int(item))
            elif isinstance(item, torch.Tensor) and item.ndim == 0 and not item.is_floating_point():
                ids.extend(self.get_label_ids(item))
            else:
                raise TypeError(f"class_labels: {item!r} ({type(item).__name__}) is neither an int nor a class name.")
        if not ids:
            raise ValueError("class_labels must name at least one class, got an empty list.")
        return ids

    def check_inputs(
        self,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_interval: Sequence[float],
        output_type: str,
        sampling_dtype: torch.dtype,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        if (
            not isinstance(num_inference_steps, int)
            or isinstance(num_inference_steps, bool)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
        if num_inference_steps > MAX_INFERENCE_STEPS:
            raise ValueError(
                f"num_inference_steps must be at most {MAX_INFERENCE_STEPS:,}, got {num_inference_steps:,} "
                "(the paper samples with 250)."
            )
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise ValueError(f"guidance_scale must be a number (> 1 enables guidance), got {guidance_scale!r}.")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite (> 1 enables guidance), got {guidance_scale!r}.")
        check_guidance_interval(guidance_interval)
        low, high = (float(v) for v in guidance_interval)
        if not (0.0 <= low <= high <= 1.0):
            raise ValueError(
                f"guidance_interval must satisfy 0 <= low <= high <= 1 (times in [0, 1]), "
                f"got {tuple(guidance_interval)}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if sampling_dtype not in SAMPLING_DTYPES:
            raise ValueError(f"sampling_dtype must be one of {SAMPLING_DTYPES}, got {sampling_dtype!r}.")
        vae_channels = self.vae.config.latent_channels
        sit_channels = self.transformer.config.in_channels
        if vae_channels != sit_channels:
            raise ValueError(
                f"vae: latent_channels {vae_channels} does not match transformer.config.in_channels {sit_channels}; "
                "allowed: a VAE whose latents the transformer was trained on."
            )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs: {unknown} not allowed; "
                    f"allowed: {self._callback_tensor_inputs}."
                )

    @property
    def image_size(self) -> int:
        """The side in pixels of the images this pipeline makes."""
        return self.transformer.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def batch_bytes(self, batch_size: int) -> int:
        """A lower bound on the memory one call of ``batch_size`` images needs: the decoded float32 images and the
        VAE decoder's full-resolution feature map (both exist at once)."""
        return batch_size * self.image_size**2 * 4 * (3 + self.vae.config.block_out_channels[0])

    def check_batch_fits(self, batch_size: int, what: str, advice: str) -> None:
        """Refuses a batch that cannot fit in the execution device's free memory, naming ``what`` set its size."""
        check_fits(self.batch_bytes(batch_size), what, advice, self._execution_device, error=ValueError)

    def prepare_latents(
        self,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise ``[B, C, S, S]`` in normalised latent space (drawn in float32 like the original)."""
        config = self.transformer.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        check_generator(generator, batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            check_latents(latents, shape)
        return latents.to(device=device, dtype=dtype)

    @staticmethod
    def _time_of(scheduler, index: int, timestep: torch.Tensor) -> float:
        """The model time t in [0, 1] of evaluation ``index``: the scheduler's exact sigma when it has one."""
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
            return float(sigmas[index])
        return float(timestep) / scheduler.config.num_train_timesteps

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [0, 1], ``[B, 3, H, W]`` float32, via the VAE config's statistics."""
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        image = self.vae.decode(denormalize_latents(self.vae, latents)).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def to_uint8(images: torch.Tensor) -> np.ndarray:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, H, W, 3]`` uint8 by truncating ``255 x``, as the original does."""
        return (255.0 * images).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: Sequence[float] | None = None,
        num_images_per_label: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sampler: str | None = None,
        sampling_dtype: torch.dtype = torch.float32,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        num_images_per_prompt: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images of the given classes.

        Args:
            class_labels (`int`, `str` or a list of them): Class ids or names (case-insensitive, any synonym in
                ``pipe.id2label``), or a list of such lists (one level, flattened). One image per label (times
                ``num_images_per_prompt``).
            num_inference_steps (`int`, *optional*): Sampler steps; the model card's value when omitted. Heun uses
                ``2N - 1`` model evaluations, Euler and Euler-Maruyama ``N``.
            guidance_scale (`float`, *optional*): Classifier-free guidance ``v_u + s (v_c - v_u)`` with the null
                class; ``<= 1`` disables it. The model card's value when omitted.
            guidance_interval (`(float, float)`, *optional*): ``(low, high)``: guidance applies when
                ``low <= t <= high``; outside, the unconditional pass is skipped. Heun's corrector evaluation at
                ``t_{i+1}`` is guided when its step's start ``t_i`` is, as in the original. The model card's when
                omitted.
            num_images_per_label (`int`, *optional*): The former name of ``num_images_per_prompt``; still accepted.
            generator (`torch.Generator` or a list, one per image, *optional*): Draws the initial noise and, for
                the SDE, the Brownian increments; the same generator reproduces a run.
            latents (`torch.Tensor`, *optional*): Initial noise ``[B, C, S, S]`` in normalised latent space;
                drawn from ``generator`` when omitted.
            sampler (`str`, *optional*): ``"sde"``, ``"euler"``, ``"heun"``, ``"dpmsolver++"`` or ``"unipc"`` to use a
                fresh scheduler of that kind (built from ``pipe.scheduler.config``, see ``scheduler_for_sampler``) for
                this call only; ``None`` uses ``pipe.scheduler``.
            sampling_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the sampler state, velocities and
                guidance arithmetic. ``torch.float64`` matches the original REPA-E sampler bit for bit in the
                state (the transformer still runs in its own dtype); diffusers' Euler scheduler computes its
                update in float32 regardless.
            output_type (`str`, defaults to `"pil"`): ``"pil"`` (from uint8 made by truncating ``255 x`` like the
                original), ``"np"`` (float ``[B, H, W, 3]`` in [0, 1], the diffusers convention), ``"pt"`` (float
                ``[B, 3, H, W]`` in [0, 1]) or ``"latent"`` (normalised latents). ``pipe.to_uint8`` turns ``"pt"``
                images into the original's uint8 arrays (e.g. for FID reference batches).
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): ``fn(pipe, i, t, callback_kwargs) -> dict`` after every
                model evaluation; may replace ``latents``.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): Tensors passed to the callback
                (``["latents"]``).
            num_images_per_prompt (`int`, defaults to 1): Images per label (consecutive in the output); diffusers'
                standard name, a label being this pipeline's prompt.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images (or latents).
        """
        num_inference_steps = (
            self.config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        )
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        guidance_interval = self.config.default_guidance_interval if guidance_interval is None else guidance_interval
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs
        self.check_inputs(
            num_inference_steps,
            guidance_scale,
            guidance_interval,
            output_type,
            sampling_dtype,
            callback_on_step_end_tensor_inputs,
        )
        num_images_per_prompt = images_per_label(num_images_per_prompt, num_images_per_label)
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        low, high = (float(v) for v in guidance_interval)
        do_guidance = self._guidance_scale > 1.0
        device = self._execution_device

        # 2. Labels (and the null class for guidance)
        class_ids = self.get_label_ids(class_labels)
        batch_size = len(class_ids) * num_images_per_prompt
        self.check_batch_fits(  # before any list of that size is made
            batch_size,
            f"a batch of {batch_size:,} images (class_labels x num_images_per_prompt)",
            "generate fewer images per call",
        )
        label_ids = [i for i in class_ids for _ in range(num_images_per_prompt)]
        labels = torch.tensor(label_ids, device=device, dtype=torch.long)
        null_labels = torch.full_like(labels, self.transformer.config.num_classes)

        # 3. Initial noise
        latents = self.prepare_latents(batch_size, sampling_dtype, device, generator, latents)

        # 4. Time grid
        scheduler = self.scheduler if sampler is None else scheduler_for_sampler(sampler, self.scheduler.config)
        set_repae_timesteps(scheduler, num_inference_steps, device=device)
        # Stochastic schedulers draw from `generator`; some of diffusers' (UniPC) take no such argument.
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        self._num_timesteps = len(timesteps)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * scheduler.order, 0)
        model_dtype = self.transformer.dtype

        # 5. Denoising loop
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, timestep in enumerate(timesteps):
                if self.interrupt:
                    continue
                t = self._time_of(scheduler, i, timestep)
                if getattr(scheduler, "state_in_first_order", True):
                    step_start = t  # a Heun corrector is guided iff its step's start time is, as in the original
                guided = do_guidance and low <= step_start <= high
                model_input = torch.cat([latents, latents]) if guided else latents
                model_labels = torch.cat([labels, null_labels]) if guided else labels
                # t stays float32 whatever the weights' dtype (bf16 would merge neighbouring times of a fine grid)
                time_input = torch.full((model_input.shape[0],), t, device=device, dtype=torch.float32)
                velocity = self.transformer(model_input.to(model_dtype), time_input, model_labels).sample
                velocity = velocity.to(sampling_dtype)
                if guided:
                    cond, uncond = velocity.chunk(2)
                    velocity = uncond + self._guidance_scale * (cond - uncond)

                latents = scheduler.step(velocity, timestep, latents, **step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, timestep, callback_kwargs)
                    if callback_outputs is not None and not isinstance(callback_outputs, dict):  # None: no change
                        raise TypeError(
                            f"callback_on_step_end returned {type(callback_outputs).__name__}; allowed: a dict "
                            "(e.g. callback_kwargs, to replace 'latents') or None."
                        )
                    latents = (callback_outputs or {}).pop("latents", latents)
                    if not isinstance(latents, torch.Tensor) or not bool(torch.isfinite(latents).all()):
                        raise ValueError(
                            f"callback_on_step_end returned latents that are not a finite tensor at step {i} "
                            f"(timestep {float(timestep):g}); allowed: finite latents of the shape it was given, or "
                            "None / a dict without 'latents' to leave them as they are."
                        )

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                    progress_bar.update()

        # 6. Decode
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if output_type == "pil":
                images = [PIL.Image.fromarray(image) for image in self.to_uint8(images)]
            elif output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

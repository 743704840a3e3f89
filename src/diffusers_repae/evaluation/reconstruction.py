"""VAE reconstruction metrics: PSNR, SSIM, LPIPS (VGG) and rFID, computed on uint8 reconstructions.

Reconstructions are quantised to uint8 exactly as saved images would be, so the numbers describe what a user sees.
LPIPS needs torchvision's ImageNet VGG16 weights, which cannot be downloaded here: with no local file the LPIPS
column is left out and the reason is reported (an LPIPS on a random backbone is never reported as a metric).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn
from tqdm.auto import tqdm

from ..weight_files import load_weights_into
from .features import _load_state_dict
from .generation import metric_names
from .metrics import frechet_distance_from_features, psnr, ssim


def load_lpips_vgg(vgg_weights_path: str | Path) -> nn.Module:
    """LPIPS (VGG variant, the package's bundled linear heads) on torchvision VGG16 weights from a local file.

    ``vgg_weights_path`` is torchvision's ``vgg16-397923af.pth`` (or a safetensors copy of that state dict).
    """
    import lpips
    from torchvision.models import vgg16

    expected = "torchvision's VGG16 ImageNet weights (vgg16-397923af.pth, or a safetensors copy)"
    vgg = vgg16()
    state = _load_state_dict(vgg_weights_path, "--lpips_vgg_weights", expected)
    load_weights_into(vgg, state, "--lpips_vgg_weights", vgg_weights_path, expected)
    # pnet_rand=True keeps lpips from downloading VGG; its slices index the same torchvision `features` modules.
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    for slice_ in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for index, module in slice_.named_children():
            module.load_state_dict(vgg.features[int(index)].state_dict())
    return model.requires_grad_(False).eval()


def decoded_to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """A VAE's decoded images in [-1, 1] -> uint8, rounded (the same tensor layout)."""
    return ((decoded.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, sample_posterior: bool = False) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> VAE encode/decode -> uint8 [N, 3, H, W] (inputs in [-1, 1], outputs rounded)."""
    x = images.to(vae.dtype) / 127.5 - 1
    posterior = vae.encode(x).latent_dist
    z = posterior.sample() if sample_posterior else posterior.mode()
    return decoded_to_uint8(vae.decode(z).sample)


@torch.no_grad()
def evaluate_reconstruction(
    vae: AutoencoderKL,
    batches: Iterable[np.ndarray],
    extractor: nn.Module | None = None,
    lpips_model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    total: int | None = None,
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and LPIPS over a dataset, plus rFID (Frechet distance originals vs reconstructions)."""
    vae = vae.to(device).eval()
    sums = {"PSNR": 0.0, "SSIM": 0.0, "LPIPS": 0.0}
    count = 0
    features: dict[str, list[np.ndarray]] = {"real": [], "fake": []}
    bar = tqdm(total=total, desc="reconstruct", unit="img")
    for batch in batches:
        images = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
        recon = reconstruct(vae, images)
        x, y = images.double() / 255, recon.double() / 255
        # Identical pairs have infinite PSNR; cap at 100 dB so one perfect image cannot make the mean infinite.
        sums["PSNR"] += float(psnr(x, y).clamp(max=100).sum())
        sums["SSIM"] += float(ssim(x, y).sum())
        if lpips_model is not None:
            lpips_model = lpips_model.to(device)
            sums["LPIPS"] += float(lpips_model(x.float(), y.float(), normalize=True).sum())
        if extractor is not None:
            features["real"].append(extractor.to(device)(images)["pool"].float().cpu().numpy())
            features["fake"].append(extractor(recon)["pool"].float().cpu().numpy())
        count += images.shape[0]
        bar.update(images.shape[0])
    bar.close()
    if count == 0:
        raise ValueError("no images to evaluate.")
    results = {name: value / count for name, value in sums.items() if name != "LPIPS" or lpips_model is not None}
    if extractor is not None:
        results["r" + metric_names(extractor.name)["fd"]] = frechet_distance_from_features(
            np.concatenate(features["real"]), np.concatenate(features["fake"])
        )
    return results

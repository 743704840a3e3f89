"""Per-channel latent statistics of a dataset under a VAE, and how they compare with the VAE config's.

Choice: statistics of *posterior samples* ``z = mean + std * n``. That is what REPA-E's latent BatchNorm sees
during training (the SiT is trained on sampled latents, SPEC sections 3 and 7) and so what its running
statistics, later exported as ``latents_mean/latents_std``, describe. ``use="mean"`` is offered for VAEs whose
posterior std is negligible; for those the two agree. The variance is the population variance over all
images and positions (BatchNorm's running_var uses the unbiased batch variance; at these counts the two are
equal to many digits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..models.vae import latent_stats as _config_stats


@dataclass
class LatentStats:
    """Per-channel ``mean`` and ``std`` ``[C]`` (float64) over ``count`` values per channel."""

    mean: torch.Tensor
    std: torch.Tensor
    count: int


class RunningChannelStats:
    """Streaming per-channel mean/variance (Chan et al.'s parallel update, float64) of ``[B, C, H, W]`` tensors."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # [C, B*H*W]
        n = x.shape[1]
        batch_mean = x.mean(dim=1)
        batch_m2 = ((x - batch_mean[:, None]) ** 2).sum(dim=1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean.cpu(), batch_m2.cpu()
            return
        total = self.count + n
        delta = batch_mean.cpu() - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2.cpu() + delta**2 * (self.count * n / total)
        self.count = total

    def result(self) -> LatentStats:
        if self.mean is None:
            raise ValueError("no latents were seen: the dataset is empty (or max_images is 0).")
        return LatentStats(self.mean.clone(), (self.m2 / self.count).sqrt(), self.count)


def encode_posterior(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[B, 3, H, W]`` -> posterior ``(mean, std)`` (images enter the VAE as ``x / 127.5 - 1``)."""
    if pixel_values.dtype != torch.uint8:
        raise ValueError(f"pixel_values must be uint8 images, got dtype {pixel_values.dtype}.")
    parameter = next(vae.parameters())
    x = pixel_values.to(device=parameter.device, dtype=parameter.dtype) / 127.5 - 1.0
    posterior = vae.encode(x).latent_dist  # diffusers clamps logvar to [-30, 20] like the original
    return posterior.mean, posterior.std


@torch.no_grad()
def dataset_latent_stats(
    vae,
    batches: Iterable[dict | torch.Tensor],
    use: str = "sample",
    generator: torch.Generator | None = None,
    max_images: int | None = None,
) -> LatentStats:
    """Per-channel statistics of a dataset's latents. ``batches`` yields uint8 ``[B, 3, H, W]`` tensors or dicts
    with ``pixel_values``; ``use`` is ``"sample"`` (posterior samples, the default, see the module docstring) or
    ``"mean"``."""
    if use not in ("sample", "mean"):
        raise ValueError(f"use must be 'sample' or 'mean', got {use!r}.")
    running = RunningChannelStats()
    seen = 0
    for batch in batches:
        pixels = batch["pixel_values"] if isinstance(batch, dict) else batch
        if max_images is not None:
            if seen >= max_images:
                break
            pixels = pixels[: max_images - seen]
        mean, std = encode_posterior(vae, pixels)
        if use == "sample":
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
            latents = mean + std * noise
        else:
            latents = mean
        running.update(latents.float())
        seen += pixels.shape[0]
    return running.result()


def config_latent_stats(vae, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics the VAE config implies: ``latents_mean/latents_std``, else shift_factor and
    ``1/scaling_factor`` (classic SD VAEs normalise with ``z * scaling_factor``), as float64 ``[C]``."""
    like = torch.zeros(1, channels, 1, 1, dtype=torch.float64)
    mean, std, scaling = _config_stats(vae, like)
    return mean.flatten(), std.flatten() / scaling


@dataclass
class StatsComparison:
    """Data statistics against config statistics, per channel, plus one summary distance."""

    data_mean: torch.Tensor
    data_std: torch.Tensor
    config_mean: torch.Tensor
    config_std: torch.Tensor
    mean_shift: torch.Tensor  # (data_mean - config_mean) / config_std: the normalised latents' mean
    std_ratio: torch.Tensor  # data_std / config_std: the normalised latents' std
    distance: float  # mean over channels of W2(N(mean_shift, std_ratio^2), N(0, 1))

    def table(self) -> str:
        """A plain-text table for the console."""
        header = (
            f"{'ch':>3} {'data mean':>10} {'data std':>10} {'cfg mean':>10} {'cfg std':>10} {'shift':>8} {'ratio':>8}"
        )
        rows = [header, "-" * len(header)]
        for c in range(self.data_mean.numel()):
            rows.append(
                f"{c:>3} {self.data_mean[c]:>10.4f} {self.data_std[c]:>10.4f} {self.config_mean[c]:>10.4f} "
                f"{self.config_std[c]:>10.4f} {self.mean_shift[c]:>8.3f} {self.std_ratio[c]:>8.3f}"
            )
        rows.append(f"summary distance (mean W2 of normalised latents to N(0,1)): {self.distance:.4f}")
        return "\n".join(rows)

    def recommendation(self, tolerance: float = 0.1) -> str:
        if self.distance <= tolerance:
            return f"The config statistics fit this data (distance {self.distance:.3f} <= {tolerance}): keep them."
        return (
            f"The config statistics do not fit this data (distance {self.distance:.3f} > {tolerance}): write the "
            "measured ones into the VAE config (--write DIR) before LDM training, or start REPA-E's latent "
            "BatchNorm from them."
        )


def compare_stats(data: LatentStats, config_mean: torch.Tensor, config_std: torch.Tensor) -> StatsComparison:
    """Per-channel shift and ratio, and the summary distance (0 when the config normalises the data to N(0, 1))."""
    config_mean, config_std = config_mean.to(torch.float64), config_std.to(torch.float64)
    shift = (data.mean - config_mean) / config_std
    ratio = data.std / config_std
    distance = float(torch.sqrt(shift**2 + (ratio - 1) ** 2).mean())
    return StatsComparison(data.mean, data.std, config_mean, config_std, shift, ratio, distance)


def plot_comparison(comparison: StatsComparison, path: str) -> None:
    """Bar charts of per-channel means and stds, data vs config, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels = comparison.data_mean.numel()
    xs = torch.arange(channels).numpy()
    width = 0.4
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.35 * channels + 3), 3.5))
    for ax, (title, data, cfg) in zip(
        axes,
        (
            ("per-channel mean", comparison.data_mean, comparison.config_mean),
            ("per-channel std", comparison.data_std, comparison.config_std),
        ),
    ):
        ax.bar(xs - width / 2, data.numpy(), width, label="data")
        ax.bar(xs + width / 2, cfg.numpy(), width, label="VAE config")
        ax.set_title(title)
        ax.set_xlabel("channel")
        ax.legend()
    fig.suptitle(f"latent statistics, summary distance {comparison.distance:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def with_latent_stats(vae, stats: LatentStats):
    """The VAE with ``latents_mean/latents_std`` set to ``stats`` and ``scaling_factor = 1.0`` (REPA-E form)."""
    if not all(math.isfinite(v) and v > 0 for v in stats.std.tolist()):
        raise ValueError(f"latent std must be positive and finite in every channel, got {stats.std.tolist()}.")
    vae.register_to_config(
        latents_mean=[float(v) for v in stats.mean], latents_std=[float(v) for v in stats.std], scaling_factor=1.0
    )
    return vae

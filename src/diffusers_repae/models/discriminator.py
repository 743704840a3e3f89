"""PatchGAN discriminator of the VAE's adversarial loss (SPEC section 6; the pix2pix / taming-transformers design)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PatchGANDiscriminator(ModelMixin, ConfigMixin):
    r"""
    Fully convolutional discriminator that scores overlapping patches, one logit per output pixel.

    Layout (``n_layers = 3``, ``ndf = 64``): Conv(4, s2) -> LeakyReLU, then ``n_layers - 1`` stride-2 and one
    stride-1 Conv(4, no bias) -> BatchNorm -> LeakyReLU(0.2) with ``ndf * min(2**n, 8)`` channels, then
    Conv(4, s1) to one channel. A 256 px image gives a 30 x 30 logit map; a 64 px image gives 6 x 6.
    Weights start as in the original: conv ``N(0, 0.02)``, BatchNorm weight ``N(1, 0.02)`` and bias 0.

    Args:
        in_channels (`int`, defaults to 3): Image channels.
        ndf (`int`, defaults to 64): Channels of the first convolution.
        n_layers (`int`, defaults to 3): Number of strided blocks.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """``N(0, 0.02)`` convolutions, ``N(1, 0.02)`` BatchNorm scales, zero BatchNorm shifts (as the original)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """``[batch, in_channels, H, W]`` images in [-1, 1] -> ``[batch, 1, H', W']`` patch logits."""
        return self.main(sample)

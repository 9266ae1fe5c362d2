"""Convolutional stacks shared by the families: image (28 or 64 px) ⇄ a small feature map.

28×28 works on a 7×7 base with two ×2 steps; 64×64 on a 4×4 base with four, as in DCGAN.
Channel widths double as resolution halves: width·2^(steps-1) at the base, width at the top.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

BASE = {28: 7, 64: 4}


def _widths(size: int, width: int) -> list[int]:
    steps = int(math.log2(size // BASE[size]))
    return [width * 2 ** (steps - 1 - i) for i in range(steps)]  # base → top, e.g. 28: [2w, w]


def feature_dim(size: int, width: int) -> int:
    return _widths(size, width)[0] * BASE[size] ** 2


def with_spectral_norm(module: nn.Module, enabled: bool) -> nn.Module:
    """The module with its weight divided by its largest singular value when enabled (Miyato et al.,
    2018, "Spectral Normalization for GANs"): a discriminator that is 1-Lipschitz per layer."""
    return _spectral_norm(module) if enabled else module


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's init (Radford et al., 2015): conv/linear weights N(0, 0.02), batch-norm
    scales N(1, 0.02). A spectrally normalised layer's stored weight is its `original` (writing to
    `.weight` would change a computed copy only)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        weight = (module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight")
                  else module.weight)
        nn.init.normal_(weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class UpStack(nn.Sequential):
    """latent vector → image logits, (N, latent) → (N, channels, size, size)."""

    def __init__(self, latent_dim: int, channels: int, width: int, size: int):
        widths = _widths(size, width)
        base = BASE[size]
        layers: list[nn.Module] = [
            nn.Linear(latent_dim, widths[0] * base * base, bias=False),
            nn.Unflatten(1, (widths[0], base, base)),  # state: widths[0] × base × base
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers.append(nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1))  # state: channels × size × size
        super().__init__(*layers)


class DownStack(nn.Sequential):
    """image → flat features, (N, channels, size, size) → (N, feature_dim(size, width)).
    spectral_norm: every conv spectrally normalised (a GAN discriminator's option)."""

    def __init__(self, channels: int, width: int, size: int, batchnorm: bool = True, spectral_norm: bool = False):
        widths = _widths(size, width)[::-1]  # top → base, e.g. 28: [w, 2w]
        first = with_spectral_norm(nn.Conv2d(channels, widths[0], 4, 2, 1), spectral_norm)
        layers: list[nn.Module] = [first, nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers.append(with_spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not batchnorm), spectral_norm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(nn.Flatten())  # state: widths[-1] · base · base
        super().__init__(*layers)


class UNetUp(nn.Module):
    """A U-Net's ×2 up step, joined with the encoder's features of that size (the inpainting and
    colorization U-Nets): (N, c_in, s, s), skip (N, c_out, 2s, 2s) -> (N, c_out, 2s, 2s)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                                nn.ReLU(True))
        self.merge = nn.Sequential(nn.Conv2d(2 * c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
                                   nn.ReLU(True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.up(x), skip], 1))

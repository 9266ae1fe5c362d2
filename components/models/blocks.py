"""Convolutional stacks shared by the families: image (28 or 64 px) ⇄ a small feature map.

28×28 works on a 7×7 base with two ×2 steps; 64×64 on a 4×4 base with four, as in DCGAN.
Channel widths double as resolution halves: width·2^(steps-1) at the base, width at the top.
"""
from __future__ import annotations

import math

from torch import nn

BASE = {28: 7, 64: 4}


def _widths(size: int, width: int) -> list[int]:
    steps = int(math.log2(size // BASE[size]))
    return [width * 2 ** (steps - 1 - i) for i in range(steps)]  # base → top, e.g. 28: [2w, w]


def feature_dim(size: int, width: int) -> int:
    return _widths(size, width)[0] * BASE[size] ** 2


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
    """image → flat features, (N, channels, size, size) → (N, feature_dim(size, width))."""

    def __init__(self, channels: int, width: int, size: int, batchnorm: bool = True):
        widths = _widths(size, width)[::-1]  # top → base, e.g. 28: [w, 2w]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(nn.Flatten())  # state: widths[-1] · base · base
        super().__init__(*layers)

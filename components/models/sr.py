"""4x super-resolution: SRResNet, a residual generator trained for MSE (Ledig et al., 2017, "Photo-
Realistic Single Image Super-Resolution Using a GAN", the generator without its GAN).

The degradation is documented and fixed: a bicubic downscale by `scale` with antialiasing (what
PIL and MATLAB's imresize do), e.g. 28 -> 7 and 64 -> 16. The generator predicts the residual over
bicubic upscaling of its input (global residual learning, Kim et al., 2016, VDSR), so it starts at
the bicubic baseline and learns what bicubic misses.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, StepOutput, TranslationModel, adam


class SRConfig(TrainConfig):
    scale: int = Field(ge=2)  # the input is image_size / scale pixels a side
    width: int = Field(gt=0)  # channels of the residual trunk
    blocks: int = Field(gt=0)  # residual blocks

    @model_validator(mode="after")
    def _scale_divides_size(self) -> "SRConfig":
        if self.image_size % self.scale or (self.scale & (self.scale - 1)):
            raise ValueError(f"scale: {self.scale} must be a power of two dividing image_size {self.image_size}")
        return self


def downscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The degradation: bicubic with antialiasing, (N, C, H, W) -> (N, C, H/scale, W/scale), in [-1, 1]."""
    return F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def upscale_bicubic(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline: bicubic upscaling, (N, C, h, w) -> (N, C, h·scale, w·scale), in [-1, 1]."""
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


class ResidualBlock(nn.Module):
    """conv-BN-PReLU-conv-BN plus the input, as in SRResNet."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width),
                                  nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRGenerator(nn.Module):
    """(N, C, h, w) low-resolution in [-1, 1] -> (N, C, h·scale, w·scale) in [-1, 1]."""

    def __init__(self, channels: int, width: int, blocks: int, scale: int):
        super().__init__()
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), nn.PReLU(width))  # state: width × h × w
        self.trunk = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)],
                                   nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        ups: list[nn.Module] = []
        for _ in range(scale.bit_length() - 1):  # ×2 per step by sub-pixel convolution (Shi et al., 2016)
            ups += [nn.Conv2d(width, 4 * width, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(width)]
        self.up = nn.Sequential(*ups)  # state: width × h·scale × w·scale
        self.tail = nn.Conv2d(width, channels, 3, 1, 1)
        nn.init.zeros_(self.tail.weight)  # the residual starts at 0: the untrained model is bicubic
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        residual = self.tail(self.up(features + self.trunk(features)))
        return (upscale_bicubic(x, self.scale) + residual).clamp(-1, 1)


class SRResNet(TranslationModel):
    ema_modules = ("generator",)

    def __init__(self, cfg: SRConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size = cfg, channels, cfg.image_size
        self.latent_dim = 0
        self.generator = SRGenerator(channels, cfg.width, cfg.blocks, cfg.scale)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": adam(self.generator.parameters(), self.cfg.lr)}

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        loss = F.mse_loss(self.generator(downscale(x, self.cfg.scale)), x)
        yield "generator", StepOutput(loss, {"loss_mse": loss})

    def degrade(self, x, generator=None):
        return {"images": downscale(x, self.cfg.scale)}

    @torch.no_grad()
    def translate(self, inputs):
        return self.generator(inputs["images"])

    def baselines(self, inputs):
        return {"bicubic": upscale_bicubic(inputs["images"], self.cfg.scale)}


def input_shape(cfg: SRConfig, channels: int) -> tuple[int, int, int]:
    side = cfg.image_size // cfg.scale
    return channels, side, side


FAMILIES.register("srresnet")(Family("srresnet", SRConfig, lambda cfg, channels, classes: SRResNet(cfg, channels),
                                     kind="translate", input_shape=input_shape))

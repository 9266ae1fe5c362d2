"""4x super-resolution (Ledig et al., 2017, "Photo-Realistic Single Image Super-Resolution Using a
Generative Adversarial Network"): `srresnet`, the residual generator trained for MSE, and `srgan`, the
same generator trained with a content loss (pixel MSE + a perceptual MSE on features) and an
adversarial loss against a discriminator of full-size images.

The paper's perceptual loss compares VGG19 features; VGG weights cannot be downloaded here, so srgan
compares the features of the pipeline's own evaluator classifier (components.evaluation.classifier),
handed to the model with `set_evaluator` before training and never saved with it.

The degradation is documented and fixed: a bicubic downscale by `scale` with antialiasing (what
PIL and MATLAB's imresize do), e.g. 28 -> 7 and 64 -> 16. The generator predicts the residual over
bicubic upscaling of its input (global residual learning, Kim et al., 2016, VDSR), so it starts at
the bicubic baseline and learns what bicubic misses.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components.config import TrainConfig
from components.evaluation.classifier import INPUT_SIZE, Classifier
from components.images import resize
from components.models.base import FAMILIES, Family, StepOutput, TranslationModel, adam
from components.models.blocks import DownStack, dcgan_init, feature_dim


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

    def degradation(self):
        return {"downscale": "bicubic, antialiased", "scale": self.cfg.scale, "image_size": self.image_size}


def input_shape(cfg: SRConfig, channels: int) -> tuple[int, int, int]:
    side = cfg.image_size // cfg.scale
    return channels, side, side


FAMILIES.register("srresnet")(Family("srresnet", SRConfig, lambda cfg, channels, classes: SRResNet(cfg, channels),
                                     kind="translate", input_shape=input_shape))


class SRGANConfig(SRConfig):
    ndf: int = Field(gt=0)  # the discriminator's width
    beta1: float = Field(ge=0, lt=1)  # Adam's first-moment decay, both players (the paper: 0.9)
    perceptual_weight: float = Field(ge=0)  # λ_perc: the evaluator-feature MSE beside the pixel MSE
    adversarial_weight: float = Field(ge=0)  # λ_adv: the paper's 1e-3
    warmup_steps: int = Field(ge=0)  # generator steps on pixel MSE alone (the paper's SRResNet init), then the GAN


class SRGAN(SRResNet):
    """SRResNet's generator against a discriminator (a DCGAN-style conv net on full-size images, logits
    (N, 1)), after `warmup_steps` of pixel MSE alone. Per batch one D step, then one G step on
    pixel MSE + λ_perc · feature MSE + λ_adv · the non-saturating adversarial loss."""

    def __init__(self, cfg: SRGANConfig, channels: int):
        super().__init__(cfg, channels)
        self.discriminator = nn.Sequential(
            DownStack(channels, cfg.ndf, cfg.image_size),
            nn.Linear(feature_dim(cfg.image_size, cfg.ndf), 1),
        )  # logits, (N, 1)
        self.discriminator.apply(dcgan_init)
        self.steps_done = 0  # training_losses calls: in the state dict as extra state (no host sync to read it)
        # Kept out of the module tree: not a submodule, so it is in no state_dict, EMA or checkpoint,
        # and .to() leaves it where it is (it follows the images when used).
        self.__dict__["_evaluator"] = None

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.steps_done)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.steps_done = int(state)

    def set_evaluator(self, classifier: Classifier) -> None:
        """The classifier whose features the perceptual loss compares: a frozen copy, never saved."""
        # the input layer of either arch (the CNN's first convolution, the ViT's patch embedding)
        takes = next(m for m in classifier.modules() if isinstance(m, nn.Conv2d)).in_channels
        if takes != self.channels:
            raise ValueError(f"srgan: the evaluator classifier takes {takes}-channel "
                             f"images, the model makes {self.channels}-channel ones; retrain the classifier "
                             f"on this data (genpipe classifier)")
        self.__dict__["_evaluator"] = copy.deepcopy(classifier).eval().requires_grad_(False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluator's features of images in [-1, 1], (N, C, H, W) -> (N, FEATURES), as FID takes them."""
        evaluator = self._evaluator
        if next(evaluator.parameters()).device != x.device:
            evaluator.to(x.device)
        return evaluator.features(resize(x, INPUT_SIZE))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, 0.999)
        return {"discriminator": adam(self.discriminator.parameters(), self.cfg.lr, betas),
                "generator": adam(self.generator.parameters(), self.cfg.lr, betas)}

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        if self._evaluator is None:
            raise ValueError("srgan: no evaluator classifier for the perceptual loss; call "
                             "model.set_evaluator(classifier) before training (the train stage loads it "
                             "from --classifier artifacts/classifier)")
        cfg = self.cfg
        warming_up = self.steps_done < cfg.warmup_steps
        self.steps_done += 1
        fake = self.generator(downscale(x, cfg.scale))  # (N, C, H, W)
        pixel = F.mse_loss(fake, x)
        if warming_up:
            yield "generator", StepOutput(pixel, {"loss_mse": pixel})
            return

        n = x.shape[0]
        ones, zeros = torch.ones(n, 1, device=x.device), torch.zeros(n, 1, device=x.device)
        # D: real full-size images against the generator's, the fakes detached.
        d_real = self.discriminator(x)
        d_fake = self.discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        yield "discriminator", StepOutput(loss_d, {"loss_d": loss_d, "d_real": torch.sigmoid(d_real).mean()})

        # G: content (pixels + evaluator features) plus the non-saturating adversarial loss.
        with torch.no_grad():
            target = self._features(x)  # (N, FEATURES)
        perceptual = F.mse_loss(self._features(fake), target)
        adversarial = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        loss_g = pixel + cfg.perceptual_weight * perceptual + cfg.adversarial_weight * adversarial
        yield "generator", StepOutput(loss_g, {"loss_g": loss_g, "loss_mse": pixel, "loss_perceptual": perceptual,
                                               "loss_adversarial": adversarial,
                                               "d_fake": torch.sigmoid(d_fake).mean()})


FAMILIES.register("srgan")(Family("srgan", SRGANConfig, lambda cfg, channels, classes: SRGAN(cfg, channels),
                                  kind="translate", input_shape=input_shape, uses_evaluator=True))

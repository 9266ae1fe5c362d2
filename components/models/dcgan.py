"""DCGAN (Radford et al., 2015): the two-player game, per batch one D step then one G step."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.blocks import DownStack, UpStack, dcgan_init, feature_dim, with_spectral_norm


class DCGANConfig(TrainConfig):
    latent_dim: int = Field(gt=0)
    ngf: int = Field(gt=0)
    ndf: int = Field(gt=0)
    beta1: float = Field(ge=0, lt=1)
    spectral_norm: bool  # D's layers spectrally normalised, and then without batch norm (as in SN-GAN)


class DCGAN(GenerativeModel):
    ema_modules = ("generator",)

    def __init__(self, cfg: DCGANConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, channels, cfg.image_size, cfg.latent_dim
        self.generator = nn.Sequential(UpStack(cfg.latent_dim, channels, cfg.ngf, cfg.image_size), nn.Tanh())
        sn = cfg.spectral_norm
        self.discriminator = nn.Sequential(
            DownStack(channels, cfg.ndf, cfg.image_size, batchnorm=not sn, spectral_norm=sn),
            with_spectral_norm(nn.Linear(feature_dim(cfg.image_size, cfg.ndf), 1), sn),
        )  # logits, (N, 1)
        self.apply(dcgan_init)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, 0.999)
        return {
            "discriminator": adam(self.discriminator.parameters(), self.cfg.lr, betas),
            "generator": adam(self.generator.parameters(), self.cfg.lr, betas),
        }

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        n = x.shape[0]
        fake = self.generator(torch.randn(n, self.latent_dim, device=x.device, generator=generator))
        ones, zeros = torch.ones(n, 1, device=x.device), torch.zeros(n, 1, device=x.device)

        # D: maximise log D(x) + log(1 - D(G(z))); fakes detached so G gets no gradient here.
        d_real = self.discriminator(x)
        d_fake = self.discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        yield "discriminator", StepOutput(loss_d, {"loss_d": loss_d, "d_real": torch.sigmoid(d_real).mean()})

        # G: the non-saturating loss, maximise log D(G(z)) against the just-updated D.
        loss_g = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        yield "generator", StepOutput(loss_g, {"loss_g": loss_g, "d_fake": torch.sigmoid(d_fake).mean()})

    @torch.no_grad()
    def from_noise(self, z, labels=None, prompts=None):
        return self.generator(z)  # (n, C, size, size) in [-1, 1]


FAMILIES.register("dcgan")(Family("dcgan", DCGANConfig, lambda cfg, channels, classes: DCGAN(cfg, channels)))

"""Convolutional autoencoder (Hinton & Salakhutdinov, 2006), optionally denoising (Vincent et al., 2008).

Not a sampler: its latent space has no prior to draw from (the lecture's "clustered, discontinuous
latent space"), so it is registered to encode and reconstruct images, not to generate them.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.blocks import DownStack, UpStack, feature_dim


class AEConfig(TrainConfig):
    latent_dim: int = Field(gt=0)
    width: int = Field(gt=0)
    denoise_std: float = Field(ge=0)  # 0: plain autoencoder; > 0: Gaussian noise of this std on the [-1, 1] input


class Autoencoder(GenerativeModel):
    ema_modules = ("encoder", "decoder")

    def __init__(self, cfg: AEConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, channels, cfg.image_size, cfg.latent_dim
        self.encoder = nn.Sequential(
            DownStack(channels, cfg.width, cfg.image_size, batchnorm=False),
            nn.Linear(feature_dim(cfg.image_size, cfg.width), cfg.latent_dim),
        )  # (N, latent)
        self.decoder = UpStack(cfg.latent_dim, channels, cfg.width, cfg.image_size)  # Bernoulli logits

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"ae": adam(self.parameters(), self.cfg.lr)}

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        inputs = x
        if self.cfg.denoise_std > 0:  # denoising: corrupt the input, reconstruct the clean image
            inputs = x + self.cfg.denoise_std * torch.randn(x.shape, device=x.device, dtype=x.dtype,
                                                            generator=generator)
        logits = self.decoder(self.encoder(inputs))
        # The VAE's likelihood (Bernoulli pixels, BCE summed per image) rather than MSE: the same
        # reconstruction term as vae/cvae, so recon_mse compares their bottlenecks, not their losses,
        # and mostly-black Fashion-MNIST backgrounds get sharp gradients near 0 instead of vanishing ones.
        target = (x + 1) / 2  # (N, C, H, W) in [0, 1]
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / x.shape[0]
        yield "ae", StepOutput(loss, {"loss": loss})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) → latent codes (N, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent codes (N, latent_dim) → images in [-1, 1] (N, C, H, W)."""
        return torch.sigmoid(self.decoder(z)) * 2 - 1

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def sample(self, n, generator=None, labels=None, prompts=None):
        raise TypeError(f"the {self.cfg.family!r} family is an autoencoder, not a sampler: its latent space has "
                        f"no prior to draw from; use reconstruct(images), or encode(images) and decode(codes)")


FAMILIES.register("ae")(Family("ae", AEConfig, lambda cfg, channels, classes: Autoencoder(cfg, channels),
                               kind="reconstruct"))

"""Convolutional VAE (Kingma & Welling, 2013) with a β weight on the KL term (Higgins et al., 2017)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.blocks import DownStack, UpStack, feature_dim


class VAEConfig(TrainConfig):
    latent_dim: int = Field(gt=0)
    width: int = Field(gt=0)
    beta: float = Field(ge=0)


def elbo_loss(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, decode, beta: float,
              generator: torch.Generator | None) -> StepOutput:
    """The negative ELBO per image with β on the KL term: Bernoulli reconstruction of x in [-1, 1]
    from z = mu + σ·ε, `decode(z)` giving pixel logits. Computed in fp32 even under bf16 autocast:
    exp(logvar) and the summed terms lose too much in bf16."""
    mu, logvar = mu.float(), logvar.float()
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation trick
    logits = decode(z).float()
    target = (x.float() + 1) / 2  # pixels as Bernoulli probabilities in [0, 1]
    n = x.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n
    # KL(q(z|x) || N(0, I)) in closed form, Appendix B of Kingma & Welling.
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
    loss = recon + beta * kld
    return StepOutput(loss, {"loss": loss, "recon": recon, "kl": kld})


class VAE(GenerativeModel):
    ema_modules = ("encoder", "decoder")
    gaussian_prior = True  # z ~ N(0, I) decodes to an image: latent traversals apply
    likelihood = "bernoulli"  # p(x|z) of the ELBO its training step logs as recon + kl (the elbo metric)

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, channels, cfg.image_size, cfg.latent_dim
        self.encoder = nn.Sequential(
            DownStack(channels, cfg.width, cfg.image_size, batchnorm=False),
            nn.Linear(feature_dim(cfg.image_size, cfg.width), 2 * cfg.latent_dim),
        )  # (N, 2·latent): mean and log-variance
        self.decoder = UpStack(cfg.latent_dim, channels, cfg.width, cfg.image_size)  # Bernoulli logits

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": adam(self.parameters(), self.cfg.lr)}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        mu, logvar = self.encode(x)
        yield "vae", elbo_loss(x, mu, logvar, self.decoder, self.cfg.beta, generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent codes (N, latent) → images in [-1, 1] (N, C, H, W)."""
        return torch.sigmoid(self.decoder(z)) * 2 - 1

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decoder(mu)) * 2 - 1

    @torch.no_grad()
    def from_noise(self, z, labels=None, prompts=None):
        return torch.sigmoid(self.decoder(z)) * 2 - 1  # (n, C, size, size) in [-1, 1]


FAMILIES.register("vae")(Family("vae", VAEConfig, lambda cfg, channels, classes: VAE(cfg, channels)))

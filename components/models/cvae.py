"""Class-conditional VAE (Sohn, Lee & Yan, 2015): encoder and decoder both see the one-hot label,
so the latent code holds what the class does not say (pose, thickness, texture) and a class is
drawn by choosing its label. β weights the KL term as in vae.py (Higgins et al., 2017)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.blocks import DownStack, UpStack, feature_dim
from components.models.vae import elbo_loss


class CVAEConfig(TrainConfig):
    latent_dim: int = Field(gt=0)
    width: int = Field(gt=0)
    beta: float = Field(ge=0)


class ConditionalEncoder(nn.Module):
    """(image, one-hot label) → mean and log-variance of q(z | x, y), each (N, latent)."""

    def __init__(self, channels: int, width: int, size: int, num_classes: int, latent_dim: int):
        super().__init__()
        self.features = DownStack(channels, width, size, batchnorm=False)  # (N, feature_dim)
        self.head = nn.Linear(feature_dim(size, width) + num_classes, 2 * latent_dim)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(torch.cat([self.features(x), onehot], dim=1)).chunk(2, dim=1)
        return mu, logvar


class CVAE(GenerativeModel):
    conditional = True
    gaussian_prior = True  # z ~ N(0, I) decodes to an image (with a label): latent traversals apply
    likelihood = "bernoulli"  # p(x|z) of the ELBO its training step logs as recon + kl (the elbo metric)
    ema_modules = ("encoder", "decoder")

    def __init__(self, cfg: CVAEConfig, channels: int, classes: list[str]):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, channels, cfg.image_size, cfg.latent_dim
        self.classes, self.num_classes = list(classes), len(classes)
        self.encoder = ConditionalEncoder(channels, cfg.width, cfg.image_size, self.num_classes, cfg.latent_dim)
        self.decoder = UpStack(cfg.latent_dim + self.num_classes, channels, cfg.width, cfg.image_size)  # logits

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"cvae": adam(self.parameters(), self.cfg.lr)}

    def _onehot(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels, self.num_classes).float()  # (N, num_classes)

    def encode(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (N, C, H, W) and their class ids (N,) → mean and log-variance, each (N, latent)."""
        return self.encoder(x, self._onehot(self.check_labels(labels, x.shape[0])))

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Latent codes (N, latent) and class ids (N,) → images in [-1, 1] (N, C, H, W)."""
        onehot = self._onehot(self.check_labels(labels, z.shape[0]))
        return torch.sigmoid(self.decoder(torch.cat([z, onehot], dim=1))) * 2 - 1

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        onehot = self._onehot(y)
        mu, logvar = self.encoder(x, onehot)
        # KL(q(z|x,y) || N(0, I)): the prior does not depend on y here, as in Sohn et al.'s baseline CVAE.
        decode = lambda z: self.decoder(torch.cat([z, onehot.to(z.dtype)], dim=1))  # noqa: E731
        yield "cvae", elbo_loss(x, mu, logvar, decode, self.cfg.beta, generator)

    # No `reconstruct`: it would need each image's label, which the recon_mse metric does not pass.

    @torch.no_grad()
    def from_noise(self, z, labels=None, prompts=None):
        if prompts is not None:
            raise ValueError(f"prompts: the {self.cfg.family!r} family is conditioned on class ids only; "
                             f"pass labels in 0..{self.num_classes - 1} instead")
        labels = self.check_labels(labels, z.shape[0])
        return self.decode(z, labels)  # (n, C, size, size) in [-1, 1]


FAMILIES.register("cvae")(Family("cvae", CVAEConfig, lambda cfg, channels, classes: CVAE(cfg, channels, classes),
                                 kind="generate", conditions=("labels",)))

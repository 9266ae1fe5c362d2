"""KL-regularised autoencoder with a spatial latent: the first stage of latent diffusion (Rombach et
al., 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1), small.

A 28×28 image becomes a (latent_channels, 7, 7) grid (64×64: 8×8) of Gaussian posteriors; the
loss is the VAE's (vae.elbo_loss: Bernoulli pixels, BCE summed per image) with a small weight on
the KL term, which only keeps the latents' scale in check (Rombach's "KL-reg"): the grid keeps
the image's layout, so a diffusion model's UNet can work on it (the `ldm` family).

No batch norm or dropout: train and eval outputs are the same, so the frozen autoencoder inside an
ldm encodes alike whatever mode it is in (the ldm keeps it in eval mode). Not a sampler: its latent
grid has no prior to draw from.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from pydantic import Field
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.vae import elbo_loss

DOWNSAMPLES = {28: 2, 64: 3}  # ×2 steps from the image to the latent grid: 28 → 7, 64 → 8


class KLAEConfig(TrainConfig):
    latent_channels: int = Field(gt=0)
    width: int = Field(gt=0)  # channels at full resolution; doubled at each ×2 step down
    kl_weight: float = Field(ge=0)


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.SiLU()]


class Encoder(nn.Sequential):
    """(N, channels, size, size) → mean and log-variance stacked, (N, 2·latent_channels, s, s)."""

    def __init__(self, channels: int, width: int, latent_channels: int, steps: int):
        widths = [width * 2 ** i for i in range(steps)]  # e.g. 28: [w, 2w]
        layers = _conv(channels, width)  # state: w × size × size
        for c_in, c_out in zip([width] + widths, widths):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.SiLU(), *_conv(c_out, c_out)]  # state: c_out × size/2
        layers.append(nn.Conv2d(widths[-1], 2 * latent_channels, 3, 1, 1))  # state: 2·latent × s × s
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """(N, latent_channels, s, s) → Bernoulli logits (N, channels, size, size)."""

    def __init__(self, channels: int, width: int, latent_channels: int, steps: int):
        widths = [width * 2 ** i for i in range(steps)][::-1]  # e.g. 28: [2w, w]
        layers = _conv(latent_channels, widths[0]) + _conv(widths[0], widths[0])  # state: 2w × s × s
        for c_in, c_out in zip(widths, widths[1:] + [width]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.SiLU(), *_conv(c_out, c_out)]  # state: c_out × 2s
        layers.append(nn.Conv2d(width, channels, 3, 1, 1))  # state: channels × size × size
        super().__init__(*layers)


class KLAutoencoder(GenerativeModel):
    ema_modules = ("encoder", "decoder")
    likelihood = "bernoulli"  # its training step logs recon + kl: the elbo metric applies

    def __init__(self, cfg: KLAEConfig, channels: int):
        super().__init__()
        if cfg.image_size not in DOWNSAMPLES:
            raise ValueError(f"image_size: the kl_ae family maps {' or '.join(map(str, DOWNSAMPLES))} px images "
                             f"to a latent grid, got {cfg.image_size}; set image_size to one of those")
        steps = DOWNSAMPLES[cfg.image_size]
        self.cfg, self.channels, self.image_size = cfg, channels, cfg.image_size
        side = cfg.image_size // 2 ** steps
        self.latent_shape = (cfg.latent_channels, side, side)
        self.latent_dim = math.prod(self.latent_shape)
        self.encoder = Encoder(channels, cfg.width, cfg.latent_channels, steps)
        self.decoder = Decoder(channels, cfg.width, cfg.latent_channels, steps)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"kl_ae": adam(self.parameters(), self.cfg.lr)}

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (N, C, H, W) → the posterior's mean and log-variance, each (N, *latent_shape)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as Rombach et al.: exp(logvar) stays finite

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        mean, logvar = self.posterior(x)
        yield "kl_ae", elbo_loss(x, mean, logvar, self.decoder, self.cfg.kl_weight, generator)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) → posterior means, flat (N, latent_dim)."""
        return self.posterior(x)[0].flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, latent_dim) or (N, *latent_shape) → images in [-1, 1] (N, C, H, W)."""
        return torch.sigmoid(self.decoder(z.reshape(-1, *self.latent_shape))) * 2 - 1

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.posterior(x)[0])

    def sample(self, n, generator=None, labels=None, prompts=None):
        raise TypeError(f"the {self.cfg.family!r} family is an autoencoder, not a sampler: its latent grid has no "
                        f"prior to draw from; use reconstruct(images), encode/decode, or train an ldm on it")


FAMILIES.register("kl_ae")(Family("kl_ae", KLAEConfig, lambda cfg, channels, classes: KLAutoencoder(cfg, channels),
                                  kind="reconstruct", spatial_latent=True))

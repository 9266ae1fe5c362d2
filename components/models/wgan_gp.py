"""WGAN-GP (Gulrajani et al., 2017, "Improved Training of Wasserstein GANs"): a critic estimating
the Wasserstein-1 distance, kept 1-Lipschitz by a penalty on its gradient norm at points between
real and fake images; n_critic critic updates per generator update, Adam with β1 = 0, β2 = 0.9
(the paper's Algorithm 1; params.yaml holds the values).

The critic has no batch norm: the penalty is on the gradient with respect to each input alone,
which batch norm would make depend on the rest of the batch (the paper's §4).

How a training step uses its batch: the batch_size real images are split into n_critic
sub-batches of m = batch_size / n_critic; critic step i sees sub-batch i against m fakes from fresh
noise, and the generator step draws m fresh fakes. So every real image meets the critic once per
epoch, as in Algorithm 1's fresh sample per critic iteration, and a step costs about one batch of
critic work rather than n_critic batches.
"""
from __future__ import annotations

from typing import Iterator

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.blocks import DownStack, UpStack, dcgan_init, feature_dim, with_spectral_norm


class WGANGPConfig(TrainConfig):
    latent_dim: int = Field(gt=0)
    ngf: int = Field(gt=0)
    ndf: int = Field(gt=0)
    n_critic: int = Field(gt=0)       # critic updates per generator update
    gp_lambda: float = Field(ge=0)    # weight of the gradient penalty (the paper: 10)
    beta1: float = Field(ge=0, lt=1)  # Adam's betas (the paper: 0.0 and 0.9)
    beta2: float = Field(ge=0, lt=1)
    spectral_norm: bool               # the critic's layers spectrally normalised as well

    @field_validator("n_critic")
    @classmethod
    def _divides_batch(cls, n_critic: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % n_critic:
            raise ValueError(f"must divide batch_size ({batch}): each critic step takes batch_size / n_critic "
                             f"real images; set batch_size to a multiple of n_critic")
        return n_critic


class WGANGP(GenerativeModel):
    ema_modules = ("generator",)
    allreduce_modules = ("critic",)  # the penalty's autograd.grad(create_graph=True) is not DDP-safe

    def __init__(self, cfg: WGANGPConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, channels, cfg.image_size, cfg.latent_dim
        self.generator = nn.Sequential(UpStack(cfg.latent_dim, channels, cfg.ngf, cfg.image_size), nn.Tanh())
        self.critic = nn.Sequential(
            DownStack(channels, cfg.ndf, cfg.image_size, batchnorm=False, spectral_norm=cfg.spectral_norm),
            with_spectral_norm(nn.Linear(feature_dim(cfg.image_size, cfg.ndf), 1), cfg.spectral_norm),
        )  # scores, (N, 1): unbounded, not probabilities
        self.apply(dcgan_init)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        return {
            "critic": adam(self.critic.parameters(), self.cfg.lr, betas),
            "generator": adam(self.generator.parameters(), self.cfg.lr, betas),
        }

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor,
                         generator: torch.Generator | None) -> torch.Tensor:
        """E[(‖∇D(x̂)‖₂ − 1)²], x̂ uniform on lines between real and fake images (the paper's eq. 3)."""
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator)
        between = (eps * real + (1 - eps) * fake).requires_grad_(True)  # (m, C, H, W)
        # Eager even when the trainer compiled the critic (Module.compile wraps __call__, not forward):
        # compiled graphs cannot be differentiated twice, which the penalty's backward does.
        grad, = torch.autograd.grad(self.critic.forward(between).sum(), between, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        if x.shape[0] < self.cfg.n_critic:
            raise ValueError(f"a batch of {x.shape[0]} images cannot feed n_critic={self.cfg.n_critic} critic steps; "
                             f"raise batch_size")
        chunks = x.tensor_split(self.cfg.n_critic)  # n_critic × (m, C, H, W)
        m = chunks[0].shape[0]
        for i, real in enumerate(chunks):
            z = torch.randn(real.shape[0], self.latent_dim, device=x.device, generator=generator)
            with torch.no_grad():  # the critic's step needs no graph through G
                fake = self.generator(z)
            d_real, d_fake = self.critic(real).mean(), self.critic(fake).mean()
            gp = self.gradient_penalty(real, fake, generator)
            loss_c = d_fake - d_real + self.cfg.gp_lambda * gp
            # Log the last critic step only: the values of one step, however a trainer sums the logs.
            logs = {"loss_c": loss_c, "wasserstein": d_real - d_fake, "gp": gp} if i == len(chunks) - 1 else {}
            yield "critic", StepOutput(loss_c, logs)

        fake = self.generator(torch.randn(m, self.latent_dim, device=x.device, generator=generator))
        loss_g = -self.critic(fake).mean()
        yield "generator", StepOutput(loss_g, {"loss_g": loss_g})

    @torch.no_grad()
    def from_noise(self, z, labels=None, prompts=None):
        return self.generator(z)  # (n, C, size, size) in [-1, 1]


FAMILIES.register("wgan_gp")(Family("wgan_gp", WGANGPConfig, lambda cfg, channels, classes: WGANGP(cfg, channels)))

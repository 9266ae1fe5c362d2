"""Class-conditional GAN with text prompts: the generator draws from [z, text embedding of a
caption], the discriminator is a projection discriminator (Miyato & Koyama, 2018, "cGANs with
Projection Discriminator"): D(x, y) = ψ(φ(x)) + embed(y)·φ(x).

Why projection rather than an auxiliary classifier (AC-GAN, Odena et al., 2017): AC-GAN adds a
classification loss to both players, which rewards easily classified samples over diverse ones
(its samples collapse towards class prototypes) and, with many classes, fights the adversarial
loss; projection keeps a single adversarial objective in which the class only enters D's score.

Loss: hinge (Lim & Ye, 2017, "Geometric GAN"; as used by Miyato & Koyama): D minimises
E[relu(1 − D(x, y))] + E[relu(1 + D(G(z, t), y))], G minimises −E[D(G(z, t), y)].

Text: each training image gets one caption of its class drawn at random (components.models.text);
the text encoder is trained jointly with the generator through G's loss, while D sees the class id
(the caption's class). A request by label uses its class's canonical caption (the class name); a
prompt is encoded as written, after checking that it names exactly one class.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.blocks import DownStack, UpStack, dcgan_init, feature_dim, with_spectral_norm
from components.models.text import TextEncoder, Vocabulary


class CGANConfig(TrainConfig):
    latent_dim: int = Field(gt=0)
    ngf: int = Field(gt=0)
    ndf: int = Field(gt=0)
    beta1: float = Field(ge=0, lt=1)
    spectral_norm: bool  # D's layers spectrally normalised, and then without batch norm (as in SN-GAN)
    text_dim: int = Field(gt=0)  # width of the word embeddings and of the caption embedding fed to G


class ProjectionDiscriminator(nn.Module):
    """(images (N, C, H, W), class ids (N,)) → scores (N,)."""

    def __init__(self, channels: int, ndf: int, size: int, num_classes: int, spectral_norm: bool):
        super().__init__()
        self.features = DownStack(channels, ndf, size, batchnorm=not spectral_norm, spectral_norm=spectral_norm)
        dim = feature_dim(size, ndf)
        self.score = with_spectral_norm(nn.Linear(dim, 1), spectral_norm)  # ψ
        self.embed = with_spectral_norm(nn.Embedding(num_classes, dim), spectral_norm)  # the class projection

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (N, F)
        return self.score(h).squeeze(1) + (self.embed(y) * h).sum(1)  # (N,)


class CGAN(GenerativeModel):
    conditional = True
    ema_modules = ("generator", "text_encoder")  # what the sampler runs

    def __init__(self, cfg: CGANConfig, channels: int, classes: list[str]):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, channels, cfg.image_size, cfg.latent_dim
        self.classes, self.num_classes = list(classes), len(classes)
        self.vocab = Vocabulary(self.classes)
        self.text_encoder = TextEncoder(self.vocab, cfg.text_dim)  # (N, L) tokens → (N, text_dim)
        self.generator = nn.Sequential(
            UpStack(cfg.latent_dim + cfg.text_dim, channels, cfg.ngf, cfg.image_size), nn.Tanh()
        )  # [z, t] (N, latent + text_dim) → (N, C, size, size)
        self.discriminator = ProjectionDiscriminator(channels, cfg.ndf, cfg.image_size, self.num_classes,
                                                     cfg.spectral_norm)
        self.generator.apply(dcgan_init)
        self.discriminator.apply(dcgan_init)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, 0.999)
        return {
            "discriminator": adam(self.discriminator.parameters(), self.cfg.lr, betas),
            "generator": adam([*self.generator.parameters(), *self.text_encoder.parameters()], self.cfg.lr, betas),
        }

    def generate(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Noise (N, latent) and caption tokens (N, L) → images (N, C, size, size) in [-1, 1]."""
        return self.generator(torch.cat([z, self.text_encoder(tokens)], dim=1))

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        n = x.shape[0]
        tokens = self.text_encoder.random_captions(y, generator)  # one caption of its class per image
        z = torch.randn(n, self.latent_dim, device=x.device, generator=generator)
        fake = self.generate(z, tokens)

        # D: hinge loss on real (x, y) and fake (G(z, t), y); fakes detached so G gets no gradient here.
        d_real = self.discriminator(x, y)
        d_fake = self.discriminator(fake.detach(), y)
        loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        yield "discriminator", StepOutput(loss_d, {"loss_d": loss_d, "d_real": d_real.mean(), "d_fake": d_fake.mean()})

        # G (and the text encoder): raise the just-updated D's score of the fakes for their class.
        loss_g = -self.discriminator(fake, y).mean()
        yield "generator", StepOutput(loss_g, {"loss_g": loss_g})

    @torch.no_grad()
    def from_noise(self, z, labels=None, prompts=None):
        if prompts is not None and labels is not None:
            raise ValueError("labels, prompts: pass one of them, not both")
        if prompts is not None:
            tokens = self.vocab.prompt_tokens(prompts, z.shape[0]).to(z.device)
        else:
            tokens = self.text_encoder.canonical_tokens[self.check_labels(labels, z.shape[0])]  # (n, L)
        return self.generate(z, tokens)  # (n, C, size, size) in [-1, 1]


FAMILIES.register("cgan")(Family("cgan", CGANConfig, lambda cfg, channels, classes: CGAN(cfg, channels, classes),
                                 kind="generate", conditions=("labels", "prompt")))

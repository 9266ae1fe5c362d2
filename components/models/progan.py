"""Progressive GAN (Karras et al., 2018, "Progressive Growing of GANs for Improved Quality, Stability,
and Variation"): G and D start at a quarter of the image size (28: 7×7; 64: 4×4) and grow a ×2
block at a time (7 → 14 → 28), each new block faded in with a weight alpha going 0 → 1; equalised
learning rate (§4.1), pixel norm in G (§4.2), minibatch standard deviation in D's last block (§3),
and the paper's loss: WGAN-GP (Gulrajani et al., 2017) with the drift term ε·E[D(x)²] (its §A.1).

The schedule is counted in images the model has seen: stable_images at the first resolution, then
for each new one fade_images of fade-in and stable_images at it; the last resolution trains for the
rest. The count is a buffer (`images_seen`), so checkpoints, resumes and registered weights carry
the phase. If training ends before the last fade-in completes, the model is kept as it is:
`reached_full_resolution` is False, the logged `full_resolution` is below 1, and `sample` upsamples
its current-resolution images to image_size (a short test run must still finish and be evaluated).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from components.config import TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.blocks import BASE

MAX_WIDTH_FACTOR = 4  # channels at a resolution: width · 2^(levels above it), capped at 4·width


class ProGANConfig(TrainConfig):
    latent_dim: int = Field(gt=0)
    ngf: int = Field(gt=0)                 # G's channels at full resolution; lower ones have up to 4×
    ndf: int = Field(gt=0)                 # D's, alike
    fade_images: int = Field(gt=0)         # images shown while a new resolution fades in (alpha 0 → 1)
    stable_images: int = Field(gt=0)       # images shown at each resolution once faded in (the last: the rest)
    gp_lambda: float = Field(ge=0)         # gradient penalty weight (the paper: 10)
    drift: float = Field(ge=0)             # ε of the drift term ε·E[D(x)²] keeping D near 0 (the paper: 0.001)
    beta1: float = Field(ge=0, lt=1)       # Adam's betas (the paper: 0.0 and 0.99)
    beta2: float = Field(ge=0, lt=1)

    @field_validator("fade_images", "stable_images")
    @classmethod
    def _at_least_a_batch(cls, images: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and images < batch:
            raise ValueError(f"must be at least batch_size ({batch}): a phase shorter than one batch is skipped "
                             f"within a step; the paper shows 800,000 images per phase")
        return images


# --- layers -----------------------------------------------------------------------------------------

class EqualizedConv2d(nn.Module):
    """A conv whose weights are drawn N(0, 1) and scaled at runtime by He's constant gain/√fan_in
    (the paper's §4.1): every weight then learns at the same speed under Adam."""

    def __init__(self, c_in: int, c_out: int, kernel: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = gain / math.sqrt(c_in * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    """A linear layer with the equalised learning rate of EqualizedConv2d."""

    def __init__(self, d_in: int, d_out: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.scale = gain / math.sqrt(d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class PixelNorm(nn.Module):
    """Each pixel's feature vector scaled to unit mean square (the paper's §4.2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class MinibatchStdDev(nn.Module):
    """One more feature map: the standard deviation of each feature and pixel over a group of
    images, averaged to one number per group (the paper's §3), so D can see a lack of variety.
    (N, C, H, W) → (N, C + 1, H, W)."""

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = self.group_size if n % self.group_size == 0 else n
        grouped = x.float().reshape(group, n // group, c, h, w)  # image i is in group i % (n // group)
        std = (grouped.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // group,)
        feature = std.repeat(group).reshape(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)
        return torch.cat([x, feature], dim=1)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def widths(levels: int, width: int) -> list[int]:
    """Channels at each resolution, lowest first: e.g. 3 levels → [4w, 2w, w]."""
    return [width * 2 ** min(levels - 1 - i, int(math.log2(MAX_WIDTH_FACTOR))) for i in range(levels)]


# --- networks ---------------------------------------------------------------------------------------

class Generator(nn.Module):
    """z (N, latent) → image (N, C, r, r) at the resolution of `level` (base · 2^level); `fade`: the
    level's weight while it fades in (0..1), None once it is stable."""

    def __init__(self, latent_dim: int, channels: int, width: int, base: int, levels: int):
        super().__init__()
        w = widths(levels, width)
        self.blocks = nn.ModuleList([nn.Sequential(
            PixelNorm(),
            EqualizedLinear(latent_dim, w[0] * base * base),
            nn.Unflatten(1, (w[0], base, base)), _act(), PixelNorm(),  # state: w0 × base × base
            EqualizedConv2d(w[0], w[0], 3), _act(), PixelNorm(),
        )])
        for c_in, c_out in zip(w, w[1:]):
            self.blocks.append(nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),  # state: c_in × 2r × 2r
                EqualizedConv2d(c_in, c_out, 3), _act(), PixelNorm(),
                EqualizedConv2d(c_out, c_out, 3), _act(), PixelNorm(),  # state: c_out × 2r × 2r
            ))
        self.to_rgb = nn.ModuleList([EqualizedConv2d(c, channels, 1, gain=1.0) for c in w])  # linear output

    def forward(self, z: torch.Tensor, level: int, fade: float | None = None) -> torch.Tensor:
        h = self.blocks[0](z)
        for block in self.blocks[1:level]:
            h = block(h)
        if level == 0:
            return self.to_rgb[0](h)
        image = self.to_rgb[level](self.blocks[level](h))
        if fade is not None:  # fading in: the previous resolution's image, upsampled, weighs 1 - fade
            old = F.interpolate(self.to_rgb[level - 1](h), scale_factor=2, mode="nearest")
            image = torch.lerp(old, image, fade)
        return image


class Discriminator(nn.Module):
    """image (N, C, r, r) at the resolution of `level` → score (N, 1), unbounded (a WGAN critic);
    `fade` as for the Generator."""

    def __init__(self, channels: int, width: int, base: int, levels: int):
        super().__init__()
        w = widths(levels, width)
        self.from_rgb = nn.ModuleList([nn.Sequential(EqualizedConv2d(channels, c, 1), _act()) for c in w])
        self.blocks = nn.ModuleList([nn.Sequential(
            MinibatchStdDev(),  # state: (w0 + 1) × base × base
            EqualizedConv2d(w[0] + 1, w[0], 3), _act(),
            nn.Flatten(),
            EqualizedLinear(w[0] * base * base, w[0]), _act(),
            EqualizedLinear(w[0], 1, gain=1.0),
        )])
        for c_out, c_in in zip(w, w[1:]):
            self.blocks.append(nn.Sequential(
                EqualizedConv2d(c_in, c_in, 3), _act(),
                EqualizedConv2d(c_in, c_out, 3), _act(),
                nn.AvgPool2d(2),  # state: c_out × r/2 × r/2
            ))

    def forward(self, x: torch.Tensor, level: int, fade: float | None = None) -> torch.Tensor:
        h = self.blocks[level](self.from_rgb[level](x))
        if fade is not None:  # fading in: the downscaled image through the previous fromRGB weighs 1 - fade
            h = torch.lerp(self.from_rgb[level - 1](F.avg_pool2d(x, 2)), h, fade)
        for block in reversed(self.blocks[:level]):
            h = block(h)
        return h


# --- the model --------------------------------------------------------------------------------------

class ProGAN(GenerativeModel):
    ema_modules = ("generator",)
    # All-reduced rather than wrapped in DDP: the blocks not grown yet take no part in a step, which
    # DDP refuses without find_unused_parameters, and the penalty differentiates D twice.
    allreduce_modules = ("generator", "discriminator")

    def __init__(self, cfg: ProGANConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, channels, cfg.image_size, cfg.latent_dim
        base = BASE[cfg.image_size]
        self.levels = int(math.log2(cfg.image_size // base)) + 1
        self.resolutions = [base * 2 ** i for i in range(self.levels)]  # e.g. [7, 14, 28]
        self.generator = Generator(cfg.latent_dim, channels, cfg.ngf, base, self.levels)
        self.discriminator = Discriminator(channels, cfg.ndf, base, self.levels)
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.int64))
        # A host copy of the count, read each step without a device sync; loading weights refreshes it.
        self._seen = 0
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh_seen())

    def _refresh_seen(self) -> None:
        self._seen = int(self.images_seen)

    def phase(self, seen: int | None = None) -> tuple[int, float]:
        """(level, alpha) after `seen` images (default: those seen so far): level indexes
        `resolutions`; alpha is the new level's weight while it fades in, 1 once it is stable."""
        seen = self._seen if seen is None else seen
        stable, fade = self.cfg.stable_images, self.cfg.fade_images
        if seen < stable:
            return 0, 1.0
        grown, into = divmod(seen - stable, fade + stable)
        if grown + 1 >= self.levels:
            return self.levels - 1, 1.0
        return grown + 1, min(1.0, into / fade)

    def full_resolution_images(self) -> int:
        """Images seen when the last fade-in completes."""
        return (self.levels - 1) * (self.cfg.stable_images + self.cfg.fade_images)

    @staticmethod
    def fade_weight(alpha: float) -> float | None:
        """What the networks take for a phase's alpha: its value while a level fades in, None once the
        level is stable (a branch on None, not on the value, so torch.compile need not guard on alpha)."""
        return alpha if alpha < 1 else None

    @property
    def reached_full_resolution(self) -> bool:
        return self._seen >= self.full_resolution_images()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        return {
            "discriminator": adam(self.discriminator.parameters(), self.cfg.lr, betas),
            "generator": adam(self.generator.parameters(), self.cfg.lr, betas),
        }

    def real_at(self, x: torch.Tensor, level: int, fade: float | None = None) -> torch.Tensor:
        """Real images (N, C, size, size) at the level's resolution; while it fades in, blended with
        their ×2 downscaled-then-upscaled version as G's output is (the paper's §2)."""
        factor = self.image_size // self.resolutions[level]
        x = F.avg_pool2d(x, factor) if factor > 1 else x
        if fade is not None:
            x = torch.lerp(F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest"), x, fade)
        return x

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, level: int, fade: float | None,
                         generator: torch.Generator | None) -> torch.Tensor:
        """E[(‖∇D(x̂)‖₂ − 1)²], x̂ uniform on lines between real and fake images (WGAN-GP's eq. 3)."""
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator)
        between = (eps * real + (1 - eps) * fake).requires_grad_(True)  # (N, C, r, r); fake may be bf16
        # forward, not __call__: a compiled D could not be differentiated twice (as in wgan_gp.py).
        grad, = torch.autograd.grad(self.discriminator.forward(between, level, fade).sum(), between,
                                    create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        n = x.shape[0]
        level, alpha = self.phase()
        fade = self.fade_weight(alpha)
        # The schedule counts the global batch: under torchrun every process sees its slice of it.
        self._seen += n * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        self.images_seen.fill_(self._seen)
        real = self.real_at(x, level, fade)  # (N, C, r, r)
        fake = self.generator(torch.randn(n, self.latent_dim, device=x.device, generator=generator), level, fade)

        d_real = self.discriminator(real, level, fade)
        d_fake = self.discriminator(fake.detach(), level, fade)
        gp = self.gradient_penalty(real, fake.detach(), level, fade, generator)
        loss_d = (d_fake.mean() - d_real.mean() + self.cfg.gp_lambda * gp
                  + self.cfg.drift * d_real.float().pow(2).mean())
        yield "discriminator", StepOutput(loss_d, {"loss_d": loss_d, "wasserstein": d_real.mean() - d_fake.mean(),
                                                   "gp": gp})

        loss_g = -self.discriminator(fake, level, fade).mean()
        full = level == self.levels - 1 and alpha == 1
        phase = {"resolution": float(self.resolutions[level]), "alpha": alpha, "full_resolution": float(full)}
        yield "generator", StepOutput(loss_g, {"loss_g": loss_g, **{k: torch.tensor(v) for k, v in phase.items()}})

    @torch.no_grad()
    def from_noise(self, z, labels=None, prompts=None):
        level, alpha = self.phase()
        images = self.generator(z, level, self.fade_weight(alpha)).clamp(-1, 1)  # (n, C, r, r)
        scale = self.image_size // self.resolutions[level]
        return F.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images  # (n, C, size, size)

    @torch.no_grad()
    def samples_by_resolution(self, z: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """The images of z (n, latent_dim) at every resolution grown so far, lowest first, each at its
        own size (n, C, r, r) in [-1, 1]; the current one as sampled (mid-fade: blended), the earlier
        ones through their own toRGB, as the generator drew them before it grew."""
        level, alpha = self.phase()
        fades = [None] * level + [self.fade_weight(alpha)]
        return [(self.resolutions[i], self.generator(z, i, fade).clamp(-1, 1)) for i, fade in enumerate(fades)]


FAMILIES.register("progan")(Family("progan", ProGANConfig, lambda cfg, channels, classes: ProGAN(cfg, channels)))

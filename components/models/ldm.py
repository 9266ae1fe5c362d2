"""Latent diffusion (Rombach et al., 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): a denoising diffusion model trained on the latent grid of a trained, frozen autoencoder
(a `kl_ae` of the same pipeline), its samples decoded back to images by that autoencoder.

- Training: DDPM (Ho et al., 2020, "Denoising Diffusion Probabilistic Models"): the latent z0 is
  noised to z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε at a uniform t, a UNet predicts ε, loss MSE (their L_simple).
  Latents are scaled to unit variance first (Rombach's scale factor, 1 / std of the first batch).
- Noise schedule: DDPM's linear β (1e-4 … 0.02 over 1000 steps, stretched for other `timesteps` as
  Nichol & Dhariwal do). Not their cosine schedule: its last β is clipped at 0.999, so ᾱ at the last
  step is ~1e-9 and a few-step DDIM's first estimate z0 = (z_t − √(1−ᾱ)ε)/√ᾱ multiplies the UNet's
  error by ~10^4; linear ends at ᾱ ≈ 4e-5, pure noise to the eye and still a bounded first step.
- Sampling: DDIM (Song et al., 2021, "Denoising Diffusion Implicit Models") with η = 0 on `steps`
  evenly spaced timesteps from T−1 down to 0: deterministic, so the same noise gives the same image
  and walking the noise between two draws interpolates their images.
- Classifier-free guidance (Ho & Salimans, 2022): training replaces the condition by a learned null
  embedding with probability uncond_prob; sampling takes ε_u + g·(ε_c − ε_u), both in one batch
  (g = 1: conditional only, g = 0: unconditional).
- Conditions as the cgan family's: a caption of the class drawn at random per training image,
  through the same small text encoder (components.models.text); a request by label uses its class's
  canonical caption, a prompt must name one class.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from components.config import MAX_GUIDANCE, TrainConfig
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam
from components.models.text import TextEncoder, Vocabulary


class LDMConfig(TrainConfig):
    autoencoder: str = Field(min_length=1)  # the model (train.<name>, a family with a latent grid) it is trained on
    width: int = Field(gt=0)  # UNet channels on the latent grid; doubled at the half-size level
    timesteps: int = Field(gt=1)  # T of the diffusion
    uncond_prob: float = Field(ge=0, lt=1)  # share of training images whose condition is the null embedding
    guidance: float = Field(ge=0, le=MAX_GUIDANCE)  # default guidance scale of requests and of the evaluation
    sample_steps: int = Field(gt=0)  # default DDIM steps of requests and of the evaluation
    text_dim: int = Field(gt=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(gt=0, lt=1)

    @field_validator("sample_steps")
    @classmethod
    def _at_most_timesteps(cls, value: int, info: ValidationInfo) -> int:
        timesteps = info.data.get("timesteps")
        if timesteps is not None and value > timesteps:
            raise ValueError(f"must be at most timesteps ({timesteps}): DDIM walks a subset of the diffusion's steps")
        return value


def linear_alpha_bar(timesteps: int) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) for DDPM's linear β schedule, (T,) float64."""
    stretch = 1000 / timesteps  # the same curve for any T (Nichol & Dhariwal, 2021)
    betas = torch.linspace(stretch * 1e-4, stretch * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoids of the timesteps: (N,) → (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (N, half)
    return F.pad(torch.cat([angles.cos(), angles.sin()], dim=1), (0, dim % 2))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class ResBlock(nn.Module):
    """(N, c_in, s, s), embedding (N, E) → (N, c_out, s, s); the embedding scales and shifts the
    second normalisation (Dhariwal & Nichol, 2021, "adaptive group normalisation")."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (N, c_out, 1, 1) each
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the grid's positions, residual: (N, c, s, s) → (N, c, s, s)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (N, s·s, c) each
        y = F.scaled_dot_product_attention(q, k, v)  # (N, s·s, c)
        return x + self.proj(y.transpose(1, 2).reshape(n, c, h, w))


class UNet(nn.Module):
    """(noisy latents (N, C, s, s), timesteps (N,), conditions (N, text_dim), keep (N,) bool) → predicted
    noise (N, C, s, s). Rows with keep False get the learned null condition instead of theirs (the
    null embedding lives here, so a multi-process run averages its gradient with the others').
    Two levels: the latent grid (s: 7 or 8) and one ×2 step down (4), with attention there."""

    def __init__(self, latent_channels: int, width: int, text_dim: int):
        super().__init__()
        emb = 4 * width
        self.width = width
        self.time = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.condition = nn.Linear(text_dim, emb)
        self.null = nn.Parameter(torch.zeros(text_dim))
        self.inp = nn.Conv2d(latent_channels, width, 3, 1, 1)
        self.down_blocks = nn.ModuleList([ResBlock(width, width, emb), ResBlock(width, width, emb)])
        self.down = nn.Conv2d(width, 2 * width, 3, 2, 1)  # s → ceil(s / 2)
        self.mid = nn.ModuleList([ResBlock(2 * width, 2 * width, emb), ResBlock(2 * width, 2 * width, emb)])
        self.attention = SelfAttention(2 * width)
        self.up = nn.Conv2d(2 * width, width, 3, 1, 1)  # after a nearest upsampling to the skip's size
        self.up_blocks = nn.ModuleList([ResBlock(2 * width, width, emb) for _ in range(3)])
        self.out = nn.Sequential(group_norm(width), nn.SiLU(), nn.Conv2d(width, latent_channels, 3, 1, 1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        cond = torch.where(keep[:, None], cond, self.null.to(cond.dtype))  # (N, text_dim)
        emb = self.time(timestep_embedding(t, self.width)) + self.condition(cond)  # (N, E)
        h = self.inp(x)  # (N, w, s, s)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.down(h)  # (N, 2w, s/2, s/2)
        h = self.attention(self.mid[0](h, emb))
        h = self.mid[1](h, emb)
        h = self.up(F.interpolate(h, size=x.shape[-2:], mode="nearest"))  # (N, w, s, s)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)  # (N, C, s, s)


class LatentDiffusion(GenerativeModel):
    conditional = True
    ema_modules = ("unet", "text_encoder")  # what the sampler runs besides the frozen autoencoder

    def __init__(self, cfg: LDMConfig, channels: int, classes: list[str], autoencoder: GenerativeModel):
        super().__init__()
        shape = getattr(autoencoder, "latent_shape", None)
        if shape is None:
            raise ValueError(f"autoencoder: {cfg.autoencoder!r} is a {type(autoencoder).__name__}, which has no "
                             f"latent grid (latent_shape) to diffuse on; name a model of a family with one (kl_ae)")
        if (autoencoder.channels, autoencoder.image_size) != (channels, cfg.image_size):
            raise ValueError(f"image_size: the autoencoder {cfg.autoencoder!r} makes {autoencoder.channels}-channel "
                             f"{autoencoder.image_size} px images, this ldm {channels}-channel {cfg.image_size} px; "
                             f"set the same image_size for both")
        self.cfg, self.channels, self.image_size = cfg, channels, cfg.image_size
        self.latent_shape, self.latent_dim = tuple(shape), math.prod(shape)
        self.classes, self.num_classes = list(classes), len(classes)
        self.autoencoder = autoencoder.requires_grad_(False).eval()  # frozen; saved with the ldm's weights
        self.vocab = Vocabulary(self.classes)
        self.text_encoder = TextEncoder(self.vocab, cfg.text_dim)  # (N, L) tokens → (N, text_dim)
        self.unet = UNet(shape[0], cfg.width, cfg.text_dim)
        self.register_buffer("alpha_bar", linear_alpha_bar(cfg.timesteps).float(), persistent=False)  # (T,)
        # Latents are multiplied by this; 0 = not measured yet (set from the first training batch).
        self.register_buffer("latent_scale", torch.zeros(()))

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        return {"ldm": adam(params, self.cfg.lr, (self.cfg.beta1, self.cfg.beta2))}

    @torch.no_grad()
    def _latents(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images (N, C, H, W) → scaled latents (N, *latent_shape) drawn from the autoencoder's
        posterior; the scale measured on the first batch if it is not set yet."""
        mean, logvar = self.autoencoder.posterior(x)
        mean, logvar = mean.float(), logvar.float()
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=x.device, generator=generator)
        if not self.training:  # a loss measured in eval mode uses the scale as it is (unset: 1)
            return z * torch.where(self.latent_scale > 0, self.latent_scale, torch.ones_like(self.latent_scale))
        var = z.var()
        # Every process gets the same scale; reduced at every step (not only the first), which costs a
        # scalar all-reduce and keeps the step free of a host-side branch on the scale's value.
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(var)
            var /= dist.get_world_size()
        # No branch on the value: no host sync per step, and a rolled-back run measures again.
        self.latent_scale.copy_(torch.where(self.latent_scale > 0, self.latent_scale, var.rsqrt()))
        return z * self.latent_scale

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        n = x.shape[0]
        z0 = self._latents(x, generator)  # (N, C, s, s)
        t = torch.randint(0, self.cfg.timesteps, (n,), device=x.device, generator=generator)
        eps = torch.randn(z0.shape, device=x.device, generator=generator)
        ab = self.alpha_bar[t].view(n, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps  # q(z_t | z0)
        tokens = self.text_encoder.random_captions(y, generator)  # one caption of its class per image
        keep = torch.rand(n, device=x.device, generator=generator) >= self.cfg.uncond_prob
        pred = self.unet(zt, t, self.text_encoder(tokens), keep)
        loss = F.mse_loss(pred.float(), eps)
        yield "ldm", StepOutput(loss, {"loss": loss})

    def check_steps(self, steps) -> int:
        if steps is None:
            return self.cfg.sample_steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= self.cfg.timesteps:
            raise ValueError(f"steps: expected an integer in 1..{self.cfg.timesteps} (DDIM steps over the "
                             f"model's {self.cfg.timesteps} diffusion steps), got {steps!r}")
        return int(steps)

    def check_guidance(self, guidance) -> float:
        if guidance is None:
            return self.cfg.guidance
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not 0 <= guidance <= MAX_GUIDANCE:
            raise ValueError(f"guidance: expected a number in 0..{MAX_GUIDANCE:g} (0: unconditional, 1: conditional, "
                             f"more: closer to the asked class, less diverse), got {guidance!r}")  # NaN fails too
        return float(guidance)

    def _noise_estimate(self, z: torch.Tensor, t: int, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """Guided ε of latents z (N, C, s, s) at timestep t: one UNet pass at g = 0 or 1, else both in one batch."""
        n = z.shape[0]
        ts = torch.full((n,), t, device=z.device, dtype=torch.long)
        if guidance in (0.0, 1.0):
            return self.unet(z, ts, cond, torch.full((n,), guidance == 1.0, device=z.device))
        keep = torch.arange(2 * n, device=z.device) < n  # the first half conditional, the second not
        eps_c, eps_u = self.unet(torch.cat([z, z]), torch.cat([ts, ts]), torch.cat([cond, cond]), keep).chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    @torch.no_grad()
    def from_noise(self, z, labels=None, prompts=None, steps=None, guidance=None):
        """Images in [-1, 1] (n, C, H, W) of noise z (n, latent_dim) by deterministic DDIM from
        z_T = z on the grid; steps (DDIM steps) and guidance (scale) default to the config's."""
        steps, guidance = self.check_steps(steps), self.check_guidance(guidance)
        if prompts is not None and labels is not None:
            raise ValueError("labels, prompts: pass one of them, not both")
        n = z.shape[0]
        if prompts is not None:
            tokens = self.vocab.prompt_tokens(prompts, n).to(self.alpha_bar.device)
        else:
            tokens = self.text_encoder.canonical_tokens[self.check_labels(labels, n)]  # (n, L)
        cond = self.text_encoder(tokens)  # (n, text_dim)
        x = z.reshape(n, *self.latent_shape).float()
        ts = torch.linspace(self.cfg.timesteps - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(ts):
            eps = self._noise_estimate(x, t, cond, guidance)
            ab = self.alpha_bar[t]
            ab_prev = self.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(ab)
            z0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()  # the current estimate of the clean latent
            x = ab_prev.sqrt() * z0 + (1 - ab_prev).sqrt() * eps  # DDIM's η = 0 step
        scale = self.latent_scale if float(self.latent_scale) > 0 else torch.ones_like(self.latent_scale)
        return self.autoencoder.decode(x / scale)  # (n, C, size, size) in [-1, 1]

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None, prompts=None, steps=None, guidance=None):
        return self.from_noise(self.noise(n, generator), labels=labels, prompts=prompts, steps=steps, guidance=guidance)


def _build(cfg: LDMConfig, channels: int, classes: list[str], parts: dict[str, GenerativeModel]) -> LatentDiffusion:
    return LatentDiffusion(cfg, channels, classes, parts["autoencoder"])


FAMILIES.register("ldm")(Family("ldm", LDMConfig, _build, kind="generate", conditions=("labels", "prompt"),
                                parts=("autoencoder",), sampler_options=("steps", "guidance")))

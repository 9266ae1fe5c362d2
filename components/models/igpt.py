"""iGPT (Chen et al., 2020, "Generative Pretraining from Pixels"): a decoder-only transformer over an
image's pixels read as a sequence, trained to predict each pixel from the ones before it.

Tokens are the 8-bit values themselves (256 of them), read in raster order, a colour image's three
channels interleaved per pixel: the model is then an exact likelihood of the dataset's own bytes, so
its test negative log-likelihood (bits/dim) compares with any other 8-bit density model's. (iGPT
quantises colour to a 512-entry k-means palette to shorten the sequences; at 28×28 grey the
sequence is 784 tokens either way.) Sampling runs one token at a time with a key/value cache, and
`complete` continues real images from their first rows: the lecture's "coherent image completions".
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from components.config import TrainConfig, heads_divide_dim
from components.models.base import FAMILIES, Family, GenerativeModel, StepOutput, adam

LEVELS = 256  # one token per 8-bit value


class IGPTConfig(TrainConfig):
    dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    heads: int = Field(gt=0)  # must divide dim
    mlp_ratio: int = Field(gt=0)
    beta2: float = Field(gt=0, lt=1)

    _heads_divide_dim = field_validator("heads")(heads_divide_dim)


class KVCache:
    """Keys and values of the positions seen so far, one pair of (N, heads, length, head_dim) buffers per layer."""

    def __init__(self, layers: int, n: int, heads: int, length: int, head_dim: int, device, dtype):
        shape = (n, heads, length, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0  # positions filled; advanced by the transformer once all layers have written

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v (N, heads, T, head_dim) → all positions' so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, layer: int):
        super().__init__()
        self.heads, self.layer = heads, layer
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        n, t, dim = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (N, h, T, hd)
        # Without earlier positions in the cache, T queries attend causally among themselves (training,
        # a completion's given rows); with them, the new query attends to every cached position.
        causal = cache is None or cache.length == 0
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1)  # (N, h, T, hd)
        return self.proj(y.transpose(1, 2).reshape(n, t, dim))


class Block(nn.Module):
    """Pre-norm transformer block (GPT-2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, layer: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, layer)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class PixelTransformer(nn.Module):
    """Tokens (N, T), read from position `cache.length` on (0 without a cache) → next-token logits (N, T, LEVELS).

    Position 0 holds a learned start token; position p > 0 holds pixel p − 1, so the logits at p predict pixel p.
    """

    def __init__(self, seq_len: int, dim: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.seq_len, self.heads, self.head_dim = seq_len, heads, dim // heads
        self.start = nn.Parameter(torch.zeros(1, 1, dim))
        self.tokens = nn.Embedding(LEVELS, dim)
        self.positions = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, i) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, LEVELS)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1 or name in ("start", "positions"):
                # residual projections scaled down by depth, so the residual stream's variance stays put
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, embedded: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = 0 if cache is None else cache.length
        h = embedded + self.positions[:, start:start + embedded.shape[1]]
        for block in self.blocks:
            h = block(h, cache)
        if cache is not None:
            cache.length += embedded.shape[1]
        return self.head(self.norm(h))

    def embed(self, tokens: torch.Tensor, with_start: bool) -> torch.Tensor:
        """Tokens (N, T) → inputs (N, T (+1), dim), the start token first when `with_start`."""
        h = self.tokens(tokens)
        return torch.cat([self.start.expand(tokens.shape[0], 1, -1).to(h.dtype), h], dim=1) if with_start else h

    def new_cache(self, n: int, device, dtype) -> KVCache:
        return KVCache(len(self.blocks), n, self.heads, self.seq_len, self.head_dim, device, dtype)


class IGPT(GenerativeModel):
    ema_modules = ("net",)
    latent_dim = 0  # no latent: an image is drawn pixel by pixel

    def __init__(self, cfg: IGPTConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size = cfg, channels, cfg.image_size
        self.seq_len = channels * cfg.image_size ** 2
        self.net = PixelTransformer(self.seq_len, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"igpt": adam(self.parameters(), self.cfg.lr, (0.9, self.cfg.beta2))}

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W), 8-bit values as to_model_input makes them → tokens (N, H·W·C), raster order."""
        return ((x.float() + 1) * 127.5).round().clamp(0, LEVELS - 1).long().permute(0, 2, 3, 1).flatten(1)

    def to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (N, H·W·C) → images in [-1, 1] (N, C, H, W)."""
        size = self.image_size
        return (tokens.view(-1, size, size, self.channels).permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous()

    def nats_per_image(self, x: torch.Tensor) -> torch.Tensor:
        """−log p(x) of images in [-1, 1] (N, C, H, W) holding 8-bit values, in nats, (N,)."""
        tokens = self.to_tokens(x)
        logits = self.net(self.net.embed(tokens[:, :-1], with_start=True))  # (N, L, LEVELS)
        return F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none").sum(1)

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        loss = self.nats_per_image(x).mean() / self.seq_len  # nats per pixel value
        yield "igpt", StepOutput(loss, {"loss": loss, "bits_per_dim": loss / math.log(2)})

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None, prompts=None):
        device = next(self.parameters()).device
        return self._continue(torch.zeros(n, 0, dtype=torch.long, device=device), generator)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, rows_given: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) → images whose first `rows_given` rows are x's, bit for bit,
        and whose other rows are drawn pixel by pixel given them."""
        if not 0 <= rows_given <= self.image_size:
            raise ValueError(f"rows_given: must be in 0..{self.image_size}, got {rows_given}")
        given = self.to_tokens(x)[:, :rows_given * self.image_size * self.channels]
        return self._continue(given, generator)

    def _continue(self, given: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Given tokens (N, T) → images in [-1, 1] (N, C, H, W) of those tokens and L − T drawn after them."""
        n, done = given.shape
        if done == self.seq_len:  # every row given: nothing to draw
            return self.to_images(given)
        cache = self.net.new_cache(n, given.device, next(self.parameters()).dtype)
        tokens = torch.empty(n, self.seq_len, dtype=torch.long, device=given.device)
        tokens[:, :done] = given
        logits = self.net(self.net.embed(given, with_start=True), cache)[:, -1]  # (N, LEVELS)
        for position in range(done, self.seq_len):
            tokens[:, position] = draw(logits, generator)
            if position + 1 < self.seq_len:
                logits = self.net(self.net.embed(tokens[:, position:position + 1], with_start=False), cache)[:, -1]
        return self.to_images(tokens)

    def from_noise(self, z, labels=None, prompts=None):
        raise TypeError("the igpt family has no latent space: it draws each pixel given the ones before it; "
                        "use sample(n) or complete(images, rows_given)")


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (N, LEVELS), drawn from their softmax by a uniform number from
    `generator` (on the CPU, so a seed draws the same numbers on any device)."""
    probabilities = logits.float().softmax(dim=-1)
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(logits.shape[0], 1, generator=generator, device=device).to(logits.device)
    return (probabilities.cumsum(dim=-1) < u).sum(dim=-1).clamp(max=LEVELS - 1)


FAMILIES.register("igpt")(Family("igpt", IGPTConfig, lambda cfg, channels, classes: IGPT(cfg, channels),
                                 completes=True))

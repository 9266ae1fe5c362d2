"""Inpainting and stitching: a context encoder (Pathak et al., 2016, "Context Encoders: Feature
Learning by Inpainting"): an encoder-decoder sees the image with a hole and the hole's mask, fills
the hole, and is trained with a masked L2 reconstruction loss plus an adversarial loss on the
completed image. The encoder-decoder is a small U-Net (Ronneberger et al., 2015).

The degradation: a mask per image (1 where to fill in), of one of three kinds drawn in proportion to
their weights: random boxes, free-form strokes (thick random polylines, as in Yu et al., 2019,
"Free-Form Image Inpainting with Gated Convolution") and the stitching band, a vertical or
horizontal band between two halves of the image. The hole is set to 0, mid grey in [-1, 1]. The
output keeps every known pixel and fills only the hole: out = mask·G + (1 - mask)·x.

Image stitching joins the halves of two different images. The band between them has no true
content, so in training a share of the bands joins two images of the batch and those images get the
adversarial loss only; `degrade` (what evaluation scores against the clean image) draws bands
within one image, where the truth is known.
"""
from __future__ import annotations

import math
from typing import Annotated, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from scipy.ndimage import distance_transform_edt
from torch import nn

from components.config import Frozen, TrainConfig
from components.models.base import FAMILIES, Family, StepOutput, TranslationModel, adam
from components.models.blocks import BASE, DownStack, UNetUp, dcgan_init, feature_dim

Share = Annotated[float, Field(gt=0, lt=1)]  # a share of the image side


def _ordered(name: str, pair: tuple) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{name}: [low, high] with low <= high, got {list(pair)}")


# --- masks -----------------------------------------------------------------------------------------
# Each kind draws (hole, far) for n images of side `size`, bool (n, 1, size, size) on the generator's
# device (the CPU without one): hole marks the pixels to fill in, far the pixels a second image
# supplies when two images are stitched (a band's far side; none for other kinds).

def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(n: int, generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=_device(generator))


def _integers(n: int, generator: torch.Generator | None, low: int, high: int | torch.Tensor) -> torch.Tensor:
    """Uniform integers in [low, high], inclusive, (n,); high may differ per draw ((n,))."""
    return (low + _uniform(n, generator) * (high - low + 1)).floor().long().clamp(max=high)


def _span(start: torch.Tensor, extent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Where start <= index < start + extent: starts and extents (n,), index (1, S, S) -> (n, S, S)."""
    return (index >= start[:, None, None]) & (index < (start + extent)[:, None, None])


def _pixel_grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices, each (1, size, size)."""
    rows, cols = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    return rows[None], cols[None]


class BoxMasks(Frozen):
    weight: float = Field(ge=0)
    size: tuple[Share, Share]  # each side of the box, a share of the image side, [low, high]

    @model_validator(mode="after")
    def _check(self) -> "BoxMasks":
        _ordered("size", self.size)
        return self

    def draw(self, n: int, size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = ((_uniform(n, generator, *self.size) * size).round().long().clamp(1, size - 1) for _ in "hw")
        top, left = _integers(n, generator, 0, size - height), _integers(n, generator, 0, size - width)
        rows, cols = _pixel_grid(size, height.device)
        hole = _span(top, height, rows) & _span(left, width, cols)  # (n, size, size)
        return hole[:, None], torch.zeros_like(hole[:, None])


class StrokeMasks(Frozen):
    weight: float = Field(ge=0)
    count: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]  # strokes per image, [low, high]
    vertices: int = Field(ge=2)  # of each polyline
    width: tuple[Share, Share]  # the pen's width, a share of the image side
    length: tuple[Share, Share]  # of each segment, a share of the image side

    @model_validator(mode="after")
    def _check(self) -> "StrokeMasks":
        for name in ("count", "width", "length"):
            _ordered(name, getattr(self, name))
        return self

    def draw(self, n: int, size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        most, segments = self.count[1], self.vertices - 1
        active = torch.arange(most, device=_device(generator)) < _integers(n, generator, *self.count)[:, None]
        start = _uniform(n * most * 2, generator, 0, size).view(n, most, 1, 2)  # (x, y) in pixels
        angle = _uniform(n * most * segments, generator, 0, 2 * math.pi).view(n, most, segments)
        length = _uniform(n * most * segments, generator, *self.length).view(n, most, segments) * size
        steps = torch.stack([angle.cos(), angle.sin()], -1) * length[..., None]
        points = (start + torch.cat([torch.zeros_like(start), steps], 2).cumsum(2)).clamp(0, size)  # (n, most, V, 2)
        # a pen of at least 1.5 px, so that every stroke covers a pixel centre
        radius = (_uniform(n * most, generator, *self.width).view(n, most) * size / 2).clamp(min=0.75)
        # drawn in chunks of images: the distances of every pixel to every segment take n·most·(V-1)·size² floats
        hole = torch.cat([_polylines(points[i:i + 256], radius[i:i + 256], active[i:i + 256], size)
                          for i in range(0, n, 256)])
        return hole[:, None], torch.zeros_like(hole[:, None])


def _polylines(points: torch.Tensor, radius: torch.Tensor, active: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels within `radius` of an active polyline: points (n, k, V, 2) as (x, y), radius and active (n, k) ->
    (n, size, size) bool."""
    x, y = points[..., 0, None, None], points[..., 1, None, None]  # (n, k, V, 1, 1)
    ax, ay, dx, dy = x[:, :, :-1], y[:, :, :-1], x[:, :, 1:] - x[:, :, :-1], y[:, :, 1:] - y[:, :, :-1]  # segments
    rows, cols = _pixel_grid(size, points.device)
    px, py = ax - (cols + 0.5), ay - (rows + 0.5)  # from each pixel centre to each segment's start, (n, k, V-1, size, size)
    t = (-(px * dx + py * dy) / (dx * dx + dy * dy).clamp(min=1e-12)).clamp(0, 1)  # the nearest point's place on it
    squared = (px + t * dx) ** 2 + (py + t * dy) ** 2
    near = (squared <= (radius ** 2)[:, :, None, None, None]).any(2) & active[:, :, None, None]
    return near.any(1)


class BandMasks(Frozen):
    weight: float = Field(ge=0)
    width: tuple[Share, Share]  # the band's width, a share of the image side, [low, high]
    two_images: float = Field(ge=0, le=1)  # training: share of bands whose halves come from two images

    @model_validator(mode="after")
    def _check(self) -> "BandMasks":
        _ordered("width", self.width)
        return self

    def draw(self, n: int, size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        vertical = _uniform(n, generator) < 0.5
        width = (_uniform(n, generator, *self.width) * size).round().long().clamp(1, size - 2)
        start = (size - width) // 2  # centred: the band lies between the two halves
        rows, cols = _pixel_grid(size, width.device)
        across = torch.where(vertical[:, None, None], cols, rows)  # the coordinate across the band, (n, size, size)
        hole = _span(start, width, across)
        far = across >= size // 2
        return hole[:, None], far[:, None]


class MaskConfig(Frozen):
    boxes: BoxMasks
    strokes: StrokeMasks
    band: BandMasks

    @model_validator(mode="after")
    def _some_weight(self) -> "MaskConfig":
        if sum(kind.weight for kind in self.kinds()) <= 0:
            raise ValueError("boxes.weight, strokes.weight and band.weight are all 0: give at least one kind a "
                             "positive weight")
        return self

    def kinds(self) -> tuple[BoxMasks, StrokeMasks, BandMasks]:
        return self.boxes, self.strokes, self.band

    def draw(self, n: int, size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hole, far) of n images, each of a kind drawn in proportion to the kinds' weights."""
        weights = torch.tensor([kind.weight for kind in self.kinds()], dtype=torch.float64)
        bounds = (weights.cumsum(0) / weights.sum()).to(_device(generator))
        which = torch.searchsorted(bounds, _uniform(n, generator).double(), right=True).clamp(max=len(weights) - 1)
        drawn = [kind.draw(n, size, generator) for kind in self.kinds()]  # every kind for every image: fixed draws
        pick = torch.arange(n, device=which.device)
        hole = torch.stack([h for h, _ in drawn])[which, pick]
        far = torch.stack([f for _, f in drawn])[which, pick]
        return hole, far


# --- baselines -------------------------------------------------------------------------------------
# (images (N, C, H, W) in [-1, 1], hole bool (N, 1, H, W)) -> images with only the hole filled.

def mean_fill(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The hole filled with the mean of each image's known pixels, per channel (grey 0 if none is known)."""
    known = (~hole).to(images.dtype)
    mean = (images * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)
    return torch.where(hole, mean.expand_as(images), images)


def nearest_fill(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Each hole pixel takes the value of the nearest known pixel (Euclidean; grey 0 if none is known)."""
    filled = images.clone()
    for i, image_hole in enumerate(hole[:, 0].cpu().numpy()):
        if not image_hole.any():
            continue
        if image_hole.all():
            filled[i] = 0
            continue
        # the feature transform: for every pixel, the index of the nearest zero (known) pixel
        _, (rows, cols) = distance_transform_edt(image_hole, return_indices=True)
        rows, cols = (torch.from_numpy(index.astype(np.int64)).to(images.device) for index in (rows, cols))
        filled[i] = images[i][:, rows, cols]
    return torch.where(hole, filled, images)


BASELINES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean_fill": mean_fill, "nearest_fill": nearest_fill}


# --- model -----------------------------------------------------------------------------------------

class InpaintConfig(TrainConfig):
    width: int = Field(gt=0)  # channels of the U-Net's top level; they double at each halving
    ndf: int = Field(gt=0)  # the discriminator's width
    adv_weight: float = Field(ge=0)  # λ_adv: the adversarial loss's weight beside the hole's L2 (weight 1)
    beta1: float = Field(ge=0, lt=1)
    masks: MaskConfig


class UNet(nn.Module):
    """(N, C + 1, S, S): the image with its hole at 0 and the mask -> (N, C, S, S) in [-1, 1].

    Halves down to the 7×7 (28 px) or 4×4 (64 px) base, where a dilated conv sees the whole image,
    so that the middle of a large hole is filled from context; the skips carry the known pixels'
    detail back to the top."""

    def __init__(self, channels: int, width: int, size: int):
        super().__init__()
        steps = int(math.log2(size // BASE[size]))
        widths = [width * 2 ** i for i in range(steps + 1)]  # top -> base, 28: [w, 2w, 4w]
        self.stem = nn.Sequential(nn.Conv2d(channels + 1, width, 3, 1, 1), nn.LeakyReLU(0.2, True))  # state: w × S × S
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True))
            for c_in, c_out in zip(widths, widths[1:]))  # state: widths[-1] × base × base
        self.bottleneck = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 3, 1, 2, dilation=2, bias=False),
                                        nn.BatchNorm2d(widths[-1]), nn.ReLU(True))
        self.ups = nn.ModuleList(UNetUp(c_in, c_out) for c_in, c_out in zip(widths[::-1], widths[::-1][1:]))
        self.head = nn.Sequential(nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh())  # state: C × S × S

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = self.bottleneck(skips.pop())
        for up in self.ups:
            h = up(h, skips.pop())
        return self.head(h)


class Inpainter(TranslationModel):
    ema_modules = ("generator",)

    def __init__(self, cfg: InpaintConfig, channels: int):
        super().__init__()
        self.cfg, self.channels, self.image_size = cfg, channels, cfg.image_size
        self.latent_dim = 0
        self.generator = UNet(channels, cfg.width, cfg.image_size)
        self.discriminator = nn.Sequential(DownStack(channels, cfg.ndf, cfg.image_size),
                                           nn.Linear(feature_dim(cfg.image_size, cfg.ndf), 1))  # logits, (N, 1)
        self.apply(dcgan_init)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, 0.999)
        return {"discriminator": adam(self.discriminator.parameters(), self.cfg.lr, betas),
                "generator": adam(self.generator.parameters(), self.cfg.lr, betas)}

    def fill(self, images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """The generator's whole output (N, C, H, W) for images whose hole (bool (N, 1, H, W)) is to be filled."""
        return self.generator(torch.cat([images.masked_fill(hole, 0), hole.to(images.dtype)], 1))

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> Iterator[tuple[str, StepOutput]]:
        n = x.shape[0]
        hole, far = self.cfg.masks.draw(n, self.image_size, generator)
        stitched = (_uniform(n, generator) < self.cfg.masks.band.two_images) & far.flatten(1).any(1)
        hole, far, stitched = hole.to(x.device), far.to(x.device), stitched.to(x.device)
        # stitched images: the band's far side from the batch's next image
        target = torch.where(far & stitched[:, None, None, None], x.roll(1, 0), x)
        raw = self.fill(target, hole)
        completed = torch.where(hole, raw, target)
        ones, zeros = torch.ones(n, 1, device=x.device), torch.zeros(n, 1, device=x.device)

        d_real = self.discriminator(x)
        d_fake = self.discriminator(completed.detach())
        loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        yield "discriminator", StepOutput(loss_d, {"loss_d": loss_d, "d_real": torch.sigmoid(d_real).mean()})

        # L2 inside the hole, per image over its hole's pixels; stitched images have no true band
        hole_f = hole.to(raw.dtype)
        per_image = ((raw - target) ** 2 * hole_f).sum((1, 2, 3)) / (hole_f.sum((1, 2, 3)) * x.shape[1]).clamp(min=1)
        known = (~stitched).to(per_image.dtype)
        loss_rec = (per_image * known).sum() / known.sum().clamp(min=1)
        loss_adv = F.binary_cross_entropy_with_logits(self.discriminator(completed), ones)
        loss = loss_rec + self.cfg.adv_weight * loss_adv
        yield "generator", StepOutput(loss, {"loss_rec": loss_rec, "loss_adv": loss_adv,
                                             "d_fake": torch.sigmoid(d_fake).mean()})

    def degrade(self, x, generator=None):
        """{"images": x with the hole at 0 (mid grey), "mask": float (N, 1, H, W), 1 in the hole}; bands
        within one image (the truth of a two-image band is unknown)."""
        hole, _ = self.cfg.masks.draw(x.shape[0], self.image_size, generator)
        hole = hole.to(x.device)
        return {"images": x.masked_fill(hole, 0), "mask": hole.to(x.dtype)}

    @torch.no_grad()
    def translate(self, inputs):
        images, hole = _images_and_hole(inputs)
        return torch.where(hole, self.fill(images, hole), images)

    def baselines(self, inputs):
        images, hole = _images_and_hole(inputs)
        return {name: fill(images, hole) for name, fill in BASELINES.items()}

    def degradation(self):
        holes = self.cfg.masks.model_dump(mode="json")
        holes["band"].pop("two_images")  # training's alone: degrade draws bands within one image
        return {"holes": holes, "hole_value": 0, "image_size": self.image_size}


def _images_and_hole(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (N, C, H, W) and the hole as bool (N, 1, H, W): any nonzero mask value is hole."""
    images, mask = inputs["images"], inputs["mask"]
    n, _, h, w = images.shape
    if mask.shape != (n, 1, h, w):
        raise ValueError(f"mask: expected shape {(n, 1, h, w)} (one channel, the images' size), got {tuple(mask.shape)}")
    return images, (mask != 0).to(images.device)


def input_shape(cfg: InpaintConfig, channels: int) -> tuple[int, int, int]:
    return channels, cfg.image_size, cfg.image_size


FAMILIES.register("inpaint")(Family("inpaint", InpaintConfig, lambda cfg, channels, classes: Inpainter(cfg, channels),
                                    kind="translate", input_shape=input_shape, takes_mask=True))

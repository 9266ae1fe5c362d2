"""Translate models judged as restoration: each held-out image x is degraded by its family's
documented degradation (`degrade`: a 4x bicubic downscale, a hole, …; masks and any other randomness
from a generator seeded by the evaluation seed, on the model's device as in training), restored by
the model and by each classical baseline (`baselines`: bicubic, mean fill, …), and every restoration
is scored against x: the lecture's super-resolution figure, in numbers and as a picture.

Scores are measured on the 8-bit images a registered model serves (every restoration quantised as
to_uint8 does), pixels in [0, 1]:
- PSNR (dB): 10·log10(1 / MSE) per image, the MSE over its pixels and channels, capped at
  PSNR_CAP_DB; for a family whose degrade gives a mask, over the masked pixels only.
- SSIM (Wang et al., 2004; torchmetrics' 11-px Gaussian window): the per-pixel SSIM map averaged over
  the image; for a mask family, averaged over the masked pixels only (a masked pixel's window still
  covers known neighbours, so the fill's fit to its surroundings counts too).
A metric is the mean over images; its interval, a bootstrap over images (intervals.mean_interval).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from components.evaluation.metrics import PSNR_CAP_DB
from components.images import to_model_input, to_uint8

MODEL = "model"  # the model's restorations, beside the baselines' (a family names no baseline so)
BATCH = 500  # images degraded at once: the masks drawn depend on it, so every caller restores in these batches
FIGURE_SIDE = 96  # a figure's images are zoomed (nearest neighbour) to at least this many pixels a side
CAPTION_LINES, LINE_PX = 2, 12


@dataclass
class Restored:
    """One batch of held-out images restored: all uint8 (n, C, H, W) on the CPU, mask float (n, 1, H, W)."""

    clean: torch.Tensor  # the held-out images at the model's resolution
    inputs: torch.Tensor  # what the model was given (degrade's "images"; another size or channel count possible)
    outputs: dict[str, torch.Tensor]  # MODEL first, then each baseline by name
    mask: torch.Tensor | None  # 1 where the degradation removed pixels, for families that take a mask


@torch.no_grad()
def restore(model, images_u8: torch.Tensor, seed: int) -> Iterator[Restored]:
    """Degrade and restore uint8 images N×C×H×W (resized to the model's resolution), BATCH at a time,
    with the degradation's randomness from one generator seeded by `seed`."""
    from components.evaluation.grid import check_finite

    device = next(model.parameters()).device
    model.eval()
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same masks on any device
    for start in range(0, images_u8.shape[0], BATCH):
        x = to_model_input(images_u8[start:start + BATCH], model.image_size, device)  # (n, C, H, W) in [-1, 1]
        inputs = model.degrade(x, generator)
        outputs = {MODEL: model.translate(inputs), **model.baselines(inputs)}
        for name, images in outputs.items():
            check_finite(images, f"{name} restorations (from image {start})")
        mask = inputs.get("mask")
        yield Restored(clean=to_uint8(x).cpu(), inputs=to_uint8(inputs["images"]).cpu(),
                       outputs={name: to_uint8(images).cpu() for name, images in outputs.items()},
                       mask=None if mask is None else mask.float().cpu())


def restore_uint8(model, images_u8: torch.Tensor, seed: int) -> torch.Tensor:
    """The model's restorations of uint8 images N×C×H×W at `seed`: uint8 N×C×size×size."""
    chunks = [batch.outputs[MODEL] for batch in restore(model, images_u8, seed)]
    if chunks:
        return torch.cat(chunks)
    return torch.zeros(0, model.channels, model.image_size, model.image_size, dtype=torch.uint8)


def pixel_scores(restored_u8: torch.Tensor, clean_u8: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM, each (N,), of uint8 restorations against the uint8 originals,
    both N×C×H×W; inside `mask` (N, 1, H, W), 1 where scored, when given."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if restored_u8.shape != clean_u8.shape:
        raise ValueError(f"restorations {tuple(restored_u8.shape)} and originals {tuple(clean_u8.shape)}: "
                         f"they must be the same shape to be compared")
    restored, clean = restored_u8.double() / 255, clean_u8.double() / 255
    weight = torch.ones_like(clean[:, :1]) if mask is None else mask.double()  # (N, 1, H, W)
    area = weight.sum(dim=(1, 2, 3)) * clean.shape[1]  # scored values per image
    if (area == 0).any():
        raise ValueError(f"mask: empty for image(s) {torch.nonzero(area == 0).flatten().tolist()[:10]}; "
                         f"the degradation must remove some pixels of every image")
    mse = ((restored - clean).pow(2) * weight).sum(dim=(1, 2, 3)) / area
    psnr = (10 * torch.log10(1 / mse)).clamp(max=PSNR_CAP_DB)  # an exact restoration: +inf, capped
    _, ssim_map = structural_similarity_index_measure(restored, clean, data_range=1.0, reduction="none",
                                                      return_full_image=True)  # (N, C, H, W)
    ssim = (ssim_map * weight).sum(dim=(1, 2, 3)) / area
    return psnr, ssim  # float64: means and paired differences of them lose nothing


@dataclass
class RestorationScores:
    """Per-image scores of every restoration, by method (MODEL, then each baseline): (N,) each."""

    psnr: dict[str, torch.Tensor] = field(default_factory=dict)
    ssim: dict[str, torch.Tensor] = field(default_factory=dict)
    masked: bool = False  # scored inside a mask

    def best_baseline(self) -> str | None:
        """The baseline with the highest mean PSNR, or None when the family declares none."""
        baselines = [name for name in self.psnr if name != MODEL]
        return max(baselines, key=lambda name: float(self.psnr[name].double().mean())) if baselines else None


def score_restorations(model, images_u8: torch.Tensor, seed: int) -> RestorationScores:
    """PSNR and SSIM of the model's and every baseline's restorations of uint8 images N×C×H×W."""
    parts: list[tuple[dict, dict]] = []
    masked = False
    for batch in restore(model, images_u8, seed):
        masked = batch.mask is not None
        scores = {name: pixel_scores(images, batch.clean, batch.mask) for name, images in batch.outputs.items()}
        parts.append(({k: v[0] for k, v in scores.items()}, {k: v[1] for k, v in scores.items()}))
    if not parts:
        raise ValueError("no held-out images to restore: the evaluation needs at least 2")
    join = lambda index: {name: torch.cat([p[index][name] for p in parts]) for name in parts[0][index]}  # noqa: E731
    return RestorationScores(psnr=join(0), ssim=join(1), masked=masked)


# --- the figure: input, each baseline, the model, the original, with PSNR/SSIM under each ---------------

def figure_tiles(model, outputs_u8: torch.Tensor, reference_u8: torch.Tensor, seed: int, rows: int,
                 max_tiles: int | None = None) -> tuple[torch.Tensor, int]:
    """The lecture's super-resolution figure for the first `rows` reference images (uint8 N×C×H×W),
    fewer where `max_tiles` images would not hold them all (at least one row):
    per row the input (nearest-upscaled to full size), each baseline, the model's restoration (taken
    from `outputs_u8`, the model's restorations of the same reference at `seed`, as
    evaluation_images makes them; another version's too), and the original; under each, its PSNR (dB)
    and SSIM against the original (inside the mask for a mask family). Returns the captioned tiles,
    uint8 (rows·columns, C, H', W'), row by row, and the number of columns (save_grid's nrow)."""
    # The first batch as the evaluation degraded it: the same draws, hence the same masks.
    batch = next(restore(model, reference_u8[:BATCH], seed))
    width = len(batch.outputs) + 2  # input, the baselines, the model, the original
    rows = max(1, min(rows, reference_u8.shape[0], outputs_u8.shape[0], (max_tiles or rows * width) // width))
    mask = None if batch.mask is None else batch.mask[:rows]
    clean = batch.clean[:rows]
    columns = {"input": _full_size(batch.inputs[:rows], clean),
               **{name: images[:rows] for name, images in batch.outputs.items() if name != MODEL},
               _family(model): outputs_u8[:rows]}
    zoom = -(-FIGURE_SIDE // clean.shape[-1])  # ceil
    side = f"{batch.inputs.shape[-2]}x{batch.inputs.shape[-1]}"  # the default font has no ×
    tiles = []
    for i in range(rows):
        for name, images in columns.items():
            if name == "input":
                caption = [f"input {side}" if mask is None else f"input, {float(mask[i].mean()):.0%} hole"]
            else:
                psnr, ssim = pixel_scores(images[i:i + 1], clean[i:i + 1], None if mask is None else mask[i:i + 1])
                caption = [name, f"{float(psnr):.2f} dB  {float(ssim):.3f}"]
            tiles.append(_captioned(images[i], zoom, caption))
        tiles.append(_captioned(clean[i], zoom, ["original", "in mask: dB  SSIM" if mask is not None else "dB  SSIM"]))
    return torch.stack(tiles), width


def _family(model) -> str:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "family", None) or type(model).__name__


def _full_size(inputs_u8: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The model's inputs shown beside full-size images: nearest-upscaled (pixels stay visible) and,
    grey shown beside colour, with its channel repeated."""
    if inputs_u8.shape[-2:] != like.shape[-2:]:
        inputs_u8 = F.interpolate(inputs_u8, size=like.shape[-2:], mode="nearest")
    if inputs_u8.shape[1] != like.shape[1]:
        inputs_u8 = inputs_u8[:, :1].expand(-1, like.shape[1], -1, -1)
    return inputs_u8


def _captioned(image_u8: torch.Tensor, zoom: int, lines: list[str]) -> torch.Tensor:
    """One image (C, H, W) zoomed by `zoom`, above a white band holding `lines` of black text:
    uint8 (C, H·zoom + band, W·zoom)."""
    big = image_u8.repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)  # (C, H·zoom, W·zoom)
    channels, height, width = big.shape
    mode = "L" if channels == 1 else "RGB"
    tile = Image.new(mode, (width, height + CAPTION_LINES * LINE_PX + 2), color=255 if mode == "L" else (255,) * 3)
    array = big.permute(1, 2, 0).numpy()
    tile.paste(Image.fromarray(array[..., 0] if channels == 1 else array), (0, 0))
    draw, font = ImageDraw.Draw(tile), ImageFont.load_default(size=10)
    for k, line in enumerate(lines[:CAPTION_LINES]):
        draw.text((2, height + 1 + k * LINE_PX), line, fill=0 if mode == "L" else (0, 0, 0), font=font)
    out = torch.from_numpy(np.asarray(tile).copy())  # (H', W') or (H', W', 3)
    return out[None] if channels == 1 else out.permute(2, 0, 1)

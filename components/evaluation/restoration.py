"""Translate models judged as restoration: each held-out image x is degraded by its family's
documented degradation (`degrade`: a 4x bicubic downscale, a hole, …; computed on the CPU, masks and any
other randomness from a generator seeded by the evaluation seed: the same inputs on any device), restored by
the model and by each classical baseline (`baselines`: bicubic, mean fill, …), and every restoration
is scored against x: the lecture's super-resolution figure, in numbers and as a picture.

Everything is 8-bit, as a registered model is served: the degraded inputs (and masks) are quantised
as a request would send them, the model restores them as its pyfunc does, and every restoration is
quantised as to_uint8 does. So another registered version (a champion) sent the same inputs through
its pyfunc is scored on exactly the same footing (pipeline.rescore_registered). Pixels in [0, 1]:
- PSNR (dB): 10·log10(1 / MSE) per image, the MSE over its pixels and channels, capped at
  PSNR_CAP_DB; for a family whose degrade gives a mask, over the masked pixels only.
- SSIM (Wang et al., 2004; torchmetrics' 11-px Gaussian window): the per-pixel SSIM map averaged over
  the image; for a mask family, averaged over the masked pixels only (a masked pixel's window still
  covers known neighbours, so the fill's fit to its surroundings counts too).
A metric is the mean over images; its interval, a bootstrap over images (intervals.mean_interval).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

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
class Restorations:
    """Held-out images degraded and restored, all uint8 on the CPU: what every score and figure of a
    translate model is drawn from, made once per evaluation."""

    clean: torch.Tensor  # (N, C, H, W): the held-out images at the model's resolution
    inputs: torch.Tensor  # what a model is sent, as a request sends it (degrade's "images", 8-bit)
    mask: torch.Tensor | None  # (N, 1, H, W) of 0/1, 1 where the degradation removed pixels; mask families only
    outputs: dict[str, torch.Tensor]  # MODEL's restorations first, then each baseline's by name

    def with_model_outputs(self, outputs_u8: torch.Tensor) -> Restorations:
        """The same inputs and baselines with another model's restorations of them (a champion's)."""
        if outputs_u8.shape != self.clean.shape or outputs_u8.dtype != torch.uint8:
            raise ValueError(f"restorations: expected uint8 {tuple(self.clean.shape)}, "
                             f"got {outputs_u8.dtype} {tuple(outputs_u8.shape)}")
        baselines = {name: images for name, images in self.outputs.items() if name != MODEL}
        return replace(self, outputs={MODEL: outputs_u8, **baselines})

    def head(self, n: int) -> Restorations:
        return Restorations(clean=self.clean[:n], inputs=self.inputs[:n],
                            mask=None if self.mask is None else self.mask[:n],
                            outputs={name: images[:n] for name, images in self.outputs.items()})

    def scores(self) -> RestorationScores:
        """PSNR and SSIM of every restoration (the model's, each baseline's) against the originals."""
        if self.clean.shape[0] == 0:
            raise ValueError("no held-out images to restore: the evaluation needs at least 2")
        psnr: dict[str, list[torch.Tensor]] = {name: [] for name in self.outputs}
        ssim: dict[str, list[torch.Tensor]] = {name: [] for name in self.outputs}
        for start in range(0, self.clean.shape[0], BATCH):  # SSIM's intermediates grow with the batch
            part = slice(start, start + BATCH)
            mask = None if self.mask is None else self.mask[part].float()
            for name, images in self.outputs.items():
                p, s = pixel_scores(images[part], self.clean[part], mask)
                psnr[name].append(p)
                ssim[name].append(s)
        return RestorationScores(psnr={name: torch.cat(v) for name, v in psnr.items()},
                                 ssim={name: torch.cat(v) for name, v in ssim.items()}, masked=self.mask is not None)


@torch.no_grad()
def restore(model, images_u8: torch.Tensor, seed: int) -> Restorations:
    """Degrade uint8 images N×C×H×W (resized to the model's resolution), BATCH at a time with the
    degradation's randomness from one generator seeded by `seed`, and restore them: by the model
    exactly as it serves a request (8-bit inputs and mask, grid.translate_uint8), and by each
    baseline from the same 8-bit inputs."""
    from components.evaluation.grid import check_finite, translate_uint8

    model.eval()
    generator = torch.Generator().manual_seed(seed)
    parts: list[Restorations] = []
    for start in range(0, images_u8.shape[0], BATCH):
        # Degraded on the CPU: a GPU's bicubic rounds differently, and a champion re-scored elsewhere
        # must be sent the very same 8-bit inputs.
        x = to_model_input(images_u8[start:start + BATCH], model.image_size, "cpu")  # (n, C, H, W) in [-1, 1]
        degraded = model.degrade(x, generator)
        inputs_u8 = to_uint8(degraded["images"])
        mask_u8 = None if "mask" not in degraded else degraded["mask"].round().to(torch.uint8)
        sent = {"images": to_model_input(inputs_u8, inputs_u8.shape[-1], "cpu")}
        if mask_u8 is not None:
            sent["mask"] = mask_u8.float()
        baselines = model.baselines(sent)  # classical methods: no weights, on the CPU
        for name, images in baselines.items():
            check_finite(images, f"{name} restorations (from image {start})")
        outputs = {MODEL: translate_uint8(model, inputs_u8, mask_u8),
                   **{name: to_uint8(images).cpu() for name, images in baselines.items()}}
        parts.append(Restorations(clean=to_uint8(x), inputs=inputs_u8, mask=mask_u8, outputs=outputs))
    if not parts:
        empty = torch.zeros(0, model.channels, model.image_size, model.image_size, dtype=torch.uint8)
        return Restorations(clean=empty, inputs=empty, mask=None, outputs={MODEL: empty})
    return Restorations(clean=torch.cat([p.clean for p in parts]), inputs=torch.cat([p.inputs for p in parts]),
                        mask=None if parts[0].mask is None else torch.cat([p.mask for p in parts]),
                        outputs={name: torch.cat([p.outputs[name] for p in parts]) for name in parts[0].outputs})


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
    # In float32: torchmetrics' float64 convolutions took 8x the time and 1.7 GB per 500 images on a
    # CPU; the map moves by < 2e-5.
    _, ssim_map = structural_similarity_index_measure(restored.float(), clean.float(), data_range=1.0,
                                                      reduction="none", return_full_image=True)  # (N, C, H, W)
    ssim = (ssim_map.double() * weight).sum(dim=(1, 2, 3)) / area
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


# --- the figure: input, each baseline, the model, the original, with PSNR/SSIM under each ---------------

def figure_tiles(name: str, restorations: Restorations, rows: int,
                 max_tiles: int | None = None) -> tuple[torch.Tensor, int]:
    """The lecture's super-resolution figure for the first `rows` restored images, fewer where
    `max_tiles` images would not hold them all (at least one row): per row the input (nearest-upscaled
    to full size), each baseline, the model's restoration (captioned `name`) and the original; under
    each, its PSNR (dB) and SSIM against the original (inside the mask for a mask family). Returns the
    captioned tiles, uint8 (rows·columns, C, H', W'), row by row, and the number of columns (nrow)."""
    width = len(restorations.outputs) + 2  # input, the baselines, the model, the original
    rows = max(1, min(rows, restorations.clean.shape[0], (max_tiles or rows * width) // width))
    shown = restorations.head(rows)
    mask = None if shown.mask is None else shown.mask.float()
    columns = {"input": _full_size(shown.inputs, shown.clean),
               **{method: images for method, images in shown.outputs.items() if method != MODEL},
               name: shown.outputs[MODEL]}
    zoom = -(-FIGURE_SIDE // shown.clean.shape[-1])  # ceil
    side = f"{shown.inputs.shape[-2]}x{shown.inputs.shape[-1]}"  # the default font has no ×
    tiles = []
    for i in range(rows):
        for column, images in columns.items():
            if column == "input":
                caption = [f"input {side}" if mask is None else f"input, {float(mask[i].mean()):.0%} hole"]
            else:
                psnr, ssim = pixel_scores(images[i:i + 1], shown.clean[i:i + 1], None if mask is None else mask[i:i + 1])
                caption = [column, f"{float(psnr):.2f} dB  {float(ssim):.3f}"]
            tiles.append(_captioned(images[i], zoom, caption))
        tiles.append(_captioned(shown.clean[i], zoom,
                                ["original", "in mask: dB  SSIM" if mask is not None else "dB  SSIM"]))
    return torch.stack(tiles), width


def family_name(model) -> str:
    """What a figure calls the model's column: its family ("srgan")."""
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

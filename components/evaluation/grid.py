"""The images a model makes (samples, reconstructions, translations) as uint8 tensors, and grids of them as PNG files."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from components.images import to_model_input, to_uint8


class NonFiniteSamples(ValueError):
    """A model produced NaN or infinite pixels: they would silently become black or white uint8s."""


def grid_image(images_u8: torch.Tensor | np.ndarray, nrow: int | None = None) -> Image.Image:
    """N×C×H×W uint8 images as one picture, in a grid of `nrow` per row (one image: that image)."""
    images_u8 = torch.as_tensor(images_u8)
    nrow = nrow or math.ceil(math.sqrt(images_u8.shape[0]))
    grid = make_grid(images_u8, nrow=nrow, padding=2, pad_value=255)  # C×H×W uint8
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 or images_u8.shape[1] == 1 else array)


def png_bytes(images_u8: torch.Tensor | np.ndarray, nrow: int | None = None) -> bytes:
    """The PNG file of grid_image(images_u8, nrow)."""
    buffer = io.BytesIO()
    grid_image(images_u8, nrow).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(images_u8: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """Write N×C×H×W uint8 images as one PNG grid (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid_image(images_u8, nrow).save(tmp, format="PNG")
    tmp.replace(path)


def check_finite(images: torch.Tensor, what: str) -> None:
    bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
    if bad.any():
        raise NonFiniteSamples(f"{int(bad.sum())} of {images.shape[0]} {what} contain NaN or infinite pixels; "
                               f"the model's weights are probably broken: retrain it")


def _empty(model) -> torch.Tensor:
    return torch.zeros(0, model.channels, model.image_size, model.image_size, dtype=torch.uint8)


def sample_uint8(model, n: int, seed: int, labels: torch.Tensor | None = None, batch_size: int = 500,
                 prompts: list[str] | None = None, **options) -> torch.Tensor:
    """n samples at a fixed seed, uint8 N×C×H×W; the same seed gives the same images.

    Conditional models take class ids `labels` (n,) or text `prompts` (n strings); with neither,
    they draw their classes in turn (within each batch of `batch_size`). `options`: the sampler
    settings a family declares (Family.sampler_options: a diffusion model's steps and guidance).
    """
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    chunks = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        part = None if labels is None else labels[start:start + count]
        texts = None if prompts is None else prompts[start:start + count]
        images = model.sample(count, generator=generator, labels=part, prompts=texts, **options)
        check_finite(images, f"samples (seed {seed}, from image {start})")
        chunks.append(to_uint8(images.cpu()))
    return torch.cat(chunks) if chunks else _empty(model)


@torch.no_grad()
def complete_uint8(model, images_u8: torch.Tensor, rows_given: int, count: int, seed: int,
                   batch_size: int = 500) -> torch.Tensor:
    """`count` completions of each uint8 image N×C×H×W (of the model's size), drawn at a fixed seed:
    uint8 (N·count)×C×H×W, image 0's completions first. Each keeps its image's top `rows_given` rows
    bit for bit; the model draws the rows below given them (model.complete)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    repeated = images_u8.repeat_interleave(count, dim=0)
    chunks = []
    for start in range(0, repeated.shape[0], batch_size):
        x = to_model_input(repeated[start:start + batch_size], model.image_size, device)
        images = model.complete(x, rows_given, generator)  # (n, C, size, size) in [-1, 1]
        check_finite(images, f"completions (seed {seed}, from image {start})")
        chunks.append(to_uint8(images.cpu()))
    return torch.cat(chunks) if chunks else _empty(model)


@torch.no_grad()
def reconstruct_uint8(model, images_u8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Reconstructions of uint8 images N×C×H×W (resized to the model's resolution), uint8
    N×C×size×size."""
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    for start in range(0, images_u8.shape[0], batch_size):
        x = to_model_input(images_u8[start:start + batch_size], model.image_size, device)
        images = model.reconstruct(x)  # (n, C, size, size) in [-1, 1]
        check_finite(images, f"reconstructions (from image {start})")
        chunks.append(to_uint8(images.cpu()))
    return torch.cat(chunks) if chunks else _empty(model)


@torch.no_grad()
def translate_uint8(model, images_u8: torch.Tensor, mask_u8: torch.Tensor | None = None,
                    batch_size: int = 500) -> torch.Tensor:
    """What a translate model makes of uint8 inputs N×C×h×w (its family's input shape, not resized)
    and, for a family that takes one, masks N×1×h×w of 0/1 (1 where to fill in): uint8 N×C×H×W."""
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    for start in range(0, images_u8.shape[0], batch_size):
        inputs = {"images": to_model_input(images_u8[start:start + batch_size], images_u8.shape[-1], device)}
        if mask_u8 is not None:
            inputs["mask"] = mask_u8[start:start + batch_size].to(device).float()
        images = model.translate(inputs)  # (n, C, H, W) in [-1, 1]
        check_finite(images, f"translations (from image {start})")
        chunks.append(to_uint8(images.cpu()))
    return torch.cat(chunks) if chunks else _empty(model)


@torch.no_grad()
def encode_latents(model, images_u8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Latent codes of uint8 images N×C×H×W (resized to the model's resolution), float32 N×latent_dim."""
    device = next(model.parameters()).device
    model.eval()
    codes = [model.encode(to_model_input(images_u8[start:start + batch_size], model.image_size, device)).float().cpu()
             for start in range(0, images_u8.shape[0], batch_size)]
    return torch.cat(codes) if codes else torch.zeros(0, model.latent_dim)


def _restorations(model, reference_u8: torch.Tensor, seed: int) -> torch.Tensor:
    from components.evaluation.restoration import MODEL, restore

    return restore(model, reference_u8, seed).outputs[MODEL]


# The images an evaluation scores against the reference (held-out real) images, by the model's task
# kind: a sampler's samples, as many as the reference holds; a reconstructor's reconstructions of them;
# a translator's restorations of them, degraded at the seed (restoration.py).
EVALUATION_IMAGES = {
    "generate": lambda model, reference_u8, seed: sample_uint8(model, reference_u8.shape[0], seed),
    "reconstruct": lambda model, reference_u8, seed: reconstruct_uint8(model, reference_u8),
    "translate": _restorations,
}


def evaluation_images(model, kind: str, reference_u8: torch.Tensor, seed: int) -> torch.Tensor:
    """uint8 N×C×H×W images of `model` (a family of task `kind`) to score against `reference_u8`."""
    return EVALUATION_IMAGES[kind](model, reference_u8, seed)

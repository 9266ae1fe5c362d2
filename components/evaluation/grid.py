"""Sample grids as PNG files."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from components.images import to_uint8


class NonFiniteSamples(ValueError):
    """A model produced NaN or infinite pixels: they would silently become black or white uint8s."""


def save_grid(images_u8: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """Write N×C×H×W uint8 images as one PNG grid (atomically)."""
    nrow = nrow or math.ceil(math.sqrt(images_u8.shape[0]))
    grid = make_grid(images_u8, nrow=nrow, padding=2, pad_value=255)  # C×H×W uint8
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 or images_u8.shape[1] == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def sample_uint8(model, n: int, seed: int, labels: torch.Tensor | None = None, batch_size: int = 500) -> torch.Tensor:
    """n samples at a fixed seed, uint8 N×C×H×W; the same seed gives the same images."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    chunks = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        part = None if labels is None else labels[start:start + count]
        images = model.sample(count, generator=generator, labels=part)
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
        if bad.any():
            raise NonFiniteSamples(f"{int(bad.sum())} of {count} samples (seed {seed}, from image {start}) contain "
                                   f"NaN or infinite pixels; the model's weights are probably broken: retrain it")
        chunks.append(to_uint8(images.cpu()))
    return torch.cat(chunks) if chunks else torch.zeros(0, model.channels, model.image_size, model.image_size, dtype=torch.uint8)

"""Pictures for a registered version's report: an interpolation strip (a translate model's
restoration figure) and the nearest real neighbours of its samples (a memorisation check). All work
on uint8 images N×C×H×W."""
from __future__ import annotations

from typing import Callable

import torch

from components.images import resize, to_model_input, to_uint8
from components.models.base import GenerativeModel


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (n, d) at fractions t (steps,) → (n, steps, d).
    Gaussian draws live near a sphere; walking its great circle keeps the norm a draw has, where a
    straight line passes through unlikely short vectors (White, 2016, "Sampling Generative Networks")."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).clamp(-1, 1)  # (n,)
    omega = torch.arccos(cos)[:, None, None]  # (n, 1, 1)
    t = t[None, :, None]  # (1, steps, 1)
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6  # (anti)parallel draws: the straight line is as good
    wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / torch.where(straight, 1.0, sin))
    wb = torch.where(straight, t, torch.sin(t * omega) / torch.where(straight, 1.0, sin))
    return wa * a[:, None, :] + wb * b[:, None, :]


@torch.no_grad()
def _sampler_strip(model: GenerativeModel, reference_u8: torch.Tensor, rows: int, steps: int,
                   seed: int) -> torch.Tensor:
    """Each row walks between two prior draws; a conditional model keeps one class per row."""
    generator = torch.Generator().manual_seed(seed)
    a, b = model.noise(rows, generator), model.noise(rows, generator)
    z = slerp(a.cpu(), b.cpu(), torch.linspace(0, 1, steps)).flatten(0, 1).to(a.device)  # (rows·steps, d)
    labels = None
    if model.conditional:
        labels = (torch.arange(rows) % model.num_classes).repeat_interleave(steps)
    return to_uint8(model.from_noise(z, labels=labels)).cpu()


@torch.no_grad()
def _autoencoder_strip(model: GenerativeModel, reference_u8: torch.Tensor, rows: int, steps: int,
                       seed: int) -> torch.Tensor:
    """Each row walks in a straight line between the codes of two held-out images (an autoencoder
    has no prior to draw from): its first and last images are their reconstructions."""
    device = next(model.parameters()).device
    pick = torch.randperm(reference_u8.shape[0], generator=torch.Generator().manual_seed(seed))[: 2 * rows]
    codes = model.encode(to_model_input(reference_u8[pick], model.image_size, device))  # (2·rows, d)
    a, b = codes[:rows], codes[rows:]
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]
    z = ((1 - t) * a[:, None, :] + t * b[:, None, :]).flatten(0, 1)
    return to_uint8(model.decode(z)).cpu()


@torch.no_grad()
def _restoration_strip(model: GenerativeModel, reference_u8: torch.Tensor, rows: int, steps: int,
                       seed: int) -> torch.Tensor:
    """A translate model has no latent space to walk: its rows are the lecture's super-resolution
    figure (input, baselines, model, original, with PSNR/SSIM) of `rows` held-out images picked at
    the seed; `steps` is unused (the columns are the family's baselines)."""
    from components.evaluation.restoration import family_name, figure_tiles, restore

    pick = torch.randperm(reference_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
    tiles, _ = figure_tiles(family_name(model), restore(model, reference_u8[pick], seed), rows)
    return tiles


@torch.no_grad()
def _completion_strip(model: GenerativeModel, reference_u8: torch.Tensor, rows: int, steps: int,
                      seed: int) -> torch.Tensor:
    """A model that draws pixel by pixel has no latent space to walk: its rows are `rows` held-out
    images picked at the seed, each as its top half, steps − 2 completions of it, and the original."""
    from components.evaluation.pictures import completion_rows

    pick = torch.randperm(reference_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
    return completion_rows(model, reference_u8[pick], max(steps - 2, 1), seed)


# How a model of each task kind walks between two of its images (a translate model: from input to
# original; a model that completes images: from its given half to its completions).
STRIPS: dict[str, Callable[..., torch.Tensor]] = {"generate": _sampler_strip, "reconstruct": _autoencoder_strip,
                                                  "translate": _restoration_strip, "complete": _completion_strip}


def strip_kind(model: GenerativeModel, kind: str) -> str:
    """Which of STRIPS draws `model`, of task `kind`."""
    return "complete" if hasattr(model, "complete") else kind


def interpolation_strip(model: GenerativeModel, kind: str, reference_u8: torch.Tensor, rows: int = 4,
                        steps: int = 10, seed: int = 0) -> torch.Tensor:
    """rows × steps uint8 images (rows·steps, C, H, W), row by row: one row per walk between two
    latent points, `steps` images along it."""
    model.eval()
    return STRIPS[strip_kind(model, kind)](model, reference_u8, rows, steps, seed)


def nearest_real(samples_u8: torch.Tensor, real_u8: torch.Tensor, k: int = 3,
                 chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The k real images nearest each sample in pixel space (Euclidean, pixels in [0, 1], compared
    at the real images' size): (indices (n, k) into real_u8, distances (n, k)), nearest first.
    A sample at distance ≈ 0 is a copy of a training image."""
    size = real_u8.shape[-1]
    samples = resize(samples_u8.float() / 255, size).flatten(1)  # (n, D)
    best_d = torch.full((samples.shape[0], 0), float("inf"))
    best_i = torch.zeros((samples.shape[0], 0), dtype=torch.long)
    for start in range(0, real_u8.shape[0], chunk):
        real = real_u8[start:start + chunk].float().flatten(1) / 255  # (m, D)
        d = torch.cdist(samples, real)  # (n, m)
        d_all = torch.cat([best_d, d], dim=1)
        i_all = torch.cat([best_i, torch.arange(start, start + real.shape[0]).expand(samples.shape[0], -1)], dim=1)
        best_d, order = d_all.topk(min(k, d_all.shape[1]), dim=1, largest=False)
        best_i = i_all.gather(1, order)
    return best_i, best_d


def neighbour_rows(samples_u8: torch.Tensor, real_u8: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each sample followed by its nearest real images: ((k+1)·n, C, H, W) at the real images' size."""
    size = real_u8.shape[-1]
    samples = resize(samples_u8.float(), size).round().clamp(0, 255).to(torch.uint8)
    rows = [torch.cat([samples[i:i + 1], real_u8[indices[i]]]) for i in range(samples.shape[0])]
    return torch.cat(rows)

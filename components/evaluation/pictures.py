"""Pictures of a model's latent space, written by the evaluate stage into its `pictures/` folder.

- Latent traversal (models with `gaussian_prior`: z ~ N(0, I) decodes through `decode(z[, labels])`):
  one PNG per seed; row r varies one latent dimension from −3σ to +3σ around that seed's draw, the
  others held fixed (Higgins et al., 2017, "β-VAE", Fig. 1), so the centre column is the seed's own
  sample in every row.
- Latent space (models with `encode`): held-out images' codes projected on their first two principal
  components, one colour per class: an autoencoder's clustered, gappy latent space beside a VAE's.
- Growth (models with `samples_by_resolution`, the progressive GAN): a row per resolution grown, the
  same draws in every column, each image enlarged (nearest) to the model's size.
- Completions (models with `complete`): a row per held-out image, of its top half alone, several
  completions of its bottom half, and the image itself (Chen et al., 2020, "Generative Pretraining
  from Pixels", Fig. 1).
Which picture a model gets follows from what it declares, never from its family's name.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from components.evaluation.grid import save_grid
from components.images import to_model_input, to_uint8
from components.models.base import GenerativeModel

TRAVERSAL_DIMS = 10    # rows: the most used latent dimensions, at most this many
TRAVERSAL_STEPS = 9    # columns: −3σ … +3σ
TRAVERSAL_SEEDS = 3    # PNGs, from seeds seed, seed+1, …
COMPLETION_ROWS = 8    # held-out images, one of each class in turn
COMPLETIONS = 5        # completions of each
GROWTH_SAMPLES = 8     # columns of the growth picture
SCATTER_POINTS = 2000  # held-out images in the latent-space picture
BATCH = 500


def write_pictures(model: GenerativeModel, images_u8: torch.Tensor, labels: torch.Tensor, classes: list[str],
                   out_dir: Path, seed: int) -> list[Path]:
    """Write every picture `model` supports into out_dir (created even when none applies); return their paths.

    images_u8/labels: held-out images (uint8 N×C×H×W) and their class ids; classes: the class names.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    written: list[Path] = []
    if getattr(model, "gaussian_prior", False):
        dims = used_dimensions(model, images_u8, labels, TRAVERSAL_DIMS)
        for i in range(TRAVERSAL_SEEDS):
            label = i % len(classes) if model.conditional else None  # a conditional model: one class per picture
            name = f"traversal-seed{seed + i}" + (f"-class{label}" if label is not None else "") + ".png"
            save_grid(to_uint8(traversal(model, dims, seed + i, label).cpu()), out_dir / name, nrow=TRAVERSAL_STEPS)
            written.append(out_dir / name)
    if hasattr(model, "encode") and images_u8.shape[0] > 0:
        path = out_dir / "latent-space.png"
        pick = torch.randperm(images_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:SCATTER_POINTS]
        codes = latent_codes(model, images_u8[pick], labels[pick])
        save_scatter(project_2d(codes), labels[pick], classes, path,
                     title=f"{type(model).__name__} latent space: held-out images, first two principal components")
        written.append(path)
    if hasattr(model, "samples_by_resolution"):
        path = out_dir / "resolutions.png"
        save_grid(growth_rows(model, seed), path, nrow=GROWTH_SAMPLES)
        written.append(path)
    if hasattr(model, "complete") and images_u8.shape[0] > 0:
        path = out_dir / "completions.png"
        picks = [int(torch.nonzero(labels == k)[0]) for k in labels.unique().tolist()]  # one of each class in turn
        picks = (picks * COMPLETION_ROWS)[:COMPLETION_ROWS]
        save_grid(completion_rows(model, images_u8[picks], COMPLETIONS, seed), path, nrow=COMPLETIONS + 2)
        written.append(path)
    return written


def growth_rows(model: GenerativeModel, seed: int, samples: int = GROWTH_SAMPLES) -> torch.Tensor:
    """uint8 (resolutions·samples, C, size, size): row r holds the same `samples` draws at the r-th
    resolution grown, lowest first, enlarged to the model's size."""
    z = model.noise(samples, torch.Generator().manual_seed(seed))
    rows = [torch.nn.functional.interpolate(images, size=model.image_size, mode="nearest")
            for _, images in model.samples_by_resolution(z)]
    return to_uint8(torch.cat(rows).cpu())


def completion_rows(model: GenerativeModel, originals: torch.Tensor, completions: int, seed: int) -> torch.Tensor:
    """uint8 (rows·(completions + 2), C, H, W), row by row: an image of `originals` (uint8 rows×C×H×W)
    with its bottom half grey, `completions` completions of its top half, the image itself."""
    from components.evaluation.grid import complete_uint8

    rows, given_rows = originals.shape[0], model.image_size // 2
    completed = complete_uint8(model, originals, given_rows, completions, seed)  # (rows·completions, C, H, W)
    given = originals.clone()
    given[:, :, given_rows:] = 128
    return torch.cat([given[:, None], completed.view(rows, completions, *originals.shape[1:]), originals[:, None]],
                     dim=1).flatten(0, 1)


def traversal_codes(z0: torch.Tensor, dims: list[int], steps: int = TRAVERSAL_STEPS) -> torch.Tensor:
    """z0 (latent,) → codes (len(dims)·steps, latent): row r is z0 with z0[dims[r]] moved by −3 … +3."""
    offsets = torch.linspace(-3.0, 3.0, steps, dtype=z0.dtype, device=z0.device)  # σ = 1 under N(0, I)
    codes = z0.repeat(len(dims), steps, 1)  # (rows, steps, latent)
    for r, d in enumerate(dims):
        codes[r, :, d] += offsets
    return codes.flatten(0, 1)


@torch.no_grad()
def traversal(model: GenerativeModel, dims: list[int], seed: int, label: int | None = None) -> torch.Tensor:
    """Decoded traversal images in [-1, 1], (len(dims)·TRAVERSAL_STEPS, C, H, W), row-major."""
    z0 = model.noise(1, torch.Generator().manual_seed(seed))[0]  # (latent,)
    codes = traversal_codes(z0, dims)
    if label is None:
        return model.decode(codes)
    return model.decode(codes, torch.full((codes.shape[0],), label, dtype=torch.long))


@torch.no_grad()
def _posteriors(model: GenerativeModel, images_u8: torch.Tensor, labels: torch.Tensor):
    """The encoder's output for held-out images, batch by batch: a tensor of codes, or (mean, log-variance)."""
    device = next(model.parameters()).device
    for start in range(0, images_u8.shape[0], BATCH):
        x = to_model_input(images_u8[start:start + BATCH], model.image_size, device)
        yield model.encode(x, labels[start:start + BATCH]) if model.conditional else model.encode(x)


def latent_codes(model: GenerativeModel, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, latent) codes of held-out images on the CPU; a VAE's code is its posterior mean."""
    return torch.cat([(out[0] if isinstance(out, tuple) else out).float().cpu()
                      for out in _posteriors(model, images_u8, labels)])


def used_dimensions(model: GenerativeModel, images_u8: torch.Tensor, labels: torch.Tensor, k: int) -> list[int]:
    """The k latent dimensions with the largest mean KL(q(z_d|x) || N(0, 1)) over held-out images:
    the ones the model uses (a β-VAE leaves many at the prior, and their rows would be blank).
    In index order; the first k when there are no images or no encoder."""
    if images_u8.shape[0] == 0 or not hasattr(model, "encode"):
        return list(range(min(k, model.latent_dim)))
    kl = torch.zeros(model.latent_dim)
    for mu, logvar in _posteriors(model, images_u8[:SCATTER_POINTS], labels[:SCATTER_POINTS]):
        kl += (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).float().sum(dim=0).cpu()
    return sorted(kl.topk(min(k, model.latent_dim)).indices.tolist())


def project_2d(codes: torch.Tensor) -> torch.Tensor:
    """(N, latent) → (N, 2): coordinates on the first two principal components (zeros where latent < 2)."""
    centred = codes - codes.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # rows of vh: principal directions
    coords = centred @ vh[:2].T  # (N, min(2, latent))
    return torch.cat([coords, torch.zeros(codes.shape[0], 2 - coords.shape[1])], dim=1)


def save_scatter(points: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """A 2-D scatter (N, 2) coloured by class with a legend of class names, as a PNG, atomically."""
    import matplotlib  # slow import, and only the evaluate stage draws
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state to touch

    fig = Figure(figsize=(7, 6), dpi=100, layout="constrained")  # 700×600 px, drawn by the Agg canvas
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    xy = points.numpy()
    for k, name in enumerate(classes):
        mine = (labels == k).numpy()
        if mine.any():
            ax.scatter(xy[mine, 0], xy[mine, 1], s=6, alpha=0.7, color=cmap(k % cmap.N), label=name)
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title, fontsize=9)
    fig.legend(loc="outside right center", fontsize=8, markerscale=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)

"""Evaluate one trained model, or a set of its samples, against held-out real images."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from components.config import ClassifierConfig, EvaluateConfig
from components.evaluation.classifier import Classifier
from components.evaluation.grid import evaluation_images, save_grid
from components.evaluation.metrics import METRICS, EvalContext, skipped_for_kind
from components.images import resize, to_model_input
from components.models.base import GenerativeModel, TaskKind

if TYPE_CHECKING:
    from components.evaluation.inception import InceptionReference
    from components.evaluation.restoration import Restorations


class NonFiniteMetric(ValueError):
    """A metric came out NaN or infinite: the score cannot be compared, so nothing is registered."""


def reference_indices(num_held_out: int, cfg: EvaluateConfig) -> torch.Tensor:
    """Which held-out images every score under `cfg` is compared with: a seeded random subset, so a
    split stored class by class still gives a reference of every class."""
    if num_held_out < 2:
        raise ValueError(f"evaluation needs at least 2 held-out images, the test split has {num_held_out}")
    pick = torch.randperm(num_held_out, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.num_samples]
    return pick.sort().values


def reference_subset(real_u8: torch.Tensor, cfg: EvaluateConfig) -> torch.Tensor:
    return real_u8[reference_indices(real_u8.shape[0], cfg)]


def score_samples(fake_u8: torch.Tensor, real_u8: torch.Tensor, classifier: Classifier, cfg: EvaluateConfig,
                  image_size: int, model: GenerativeModel | None = None,
                  real_labels: torch.Tensor | None = None, train_u8: torch.Tensor | None = None,
                  train_labels: torch.Tensor | None = None, classifier_config: ClassifierConfig | None = None,
                  inception: InceptionReference | None = None, kind: TaskKind = "generate",
                  restorations: Restorations | None = None) -> dict[str, float]:
    """Metrics in cfg.metrics of uint8 samples against the reference subset of real_u8, both
    compared at `image_size` (the protocol's, whatever size the samples come in).

    Everything is computed on the classifier's device. `model` is needed only by metrics that use
    the model itself (recon_mse, psnr, ssim, elbo); without it they are skipped. `real_labels`
    (class ids of real_u8) let a conditional model's ELBO and CAS be measured; `train_u8` (real
    training images) the dataset's fid_floor, with `train_labels` augment; `classifier_config` (the
    `classifier:` params) CAS and augment; `inception` (the inception stage's reference) and the
    model's task `kind` the inception metric; a translate model's `restorations` of the reference
    (restoration.restore, `fake` being their MODEL outputs) its psnr and ssim. Metrics that mean nothing for the kind
    (metrics.NOT_FOR_KIND) are skipped; skipped_for_kind says why.
    """
    pick = reference_indices(real_u8.shape[0], cfg)
    real_u8 = real_u8[pick]
    if restorations is not None and restorations.clean.shape[0] != real_u8.shape[0]:
        raise ValueError(f"restorations of {restorations.clean.shape[0]} images for a reference of "
                         f"{real_u8.shape[0]}: restore the reference subset itself")
    device = next(classifier.parameters()).device
    ctx = EvalContext(
        model=model,
        classifier=classifier,
        real=to_model_input(real_u8, image_size, device),
        fake=to_model_input(fake_u8, image_size, device),
        kid_subset_size=cfg.kid_subset_size,
        nearest_k=cfg.nearest_k,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        real_labels=None if real_labels is None else torch.as_tensor(real_labels)[pick],
        train_u8=train_u8,
        classifier_config=classifier_config,
        train_labels=train_labels,
        augment=cfg.augment,
        inception=inception,
        kind=kind,
        restorations=restorations,
    )
    results: dict[str, float] = {"num_samples": real_u8.shape[0]}
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG: same model, same score
        torch.manual_seed(cfg.seed)
        skipped = skipped_for_kind(cfg.metrics, kind)
        for name in cfg.metrics:
            if name not in skipped:
                results.update(METRICS.get(name)(ctx))
    bad = {k: v for k, v in results.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteMetric(f"evaluation produced non-finite metric(s) {bad}; nothing is registered from it")
    return results


def evaluate_model(model: GenerativeModel, classifier: Classifier, real_u8: torch.Tensor, cfg: EvaluateConfig,
                   grid_path: Path | None = None, kind: TaskKind = "generate",
                   real_labels: torch.Tensor | None = None, train_u8: torch.Tensor | None = None,
                   train_labels: torch.Tensor | None = None, classifier_config: ClassifierConfig | None = None,
                   inception: InceptionReference | None = None) -> dict[str, float]:
    """Metrics in cfg.metrics of the model's images against the reference subset of held-out real
    images, by its family's task `kind` (draw_images), and its grid (evaluation_grid) at grid_path."""
    reference = reference_subset(real_u8, cfg)
    fake, restorations = draw_images(model, kind, reference, cfg.seed)
    results = score_samples(fake, real_u8, classifier, cfg, model.image_size, model=model, real_labels=real_labels,
                            train_u8=train_u8, train_labels=train_labels, classifier_config=classifier_config,
                            inception=inception, kind=kind, restorations=restorations)
    if grid_path is not None:
        images, nrow = evaluation_grid(model, kind, fake, reference, cfg.grid_size, restorations)
        save_grid(images, grid_path, nrow=nrow)
    return results


def draw_images(model: GenerativeModel, kind: TaskKind, reference_u8: torch.Tensor,
                seed: int) -> tuple[torch.Tensor, Restorations | None]:
    """The model's uint8 images to score against `reference_u8`: a sampler's samples at `seed`, as many
    as the reference holds; a reconstructor's reconstructions of it; a translator's restorations of it,
    with the inputs and baselines they came with (degraded and restored once: scores and figure share them)."""
    if kind != "translate":
        return evaluation_images(model, kind, reference_u8, seed), None
    from components.evaluation.restoration import MODEL, restore

    restorations = restore(model, reference_u8, seed)
    return restorations.outputs[MODEL], restorations


def evaluation_grid(model: GenerativeModel, kind: TaskKind, images: torch.Tensor, reference: torch.Tensor,
                    grid_size: int, restorations: Restorations | None = None,
                    name: str | None = None) -> tuple[torch.Tensor, int | None]:
    """What an evaluation shows of `images` (as draw_images made them): (tiles, nrow or None for a
    square grid). A translator's: the lecture's super-resolution figure of its restorations, its
    column captioned `name` (default: the family), as many rows as grid_size images fill."""
    if restorations is not None:
        from components.evaluation.restoration import family_name, figure_tiles

        return figure_tiles(name or family_name(model), restorations, rows=grid_size, max_tiles=grid_size)
    return GRIDS[kind](model, images, reference, grid_size)


def _sample_grid(model: GenerativeModel, fake: torch.Tensor, reference: torch.Tensor, grid_size: int):
    return fake[:grid_size], None


def _reconstruction_grid(model: GenerativeModel, fake: torch.Tensor, reference: torch.Tensor, grid_size: int):
    """Each real image beside its reconstruction: pairs side by side, as square a grid as fits."""
    pairs = max(1, min(grid_size // 2, fake.shape[0]))
    real = resize(reference[:pairs].float(), model.image_size).round().clamp(0, 255).to(torch.uint8)
    interleaved = torch.stack([real, fake[:pairs]], dim=1).flatten(0, 1)  # (2·pairs, C, H, W): real, recon, …
    return interleaved, 2 * max(1, round(math.sqrt(pairs / 2)))


# What an evaluation's grid shows, by task kind: (images, nrow or None for a square grid), from
# (model, its images as evaluation_images makes them, the reference they were made from, grid_size).
# A translate model's is the figure of its restorations (restoration.figure_tiles).
GRIDS = {"generate": _sample_grid, "reconstruct": _reconstruction_grid}

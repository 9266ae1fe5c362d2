"""Evaluate one trained model, or a set of its samples, against held-out real images."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from components.config import EvaluateConfig
from components.evaluation.classifier import Classifier
from components.evaluation.grid import sample_uint8, save_grid
from components.evaluation.metrics import METRICS, EvalContext
from components.models.base import GenerativeModel
from components.images import to_model_input


class NonFiniteMetric(ValueError):
    """A metric came out NaN or infinite: the score cannot be compared, so nothing is registered."""


def reference_subset(real_u8: torch.Tensor, cfg: EvaluateConfig) -> torch.Tensor:
    """The held-out images every score under `cfg` is compared with: a seeded random subset, so a
    split stored class by class still gives a reference of every class."""
    pick = torch.randperm(real_u8.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.num_samples]
    real_u8 = real_u8[pick.sort().values]
    if real_u8.shape[0] < 2:
        raise ValueError(f"evaluation needs at least 2 held-out images, the test split has {real_u8.shape[0]}")
    return real_u8


def score_samples(fake_u8: torch.Tensor, real_u8: torch.Tensor, classifier: Classifier, cfg: EvaluateConfig,
                  image_size: int, model: GenerativeModel | None = None) -> dict[str, float]:
    """Metrics in cfg.metrics of uint8 samples against the reference subset of real_u8, both
    compared at `image_size` (the protocol's, whatever size the samples come in).

    Everything is computed on the classifier's device. `model` is needed only by metrics that use
    the model itself (recon_mse); without it they are skipped.
    """
    real_u8 = reference_subset(real_u8, cfg)
    device = next(classifier.parameters()).device
    ctx = EvalContext(
        model=model,
        classifier=classifier,
        real=to_model_input(real_u8, image_size, device),
        fake=to_model_input(fake_u8, image_size, device),
        kid_subset_size=cfg.kid_subset_size,
    )
    results: dict[str, float] = {"num_samples": real_u8.shape[0]}
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG: same model, same score
        torch.manual_seed(cfg.seed)
        for name in cfg.metrics:
            results.update(METRICS.get(name)(ctx))
    bad = {k: v for k, v in results.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteMetric(f"evaluation produced non-finite metric(s) {bad}; nothing is registered from it")
    return results


def evaluate_model(model: GenerativeModel, classifier: Classifier, real_u8: torch.Tensor, cfg: EvaluateConfig,
                   grid_path: Path | None = None) -> dict[str, float]:
    """Metrics in cfg.metrics comparing cfg.num_samples samples (fixed seed) with held-out real images."""
    n = reference_subset(real_u8, cfg).shape[0]
    fake = sample_uint8(model, n, seed=cfg.seed)
    results = score_samples(fake, real_u8, classifier, cfg, model.image_size, model=model)
    if grid_path is not None:
        save_grid(fake[: cfg.grid_size], grid_path)
    return results

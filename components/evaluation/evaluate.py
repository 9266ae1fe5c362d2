"""Evaluate one trained model against held-out real images."""
from __future__ import annotations

from pathlib import Path

import torch

from components.config import EvaluateConfig
from components.evaluation.classifier import Classifier
from components.evaluation.grid import sample_uint8, save_grid
from components.evaluation.metrics import METRICS, EvalContext
from components.models.base import GenerativeModel
from components.training.trainer import to_model_input


def evaluate_model(model: GenerativeModel, classifier: Classifier, real_u8: torch.Tensor, cfg: EvaluateConfig,
                   grid_path: Path | None = None) -> dict[str, float]:
    """Metrics in cfg.metrics comparing cfg.num_samples samples (fixed seed) with held-out real images."""
    # A seeded random subset: a split stored class by class must still give a reference of every class.
    pick = torch.randperm(real_u8.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.num_samples]
    real_u8 = real_u8[pick.sort().values]
    n = real_u8.shape[0]
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 held-out images, the test split has {n}")
    device = next(model.parameters()).device
    fake = sample_uint8(model, n, seed=cfg.seed)
    ctx = EvalContext(
        model=model,
        classifier=classifier,
        real=to_model_input(real_u8, model.image_size, device).cpu(),
        fake=fake.float().div(127.5).sub(1),
        kid_subset_size=cfg.kid_subset_size,
    )
    results: dict[str, float] = {"num_samples": n}
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG: same model, same score
        torch.manual_seed(cfg.seed)
        for name in cfg.metrics:
            results.update(METRICS.get(name)(ctx))
    if grid_path is not None:
        save_grid(fake[: cfg.grid_size], grid_path)
    return results

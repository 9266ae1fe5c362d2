"""k-nearest-neighbour manifold metrics on feature sets, computed in row chunks (memory bounded by
CHUNK × N distances, whatever the set sizes).

Improved precision and recall: Kynkäänniemi et al., 2019, "Improved Precision and Recall Metric for
Assessing Generative Models". Density and coverage: Naeem et al., 2020, "Reliable Fidelity and
Diversity Metrics for Generative Models". Each set's manifold is the union of balls around its
points, each ball reaching that point's k-th nearest neighbour in the same set.
"""
from __future__ import annotations

import torch

CHUNK = 1024  # rows of a distance matrix held at once


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances, via ‖a‖² + ‖b‖² − 2·a·b (a matrix product)."""
    return ((a * a).sum(dim=1, keepdim=True) + (b * b).sum(dim=1) - 2 * a @ b.T).clamp_min(0)


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) squared distance from each point to its k-th nearest other point in the same set."""
    features = features.float()
    radii = [squared_distances(rows, features).kthvalue(k + 1, dim=1).values  # k + 1: each point is its own 0-th
             for rows in features.split(CHUNK)]
    return torch.cat(radii)


def manifold_scores(real: torch.Tensor, fake: torch.Tensor, k: int,
                    real_radii: torch.Tensor | None = None) -> dict[str, float]:
    """precision (share of fakes inside the real manifold), recall (share of reals inside the fake
    manifold), density (mean count of real balls holding each fake, over k: ≈ 1 for two samples of
    one distribution) and coverage (share of real balls that hold a fake)."""
    for name, n in (("real", real.shape[0]), ("generated", fake.shape[0])):
        if n <= k:
            raise ValueError(f"evaluate.nearest_k = {k} needs more than {k} {name} images, got {n}; "
                             "lower evaluate.nearest_k or raise evaluate.num_samples")
    real, fake = real.float(), fake.float()
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k)
    fakes_inside = 0
    balls_holding = 0
    real_covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    real_recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for start in range(0, fake.shape[0], CHUNK):
        distances = squared_distances(fake[start:start + CHUNK], real)  # (chunk, N_real)
        in_real_ball = distances <= real_radii  # fake j lies in real i's ball
        fakes_inside += int(in_real_ball.any(dim=1).sum())
        balls_holding += int(in_real_ball.sum())
        real_covered |= in_real_ball.any(dim=0)
        real_recalled |= (distances <= fake_radii[start:start + CHUNK, None]).any(dim=0)  # real i in fake j's ball
    return {
        "precision": fakes_inside / fake.shape[0],
        "recall": float(real_recalled.float().mean()),
        "density": balls_holding / (k * fake.shape[0]),
        "coverage": float(real_covered.float().mean()),
    }

"""The evaluator classifier's features and class probabilities, extracted once per image set, and
FID/KID computed from them with torchmetrics' own formulas (so a score equals what torchmetrics'
image metrics give on the same images, without extracting the features once per metric)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from components.evaluation.classifier import INPUT_SIZE, Classifier, NonFiniteFeatures
from components.images import resize

KID_SUBSETS = 50  # torchmetrics' KernelInceptionDistance default, which the scores have always used


@dataclass(frozen=True)
class FeatureSet:
    features: torch.Tensor  # (N, FEATURES) float32: the classifier's penultimate activations
    probs: torch.Tensor  # (N, classes): its class probabilities p(y|x)

    def __len__(self) -> int:
        return self.features.shape[0]


def check_finite(features: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(features).all():
        raise NonFiniteFeatures("the evaluator classifier's features are NaN or infinite; retrain it "
                                "(genpipe classifier) before evaluating")
    return features


@torch.no_grad()
def extract(classifier: Classifier, images: torch.Tensor, batch_size: int = 500) -> FeatureSet:
    """Features and class probabilities of images in [-1, 1] (N, C, H, W), any size, in one pass;
    computed (and left) on the classifier's device."""
    classifier.eval()
    device = next(classifier.parameters()).device
    features, probs = [], []
    for chunk in images.split(batch_size):
        f = check_finite(classifier.features(resize(chunk.to(device), INPUT_SIZE)))  # (n, FEATURES)
        features.append(f)
        probs.append(classifier.head(f).softmax(dim=1))  # (n, classes)
    if not features:
        raise ValueError("no images to extract features from")
    return FeatureSet(torch.cat(features), torch.cat(probs))


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d) in float64, as torchmetrics' FID accumulates them."""
    f = features.double()
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n}")
    mean = f.mean(dim=0)
    return mean, (f.T @ f - n * torch.outer(mean, mean)) / (n - 1)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017)."""
    from torchmetrics.image.fid import _compute_fid  # slow import (~4 s): only when measuring

    mean_real, cov_real = gaussian_stats(real)
    mean_fake, cov_fake = gaussian_stats(fake)
    return float(_compute_fid(mean_real, cov_real, mean_fake, cov_fake))


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int = KID_SUBSETS) -> tuple[float, float]:
    """Kernel distance (Bińkowski et al., 2018): the unbiased polynomial-kernel MMD² averaged over
    random subsets, exactly as torchmetrics' KernelInceptionDistance.compute draws them (from the
    global RNG: seed it for a repeatable score). Returns (mean, std) over the subsets."""
    from torchmetrics.image.kid import poly_mmd

    subset_size = min(subset_size, real.shape[0], fake.shape[0])
    if subset_size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    scores = []
    for _ in range(subsets):
        f_real = real[torch.randperm(real.shape[0])[:subset_size]]
        f_fake = fake[torch.randperm(fake.shape[0])[:subset_size]]
        scores.append(poly_mmd(f_real, f_fake))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))

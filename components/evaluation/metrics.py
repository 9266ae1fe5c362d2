"""Metrics, found by name in METRICS. Each takes an EvalContext and returns a flat dict; the same
dict goes to metrics.json (DVC) and MLflow."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from components.evaluation.classifier import Classifier, FeatureExtractor, predict
from components.models.base import GenerativeModel
from components.registry import Registry


@dataclass
class EvalContext:
    model: GenerativeModel | None  # None when scoring stored samples: model-based metrics skip
    classifier: Classifier
    real: torch.Tensor  # held-out real images, float in [-1, 1]
    fake: torch.Tensor  # generated images, float in [-1, 1]
    kid_subset_size: int
    batch_size: int = 500


METRICS: Registry[Callable[[EvalContext], dict[str, float]]] = Registry("metric")


def _feed(metric, images: torch.Tensor, real: bool, batch_size: int) -> None:
    # torchmetrics moves neither its states nor the inputs: both go where the extractor runs.
    for chunk in images.split(batch_size):
        metric.update(chunk.to(metric.device), real=real)


def _on_extractor_device(metric_class, extractor: torch.nn.Module, **kwargs):
    """A torchmetrics image metric whose states live where `extractor` runs (FID/KID on a GPU)."""
    return metric_class(feature=extractor, **kwargs).to(next(extractor.parameters()).device)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, extractor: torch.nn.Module, batch_size: int = 500) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance  # slow import (~4 s): only when measuring

    fid = _on_extractor_device(FrechetInceptionDistance, extractor, reset_real_features=True)
    _feed(fid, real, True, batch_size)
    _feed(fid, fake, False, batch_size)
    return float(fid.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, extractor: torch.nn.Module, subset_size: int,
                    batch_size: int = 500) -> tuple[float, float]:
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(subset_size, real.shape[0], fake.shape[0])
    kid = _on_extractor_device(KernelInceptionDistance, extractor, subset_size=subset_size, subsets=50)
    _feed(kid, real, True, batch_size)
    _feed(kid, fake, False, batch_size)
    mean, std = kid.compute()
    return float(mean), float(std)


@METRICS.register("fid")
def fid_metric(ctx: EvalContext) -> dict[str, float]:
    return {"fid": frechet_distance(ctx.real, ctx.fake, FeatureExtractor(ctx.classifier), ctx.batch_size)}


@METRICS.register("kid")
def kid_metric(ctx: EvalContext) -> dict[str, float]:
    mean, std = kernel_distance(ctx.real, ctx.fake, FeatureExtractor(ctx.classifier), ctx.kid_subset_size, ctx.batch_size)
    return {"kid": mean, "kid_std": std}


@METRICS.register("class_coverage")
def class_coverage(ctx: EvalContext) -> dict[str, float]:
    """How many classes the samples cover (each ≥ half its fair share) and how confidently."""
    probs = predict(ctx.classifier, ctx.fake)
    k = probs.shape[1]
    share = torch.bincount(probs.argmax(dim=1), minlength=k).float() / probs.shape[0]
    return {"classes_covered": int((share >= 0.5 / k).sum()), "sample_confidence": float(probs.max(dim=1).values.mean())}


@METRICS.register("recon_mse")
def recon_mse(ctx: EvalContext) -> dict[str, float]:
    """Mean squared reconstruction error in [0, 1] pixel units; only models that reconstruct."""
    if not hasattr(ctx.model, "reconstruct"):
        return {}
    device = next(ctx.model.parameters()).device
    errors = [
        ((ctx.model.reconstruct(x.to(device)).cpu() - x.cpu()) / 2).pow(2).mean(dim=(1, 2, 3))
        for x in ctx.real.split(ctx.batch_size)
    ]
    return {"recon_mse": float(torch.cat(errors).mean())}

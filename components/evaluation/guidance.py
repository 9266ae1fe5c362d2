"""The guidance trade-off of a model sampled with classifier-free guidance (Ho & Salimans, 2022, Fig. 1):
at each guidance scale, how often the evaluator classifier labels a sample as the class it was asked
for (agreement), against the domain FID of the samples to held-out images (diversity and fidelity).
More guidance follows the condition more closely and, past a point, narrows each class to fewer
looks: agreement rises while FID turns up. The evaluate stage writes the sweep's table and its plot
into `pictures/` for models whose family declares the `guidance` sampler option.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from components.config import EvaluateConfig
from components.evaluation import features as F
from components.evaluation.classifier import Classifier
from components.evaluation.evaluate import reference_subset
from components.evaluation.grid import sample_uint8
from components.images import to_model_input
from components.models.base import GenerativeModel


def guidance_sweep(model: GenerativeModel, classifier: Classifier, real_u8: torch.Tensor,
                   cfg: EvaluateConfig) -> list[dict[str, float]]:
    """Per guidance scale (cfg.guidance.scales and the model's default, ascending): agreement, FID, samples/s
    and the scale. cfg.guidance.samples samples per scale at the model's default DDIM steps, the classes asked for
    in turn, the same seed (cfg.seed) at every scale; FID against as many held-out images (`real_u8`, uint8
    N×C×H×W), picked as every score's reference is (evaluate.reference_indices: seeded, every class)."""
    n = cfg.guidance.samples
    device = next(classifier.parameters()).device
    reference = reference_subset(real_u8, cfg.model_copy(update={"num_samples": n}))
    real = F.extract(classifier, to_model_input(reference, model.image_size, device)).features
    asked = torch.arange(n) % model.num_classes  # (n,) the class each sample is asked for
    rows = []
    for scale in sorted({*cfg.guidance.scales, float(model.cfg.guidance)}):
        start = time.perf_counter()
        fake_u8 = sample_uint8(model, n, cfg.seed, labels=asked, guidance=scale)
        seconds = time.perf_counter() - start
        fake = F.extract(classifier, to_model_input(fake_u8, model.image_size, device))
        agreement = (fake.probs.argmax(dim=1).cpu() == asked).float().mean()
        rows.append({"guidance": scale, "agreement": float(agreement), "fid": F.fid(real, fake.features),
                     "samples_per_s": n / seconds, "default": scale == float(model.cfg.guidance)})
    return rows


def save_tradeoff_plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Agreement (left axis) and FID (right axis) over the guidance scale, as a PNG, atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state to touch

    scales = [r["guidance"] for r in rows]
    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(scales, [100 * r["agreement"] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("guidance scale (0: unconditional, 1: conditional)")
    ax.set_ylabel("samples labelled the asked class (%)", color="tab:blue")
    fid_ax = ax.twinx()
    fid_ax.plot(scales, [r["fid"] for r in rows], "s--", color="tab:red")
    fid_ax.set_ylabel("domain FID to held-out images", color="tab:red")
    for r in rows:
        if r["default"]:
            ax.axvline(r["guidance"], color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"default {r['guidance']:g}", (r["guidance"], 100 * r["agreement"]), fontsize=8,
                        textcoords="offset points", xytext=(4, -12))
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)

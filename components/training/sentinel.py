"""The mode-collapse sentinel: which classes the evaluator classifier sees in a fixed batch of a
generate-kind model's samples, logged on the training curves while the model trains."""
from __future__ import annotations

import warnings

import torch

from components.evaluation.classifier import Classifier, predict
from components.models.base import GenerativeModel
from components.training.trainer import MonitorFn

SAMPLES = 500  # enough for a class histogram of ten classes; costs one forward of G and of the classifier
SEED = 0  # the same latent codes at every check: the histogram moves only when the model does


def class_histogram(counts: torch.Tensor) -> dict[str, float]:
    """sentinel_classes_covered, sentinel_top_class_share and sentinel_collapse (1.0 when the top
    class takes more than half of the samples or fewer than half of the classes appear)."""
    covered = int((counts > 0).sum())
    top_share = float(counts.max()) / float(counts.sum())
    collapsed = top_share > 0.5 or covered < counts.numel() / 2
    return {"sentinel_classes_covered": float(covered), "sentinel_top_class_share": top_share,
            "sentinel_collapse": float(collapsed)}


def class_histogram_sentinel(classifier: Classifier, num_classes: int, samples: int = SAMPLES) -> MonitorFn:
    """A monitor for the Trainer: model → the class histogram values of `samples` fixed samples."""
    if classifier.head.out_features != num_classes:
        raise ValueError(f"the evaluator classifier knows {classifier.head.out_features} classes, the data "
                         f"{num_classes}; retrain it (genpipe classifier) on this dataset")

    def monitor(model: GenerativeModel) -> dict[str, float]:
        images = model.sample(samples, generator=torch.Generator().manual_seed(SEED))  # (samples, C, H, W)
        classes = predict(classifier, images.float()).argmax(dim=1)
        values = class_histogram(torch.bincount(classes, minlength=num_classes))
        if values["sentinel_collapse"]:
            warnings.warn(f"mode-collapse sentinel: the largest class takes {values['sentinel_top_class_share']:.0%} "
                          f"of {samples} samples, {values['sentinel_classes_covered']:.0f} of {num_classes} "
                          f"classes appear", RuntimeWarning, stacklevel=2)
        return values

    return monitor

"""The lecture's "a VAE boosts a classifier when data is scarce" as a metric: the evaluator's
architecture, trained with the `classifier:` params on a few real training images per class, alone
and with a conditional model's labelled samples added; both are tested on the held-out reference.
A model whose samples carry what the scarce real set lacks raises the accuracy (augment_gain > 0);
one whose samples are off-class or off-distribution does not. The related measure, which trains
on samples alone, is the classification accuracy score (Ravuri & Vinyals, 2019; metric `cas`).

The model itself was trained on the whole labelled training split, so its samples may carry what
the scarce subset lacks: the gain is what a model trained with more data adds to a classifier that
has little, an upper bound on augmenting from the scarce data alone. One seed, no interval.
"""
from __future__ import annotations

import torch

from components.evaluation.classifier import accuracy, train_classifier
from components.evaluation.grid import sample_uint8
from components.images import to_model_input, to_uint8

# What the metric reads from the EvalContext, and where each comes from when it is missing.
REQUIRED_INPUTS = {
    "augment": "the `evaluate.augment` params",
    "classifier_config": "the `classifier:` params",
    "train_u8": "the training split's images",
    "train_labels": "the training split's labels",
    "real_labels": "the reference images' labels",
}


def scarce_subset(images_u8: torch.Tensor, labels: torch.Tensor, classes: list[str], per_class: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` images of every class, a seeded random pick, class-interleaved (0, 1, …, K-1, 0, …):
    uint8 (per_class·K, C, H, W) and int64 (per_class·K,)."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for k, name in enumerate(classes):
        members = torch.nonzero(labels == k).flatten()
        if members.numel() < per_class:
            raise ValueError(f"augment needs {per_class} training images of class {k} ({name}) "
                             f"(evaluate.augment.real_per_class); the train split has {members.numel()}: "
                             f"lower evaluate.augment.real_per_class")
        picks.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    order = torch.stack(picks, dim=1).flatten()  # (per_class·K,), classes in turn
    return images_u8[order], labels[order].to(torch.long)


def _check_inputs(ctx) -> None:
    missing = [f"{field} ({source})" for field, source in REQUIRED_INPUTS.items() if getattr(ctx, field) is None]
    if missing:
        raise ValueError(f"the augment metric of a conditional model needs EvalContext fields it was not given: "
                         f"{', '.join(missing)}; or drop augment from evaluate.metrics")
    if ctx.train_u8.shape[0] != ctx.train_labels.shape[0]:
        raise ValueError(f"augment: train_labels has {ctx.train_labels.shape[0]} labels for "
                         f"{ctx.train_u8.shape[0]} images in train_u8; they must be one per image")
    k = ctx.model.num_classes
    for field in ("train_labels", "real_labels"):
        labels = getattr(ctx, field)
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"augment: {field} holds class ids outside the model's 0..{k - 1}; "
                             f"evaluate the model on the dataset it was trained on")


def augment_scores(ctx) -> dict[str, float]:
    """{"augment_acc_real", "augment_acc_mixed", "augment_gain"} for a conditional model; {} for an
    unconditional one or none. Every class gets `real_per_class` real images and, in the mixed set,
    `generated_per_class` samples (drawn at the evaluation seed) beside them.

    train_classifier runs its epochs over whatever data it is given, so the real-only set is
    repeated (whole classes-in-turn rounds, so still balanced) to the mixed set's size: both
    classifiers take the same optimiser steps under the same learning-rate schedule, and the gain
    measures the samples, not extra training.
    """
    model = ctx.model
    if model is None or not model.conditional:
        return {}
    _check_inputs(ctx)
    cfg, k = ctx.augment, model.num_classes
    real_u8, real_y = scarce_subset(ctx.train_u8, ctx.train_labels, model.classes, cfg.real_per_class, ctx.seed)
    fake_y = torch.arange(cfg.generated_per_class * k) % k  # classes in turn
    fake_u8 = sample_uint8(model, fake_y.shape[0], ctx.seed, labels=fake_y)  # (generated_per_class·K, C, size, size)
    if fake_u8.shape[1] != real_u8.shape[1]:
        raise ValueError(f"augment: the model's samples have {fake_u8.shape[1]} channels, the training images "
                         f"{real_u8.shape[1]}; evaluate the model on the dataset it was trained on")
    # One training set needs one resolution: samples of a 64-px model trained on 28-px data are
    # brought to the data's (the classifier judges at 28 px in any case).
    fake_u8 = to_uint8(to_model_input(fake_u8, real_u8.shape[-1], "cpu"))
    mixed_u8, mixed_y = torch.cat([real_u8, fake_u8]), torch.cat([real_y, fake_y])
    repeat = torch.arange(mixed_y.shape[0]) % real_y.shape[0]  # the real set, tiled to the mixed set's size

    device = next(ctx.classifier.parameters()).device
    test_y = ctx.real_labels.to(torch.long).cpu()
    # train_classifier seeds the global RNG; fork it so the metrics listed after this one draw what
    # they would without it.
    with torch.random.fork_rng(devices=[]):
        alone = train_classifier(real_u8[repeat], real_y[repeat], k, ctx.classifier_config, device, progress=False)
        acc_real = accuracy(alone, ctx.real, test_y)
        mixed = train_classifier(mixed_u8, mixed_y, k, ctx.classifier_config, device, progress=False)
        acc_mixed = accuracy(mixed, ctx.real, test_y)
    return {"augment_acc_real": acc_real, "augment_acc_mixed": acc_mixed, "augment_gain": acc_mixed - acc_real}

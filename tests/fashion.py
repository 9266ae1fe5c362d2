"""Real Fashion-MNIST for tests that judge samples: a class-balanced training subset and the
pipeline's evaluator classifier trained on it, both cached per test process."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from components.config import ClassifierConfig, DataConfig
from components.data.sources import FASHION_MNIST_CLASSES, fashion_mnist

ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist (make setup installs it)
CLASSES = list(FASHION_MNIST_CLASSES)
# For tests that run the pipeline on the installed demo data (its default params.yaml source)
needs_fashion_mnist = pytest.mark.skipif(not (ROOT / "train-images-idx3-ubyte.gz").exists(),
                                         reason="demo data missing: `make data` installs dataset-fashion-mnist")


def _require() -> None:
    if not ROOT.is_dir():
        pytest.skip(f"{ROOT} missing: apt-get install dataset-fashion-mnist")


@lru_cache(maxsize=None)
def _splits():
    cfg = DataConfig(name="fashion-mnist", source="fashion-mnist", path=str(ROOT), image_size=28, channels=1,
                     resize=True, test_fraction=0.15, limit_per_split=None, max_pixels=50_000_000, max_file_bytes=10**9, shard_size=20000,
                     follow_symlinks=False, archive={"max_members": 1000, "max_bytes": 10**8})
    return fashion_mnist(cfg).splits


def fashion_subset(per_class: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` images of each class: uint8 N×1×28×28 and int64 labels, class-interleaved."""
    _require()
    data = _splits()[split]
    labels = torch.from_numpy(data.labels)
    picks = [torch.nonzero(labels == k).flatten()[:per_class] for k in range(len(CLASSES))]
    order = torch.stack(picks, dim=1).flatten()  # 0, 1, …, 9, 0, 1, …
    return torch.from_numpy(data.images.copy())[order], labels[order]


@lru_cache(maxsize=None)
def evaluator(per_class: int = 600, epochs: int = 2):
    """The pipeline's classifier (same code as the classifier stage) trained on a subset: ~85% test accuracy."""
    from components.evaluation.classifier import train_classifier

    images, labels = fashion_subset(per_class)
    cfg = ClassifierConfig(arch="cnn", epochs=epochs, batch_size=128, lr=0.003, width=16, seed=0, vit=None)
    with torch.random.fork_rng(devices=[]):
        return train_classifier(images, labels, len(CLASSES), cfg, torch.device("cpu"), progress=False).eval()

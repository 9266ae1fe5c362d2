"""A small CNN trained on the real training split. Its penultimate features replace Inception's
for FID/KID (Inception weights cannot be downloaded here, and 28×28 grey items are far from
ImageNet); its test accuracy says how much its features can be trusted."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from components.config import ClassifierConfig
from components.images import resize, to_model_input

INPUT_SIZE = 28  # every image is judged at 28×28; larger samples are downscaled first
FEATURES = 128


class Classifier(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.MaxPool2d(2),  # width × 14 × 14
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(True),
            nn.MaxPool2d(2),  # 2·width × 7 × 7
            nn.Flatten(),
            nn.Linear(2 * width * 49, FEATURES), nn.ReLU(True),  # the features FID/KID compare
        )
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class NonFiniteFeatures(ValueError):
    """The evaluator's features hold NaN/Inf: no metric can be computed from them (and FID's
    eigen-decomposition of a NaN covariance can crash the process instead of failing)."""


class FeatureExtractor(nn.Module):
    """What torchmetrics' FID/KID call: images in [-1, 1] of any size → (N, FEATURES)."""

    num_features = FEATURES

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.classifier.features(resize(x, INPUT_SIZE))
        if not torch.isfinite(features).all():
            raise NonFiniteFeatures("the evaluator classifier's features are NaN or infinite; retrain it "
                                    "(genpipe classifier) before evaluating")
        return features


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ClassifierConfig,
                     device: torch.device | str = "cpu", progress: bool = True) -> Classifier:
    torch.manual_seed(cfg.seed)
    model = Classifier(images.shape[1], num_classes, cfg.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = max(images.shape[0] // cfg.batch_size, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps * cfg.epochs)
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(images.shape[0])
        bar = tqdm(range(steps), desc=f"classifier epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="step")
        for i in bar:
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(to_model_input(images[idx], INPUT_SIZE, device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Class probabilities for images in [-1, 1] (float) or uint8."""
    device = next(model.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        x = to_model_input(chunk, INPUT_SIZE, device) if chunk.dtype == torch.uint8 else resize(chunk.to(device), INPUT_SIZE)
        out.append(model(x).softmax(dim=1).cpu())
    return torch.cat(out)


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images).argmax(dim=1) == labels).float().mean())

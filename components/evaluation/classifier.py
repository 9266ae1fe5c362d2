"""The evaluator: a small CNN (the default) or a small Vision Transformer trained on the real
training split. Its features replace Inception's for FID/KID (Inception weights cannot be downloaded
here, and 28×28 grey items are far from ImageNet); its test accuracy says how much its features can
be trusted. `classifier.arch` picks the network through ARCHS; both give (N, FEATURES) features."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from components.config import ClassifierConfig
from components.images import resize, to_model_input

INPUT_SIZE = 28  # every image is judged at 28×28; larger samples are downscaled first
FEATURES = 128


class Classifier(nn.Module):
    """The CNN evaluator (classifier.arch: cnn)."""

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


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v: N × heads × tokens × dim/heads
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def patch_stem(channels: int, dim: int, patch: int) -> nn.Module:
    """The ViT's patchify: one patch × patch convolution of stride patch."""
    return nn.Conv2d(channels, dim, patch, stride=patch)  # dim × 28/patch × 28/patch


def conv_stem(channels: int, dim: int, patch: int) -> nn.Module:
    """log2(patch) stride-2 3×3 convolutions with batch norm and ReLU, widths doubling up to dim, then a
    1×1 convolution to dim: the same token grid as the patchify, seen through overlapping small kernels.
    Xiao et al., 2021, "Early Convolutions Help Transformers See Better"."""
    halvings = patch.bit_length() - 1  # patch is 2 or 4 (ViTConfig checks)
    widths = [channels] + [max(dim >> (halvings - 1 - i), 1) for i in range(halvings)]  # patch 4: channels, dim/2, dim
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        # c_out × H/2 × W/2
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(True)]
    return nn.Sequential(*layers, nn.Conv2d(dim, dim, 1))  # dim × 28/patch × 28/patch


STEMS: dict[str, Callable[[int, int, int], nn.Module]] = {"patch": patch_stem, "conv": conv_stem}


class ViT(nn.Module):
    """The Vision Transformer evaluator (classifier.arch: vit).
    Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale".
    `stem` (STEMS) embeds the image into the token grid; a classifier.json written before stems records
    none, and its network is the patch one."""

    def __init__(self, channels: int, num_classes: int, patch: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float, pool: str, stem: str = "patch"):
        super().__init__()
        tokens = (INPUT_SIZE // patch) ** 2
        self.embed = STEMS[stem](channels, dim, patch)  # dim × 28/patch × 28/patch
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, tokens + (self.cls is not None), dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Identity() if dim == FEATURES else nn.Linear(dim, FEATURES)
        self.head = nn.Linear(FEATURES, num_classes)
        # PyTorch's default init for the layers: the usual ViT init (every weight at std 0.02) fitted a
        # 100-image set several times slower at these widths (the project → head pair starts near a saddle)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # N × tokens × dim
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # N × 1+tokens × dim
        x = self.norm(self.blocks(x + self.pos))
        pooled = x[:, 0] if self.cls is not None else x.mean(dim=1)  # N × dim
        return self.project(pooled)  # N × FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Each image of N×C×H×W shifted by up to `pad` pixels (a crop of it padded with background, -1)
    and, with `flip`, mirrored left-right with probability 1/2."""
    n, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        dy, dx = (torch.randint(0, 2 * pad + 1, (2, n, 1), device=x.device))
        rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # N × H × 1
        cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # N × 1 × W
        x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mirror, x.flip(-1), x)
    return x


@dataclass(frozen=True)
class Recipe:
    """How one arch trains: optimizer, learning-rate schedule (of the total steps), epochs,
    augmentation of the float batch and label smoothing."""

    optimizer: torch.optim.Optimizer
    schedule: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
    epochs: int
    augment: Callable[[torch.Tensor], torch.Tensor]
    label_smoothing: float


@dataclass(frozen=True)
class Arch:
    sizes: Callable[[ClassifierConfig], dict]  # what classifier.json records to rebuild the network
    build: Callable[[dict], nn.Module]         # a classifier_spec → the untrained network
    recipe: Callable[[nn.Module, ClassifierConfig], Recipe]


def _cnn_recipe(model: nn.Module, cfg: ClassifierConfig) -> Recipe:
    return Recipe(torch.optim.Adam(model.parameters(), lr=cfg.lr),
                  lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total),
                  epochs=cfg.epochs, augment=lambda x: x, label_smoothing=0.0)


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` of the `total` steps to the optimizer's lr, then cosine decay to 0."""
    warm = max(1, round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _vit_recipe(model: nn.Module, cfg: ClassifierConfig) -> Recipe:
    vit = cfg.vit
    # weight decay on the linear and patch weights only: not on norms, biases, position or class embeddings
    decayed = {name for name, p in model.named_parameters() if p.dim() >= 2 and name not in ("pos", "cls")}
    decay = [p for name, p in model.named_parameters() if name in decayed]
    rest = [p for name, p in model.named_parameters() if name not in decayed]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": vit.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=vit.lr)
    return Recipe(opt, lambda opt, total: warmup_cosine(opt, total, vit.warmup), epochs=vit.epochs,
                  augment=lambda x: random_crop_flip(x, vit.crop_pad, vit.flip),
                  label_smoothing=vit.label_smoothing)


VIT_SIZES = ("patch", "stem", "dim", "depth", "heads", "mlp_ratio", "pool")

ARCHS: dict[str, Arch] = {
    "cnn": Arch(sizes=lambda cfg: {"width": cfg.width},
                build=lambda spec: Classifier(spec["channels"], spec["num_classes"], spec["width"]),
                recipe=_cnn_recipe),
    "vit": Arch(sizes=lambda cfg: {"vit": cfg.vit.model_dump(include=set(VIT_SIZES))},
                build=lambda spec: ViT(spec["channels"], spec["num_classes"], **spec["vit"]),
                recipe=_vit_recipe),
}


def classifier_spec(cfg: ClassifierConfig, channels: int, num_classes: int) -> dict:
    """What build_classifier needs to rebuild the network (classifier.json holds it beside the weights)."""
    return {"arch": cfg.arch, "channels": channels, "num_classes": num_classes, **ARCHS[cfg.arch].sizes(cfg)}


def build_classifier(spec: dict) -> nn.Module:
    """The untrained network of a classifier_spec; a spec without `arch` (written before the ViT) is a CNN."""
    arch = spec.get("arch", "cnn")
    if arch not in ARCHS:
        raise ValueError(f"classifier.json: unknown arch {arch!r}; valid: {sorted(ARCHS)}; retrain the classifier")
    return ARCHS[arch].build(spec)


class NonFiniteFeatures(ValueError):
    """The evaluator's features hold NaN/Inf: no metric can be computed from them (and FID's
    eigen-decomposition of a NaN covariance can crash the process instead of failing)."""


class FeatureExtractor(nn.Module):
    """What torchmetrics' FID/KID call: images in [-1, 1] of any size → (N, FEATURES)."""

    num_features = FEATURES

    def __init__(self, classifier: nn.Module):
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
                     device: torch.device | str = "cpu", progress: bool = True) -> nn.Module:
    """The evaluator of `cfg.arch` trained on uint8 images N×C×H×W (any size; judged at 28×28)."""
    torch.manual_seed(cfg.seed)
    model = build_classifier(classifier_spec(cfg, images.shape[1], num_classes)).to(device)
    recipe = ARCHS[cfg.arch].recipe(model, cfg)
    opt = recipe.optimizer
    steps = max(images.shape[0] // cfg.batch_size, 1)
    sched = recipe.schedule(opt, steps * recipe.epochs)
    model.train()
    for epoch in range(recipe.epochs):
        perm = torch.randperm(images.shape[0])
        bar = tqdm(range(steps), desc=f"{cfg.arch} classifier epoch {epoch + 1}/{recipe.epochs}", disable=not progress,
                   unit="step")
        for i in bar:
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = recipe.augment(to_model_input(images[idx], INPUT_SIZE, device))
            loss = F.cross_entropy(model(x), labels[idx].to(device), label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Class probabilities for images in [-1, 1] (float) or uint8."""
    device = next(model.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        x = to_model_input(chunk, INPUT_SIZE, device) if chunk.dtype == torch.uint8 else resize(chunk.to(device), INPUT_SIZE)
        out.append(model(x).softmax(dim=1).cpu())
    return torch.cat(out)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images).argmax(dim=1) == labels).float().mean())

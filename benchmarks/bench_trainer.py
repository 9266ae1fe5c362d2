"""Benchmark (not a test): our Trainer's img/s beside a bare PyTorch loop of the same model and data.

    .venv/bin/python benchmarks/bench_trainer.py                  # vae then dcgan, 12800 images, 3 repeats
    .venv/bin/python benchmarks/bench_trainer.py --model dcgan --images 6400 --data synthetic

The baseline is the loop pytorch/examples writes (mnist/vae/dcgan): a Dataset that turns each uint8
image into a PIL image, then ToTensor + Normalize((0.5,), (0.5,)); a DataLoader(batch, shuffle=True,
num_workers=2, drop_last=True); and a hand-written update that calls the model's submodules directly.
Ours is Trainer(model, cfg with epochs=1, log_every from params.yaml tracking).fit(uint8 images, labels),
preloaded in memory.

Timed, for both: optimizer creation and one epoch over N images (drop_last, so N // batch * batch).
The baseline's time includes creating the DataLoader and starting its workers, as a user pays them.
Not timed: model construction and data loading from disk. Each repeat builds fresh models seeded alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.params import load_params  # noqa: E402
from components.data.sources import SOURCES  # noqa: E402
from components.models import build_model  # noqa: E402
from components.training.trainer import Trainer  # noqa: E402

NUM_CLASSES = 10


class ImageDataset(Dataset):
    """Per-sample decoding as torchvision's FashionMNIST.__getitem__ does it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int):
        self.images, self.labels = images, labels  # uint8 N×C×H×W, int64 N
        steps = [transforms.ToTensor(), transforms.Normalize((0.5,) * images.shape[1], (0.5,) * images.shape[1])]
        if images.shape[-1] != image_size:
            steps.insert(0, transforms.Resize(image_size, antialias=True))
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        img = Image.fromarray(img[0], mode="L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        return self.transform(img), int(self.labels[i])


def baseline_vae(model, cfg, loader) -> int:
    """pytorch/examples vae/main.py train(): reconstruction BCE (sum) + KLD, one Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    seen = train_loss = 0
    for data, _ in loader:
        optimizer.zero_grad()
        mu, logvar = model.encoder(data).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = torch.sigmoid(model.decoder(z))
        bce = F.binary_cross_entropy(recon, (data + 1) / 2, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = bce + cfg.beta * kld
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
        seen += data.shape[0]
    return seen


def baseline_dcgan(model, cfg, loader) -> int:
    """pytorch/examples dcgan/main.py: D on real and fake.detach(), then G; BCE on D's logits."""
    netG, netD = model.generator, model.discriminator
    criterion = nn.BCEWithLogitsLoss()  # examples: Sigmoid + BCELoss; our D ends in logits
    optimizerD = torch.optim.Adam(netD.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    model.train()
    seen = 0
    for real, _ in loader:
        b = real.shape[0]
        netD.zero_grad()
        label = torch.full((b, 1), 1.0)
        output = netD(real)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = torch.sigmoid(output).mean().item()
        fake = netG(torch.randn(b, cfg.latent_dim))
        label.fill_(0.0)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        optimizerD.step()
        netG.zero_grad()
        label.fill_(1.0)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        optimizerG.step()
        _ = (D_x, (errD_real + errD_fake).item(), errG.item())  # the examples log these every batch
        seen += b
    return seen


BASELINES = {"vae": baseline_vae, "dcgan": baseline_dcgan}


def fresh_model(cfg, channels: int):
    torch.manual_seed(cfg.seed)
    return build_model(cfg, channels, NUM_CLASSES)


def run_baseline(cfg, channels, images: np.ndarray, labels: np.ndarray) -> float:
    model = fresh_model(cfg, channels)
    start = time.perf_counter()
    loader = DataLoader(ImageDataset(images, labels, cfg.image_size), batch_size=cfg.batch_size,
                        shuffle=True, num_workers=2, drop_last=True)
    seen = BASELINES[cfg.family](model, cfg, loader)
    return seen / (time.perf_counter() - start)


def run_trainer(cfg, channels, images: torch.Tensor, labels: torch.Tensor, log_every: int) -> float:
    model = fresh_model(cfg, channels)
    start = time.perf_counter()
    Trainer(model, cfg.model_copy(update={"epochs": 1}), log_every=log_every, progress=False).fit(images, labels)
    seen = images.shape[0] // cfg.batch_size * cfg.batch_size
    return seen / (time.perf_counter() - start)


def load_images(kind: str, data_cfg, n: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "fashion-mnist":
        split = SOURCES.get("fashion-mnist")(data_cfg.model_copy(update={"limit_per_split": n})).splits["train"]
        return split.images.copy(), split.labels  # the idx reader's arrays are read-only views
    rng = np.random.default_rng(0)
    shape = (n, data_cfg.channels, data_cfg.image_size, data_cfg.image_size)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, NUM_CLASSES, n).astype(np.int64)


def main() -> int:
    params = load_params(ROOT / "params.yaml")
    has_fmnist = Path(params.data.path).is_dir()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["vae", "dcgan"], help="default: both, one after the other")
    ap.add_argument("--images", type=int, default=12800)
    ap.add_argument("--batch-size", type=int, help="default: params.yaml train.<model>.batch_size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median is reported")
    ap.add_argument("--data", choices=["fashion-mnist", "synthetic"],
                    default="fashion-mnist" if has_fmnist else "synthetic")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    images, labels = load_images(args.data, params.data, args.images)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    rows = []
    for name in [args.model] if args.model else ["vae", "dcgan"]:
        cfg = params.model(name)
        if args.batch_size:
            cfg = cfg.model_copy(update={"batch_size": args.batch_size})
        channels = images.shape[1]
        warm = 4 * cfg.batch_size  # torch's lazy init, the allocator, the DataLoader's first fork
        run_baseline(cfg, channels, images[:warm], labels[:warm])
        run_trainer(cfg, channels, images_t[:warm], labels_t[:warm], params.tracking.log_every)
        base, ours = [], []
        for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            base.append(run_baseline(cfg, channels, images, labels))
            ours.append(run_trainer(cfg, channels, images_t, labels_t, params.tracking.log_every))
            print(f"  {name} repeat {r + 1}: baseline {base[-1]:8.0f} img/s, trainer {ours[-1]:8.0f} img/s",
                  flush=True)
        b, o = statistics.median(base), statistics.median(ours)
        rows.append((name, cfg.batch_size, b, o, o / b))

    print(f"\ndata={args.data} N={len(images)} repeats={args.repeats} (median) threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} torch={torch.__version__} baseline num_workers=2")
    print(f"{'model':<7}{'batch':>6}{'baseline img/s':>16}{'trainer img/s':>15}{'ratio':>8}")
    for name, batch, b, o, ratio in rows:
        print(f"{name:<7}{batch:>6}{b:>16.0f}{o:>15.0f}{ratio:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

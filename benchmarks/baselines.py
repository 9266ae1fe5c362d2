"""The loops our Trainer is measured against, shared by bench_trainer.py (CPU) and bench_gpu.py.

- bare: what pytorch/examples writes (mnist/vae/dcgan): a Dataset that turns each uint8 image into a
  PIL image, then ToTensor + Normalize((0.5,), (0.5,)); a DataLoader(batch, shuffle=True, drop_last=True)
  with worker processes; plain fp32; loss.item() every batch, as the examples log. VAE and DCGAN use the
  examples' own hand-written updates and torch.optim.Adam; other families walk their training_losses
  with their own optimizers.
- preloaded: a hand-written loop over a preloaded uint8 tensor: images[idx] gather, float conversion,
  the model's own training_losses walked with zero_grad/backward/step, nothing else; the model's own
  optimizers.
Each run function builds its model with `build(cfg)` (seeded alike), times optimizer creation and one
epoch, and returns img/s; on a GPU the device is synchronised before and after.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from components.images import to_model_input


def untrained_parts(cfg, config_of, channels: int, num_classes: int, classes: list[str] | None = None) -> dict | None:
    """The models a family is built on (an ldm's autoencoder), untrained, for build_model's `parts`: a step
    costs what it would on trained ones. config_of(name) gives the config of the model a field names."""
    from components.models import FAMILIES, build_model

    parts = {field: build_model(config_of(getattr(cfg, field)), channels, num_classes, classes)
             for field in FAMILIES.get(cfg.family).parts}
    return parts or None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def bare_vae(model, cfg, loader, device) -> int:
    """pytorch/examples vae/main.py train(): reconstruction BCE (sum) + KLD, one Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    seen = train_loss = 0
    for data, _ in loader:
        data = data.to(device, non_blocking=True)
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


def bare_dcgan(model, cfg, loader, device) -> int:
    """pytorch/examples dcgan/main.py: D on real and fake.detach(), then G; BCE on D's logits."""
    netG, netD = model.generator, model.discriminator
    criterion = nn.BCEWithLogitsLoss()  # examples: Sigmoid + BCELoss; our D ends in logits
    optimizerD = torch.optim.Adam(netD.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    seen = 0
    for real, _ in loader:
        real = real.to(device, non_blocking=True)
        b = real.shape[0]
        netD.zero_grad()
        label = torch.full((b, 1), 1.0, device=device)
        output = netD(real)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = torch.sigmoid(output).mean().item()
        fake = netG(torch.randn(b, cfg.latent_dim, device=device))
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


def bare_phases(model, cfg, loader, device) -> int:
    """A family pytorch/examples has no script for: its own losses and optimizers, logged every batch."""
    optimizers = model.optimizers()
    seen = 0
    for data, labels in loader:
        data, labels = data.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        for phase, out in model.training_losses(data, labels):
            optimizers[phase].zero_grad()
            out.loss.backward()
            optimizers[phase].step()
            _ = out.loss.item()
        seen += data.shape[0]
    return seen


BARE_UPDATES = {"vae": bare_vae, "dcgan": bare_dcgan}  # the rest: bare_phases


def run_bare(cfg, build, images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu",
             workers: int = 2) -> float:
    """img/s of the bare loop; its time includes creating the DataLoader and starting its workers."""
    device = torch.device(device)
    model = build(cfg).to(device).train()
    sync(device)
    start = time.perf_counter()
    loader = DataLoader(ImageDataset(images, labels, cfg.image_size), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, pin_memory=device.type == "cuda")
    seen = BARE_UPDATES.get(cfg.family, bare_phases)(model, cfg, loader, device)
    sync(device)
    return seen / (time.perf_counter() - start)


def preloaded_step(model, optimizers, x, y, noise, autocast=contextlib.nullcontext) -> None:
    """One batch: every phase, zero_grad/backward/step; as in the trainer, only the forward passes
    (the phases' generator code) run under `autocast()`."""
    phases = model.training_losses(x, y, noise)
    while True:
        with autocast():
            item = next(phases, None)
        if item is None:
            return
        phase, out = item
        optimizers[phase].zero_grad(set_to_none=True)
        out.loss.backward()
        optimizers[phase].step()


def run_preloaded(cfg, build, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu",
                  bf16: bool = False) -> float:
    """img/s of the hand-written loop over `images`, uint8 already on `device`; fp32, or bf16 autocast."""
    device = torch.device(device)
    model = build(cfg).to(device).train()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sync(device)
    start = time.perf_counter()
    optimizers = model.optimizers()
    noise = torch.Generator(device=device).manual_seed(cfg.seed)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    steps = images.shape[0] // cfg.batch_size
    for i in range(steps):
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        x = to_model_input(images[idx], cfg.image_size, device)  # (B, C, size, size) in [-1, 1]
        preloaded_step(model, optimizers, x, labels[idx], noise, autocast)
    sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)

"""One trainer for every family: walks the model's phases, logs, checkpoints, resumes."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from components.config import TrainConfig
from components.models.base import GenerativeModel
from components.training.checkpoint import load_checkpoint, save_checkpoint

LogFn = Callable[[dict[str, float], int], None]


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Float images N×C×H×W → N×C×image_size×image_size (unchanged when already that size)."""
    if x.shape[-1] == image_size:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def to_model_input(batch_u8: torch.Tensor, image_size: int, device: torch.device) -> torch.Tensor:
    """uint8 N×C×H×W → float in [-1, 1] at the model's resolution."""
    return resize(batch_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0), image_size)


class Trainer:
    def __init__(self, model: GenerativeModel, cfg: TrainConfig, *, checkpoint_path: Path | None = None,
                 resume_key: str = "", log_fn: LogFn | None = None, device: torch.device | str = "cpu",
                 progress: bool = True):
        self.model, self.cfg = model.to(device), cfg
        self.device = torch.device(device)
        self.optimizers = model.optimizers()
        self.checkpoint_path, self.resume_key = checkpoint_path, resume_key
        self.log_fn, self.progress = log_fn, progress
        self.step = 0

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "step": self.step,
            "rng": torch.get_rng_state(),
            "config": self.cfg.model_dump(mode="json"),
            "resume_key": self.resume_key,
        }

    def _try_resume(self, total_steps: int) -> None:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return
        state = load_checkpoint(self.checkpoint_path)
        if state.get("config") != self.cfg.model_dump(mode="json") or state.get("resume_key") != self.resume_key:
            print(f"checkpoint {self.checkpoint_path} is for other params, data or code; starting fresh")
            return
        if state["step"] >= total_steps:  # a finished run asked to train again (e.g. dvc repro -f): retrain
            print(f"checkpoint {self.checkpoint_path} is of a finished run; starting fresh")
            return
        self.model.load_state_dict(state["model"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        print(f"resumed from {self.checkpoint_path} at step {self.step}")

    def checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(self._state(), self.checkpoint_path)

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Train on a preloaded uint8 tensor N×C×H×W for cfg.epochs; return the last logged values."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        steps_per_epoch = images.shape[0] // cfg.batch_size  # drop the ragged last batch: batch norm dislikes tiny ones
        if steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={cfg.batch_size} is larger than the {images.shape[0]} training images")
        total = steps_per_epoch * cfg.epochs
        self._try_resume(total)
        order = torch.Generator().manual_seed(cfg.seed)
        sums: dict[str, torch.Tensor] = {}
        window_steps = 0
        last: dict[str, float] = {}
        self.model.train()
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        window_start, window_images = time.perf_counter(), 0
        for epoch in range(self.step // steps_per_epoch, cfg.epochs):
            order.manual_seed(cfg.seed + epoch)  # per-epoch order depends only on (seed, epoch): resumable
            perm = torch.randperm(images.shape[0], generator=order)
            for i in range(self.step - epoch * steps_per_epoch, steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                x = to_model_input(images[idx], cfg.image_size, self.device)
                y = labels[idx].to(self.device)
                for phase, out in self.model.training_losses(x, y):
                    opt = self.optimizers[phase]
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                    for k, v in out.logs.items():
                        sums[k] = sums.get(k, 0) + v.detach()
                self.step += 1
                window_steps += 1
                window_images += x.shape[0]
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == total:
                    last = {k: float(v) / window_steps for k, v in sums.items()}
                    last["images_per_sec"] = window_images / (time.perf_counter() - window_start)
                    last["epoch"] = epoch + (i + 1) / steps_per_epoch
                    sums, window_steps, window_start, window_images = {}, 0, time.perf_counter(), 0
                    bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k != "epoch"})
                    if self.log_fn is not None:
                        self.log_fn(last, self.step)
                if self.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
        bar.close()
        self.checkpoint()
        self.model.eval()
        return last

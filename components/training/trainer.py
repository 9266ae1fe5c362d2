"""One trainer for every family: walks the model's phases, logs, checkpoints, resumes."""
from __future__ import annotations

import copy
import hashlib
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from components.config import TrainConfig
from components.images import to_model_input
from components.models.base import GenerativeModel
from components.training.checkpoint import load_checkpoint, move_aside, save_checkpoint

LogFn = Callable[[dict[str, float], int], None]


def stream_seed(seed: int, stream: str) -> int:
    """A seed for one random stream, independent of the others drawn from the same cfg.seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little")


def non_finite(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf in a nested state dict (model weights
    and buffers, optimizer moments): what a checkpoint must never hold."""
    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and not bool(torch.isfinite(tree).all()):
            return [prefix]
        return []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for k, v in items for name in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]


class Trainer:
    """Trains one model on a preloaded tensor; reproducible bit for bit on the CPU, also across resumes.

    log_every/checkpoint_every (steps; None = only at the end) decide nothing about the weights, so
    they are arguments here rather than fields of the config that the checkpoint's key compares.
    """

    def __init__(self, model: GenerativeModel, cfg: TrainConfig, *, name: str = "",
                 log_every: int | None = None, checkpoint_every: int | None = None,
                 checkpoint_path: Path | None = None, resume_key: str = "", log_fn: LogFn | None = None,
                 device: torch.device | str = "cpu", progress: bool = True):
        self.model, self.cfg, self.name = model.to(device), cfg, name or cfg.family
        self.device = torch.device(device)
        self.optimizers = model.optimizers()
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.checkpoint_path, self.resume_key = checkpoint_path, resume_key
        self.log_fn, self.progress = log_fn, progress
        self.noise = torch.Generator(device=self.device)  # every random draw of the training losses
        self.step = 0
        self.last: dict[str, float] = {}  # the last logged values, what fit returns

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "step": self.step,
            "rng": {"global": torch.get_rng_state(), "noise": self.noise.get_state()},
            "last": dict(self.last),
            "config": self.cfg.model_dump(mode="json"),
            "resume_key": self.resume_key,
        }

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if set(state["optimizers"]) != set(self.optimizers):
            raise ValueError(f"optimizers {sorted(state['optimizers'])}, expected {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        torch.set_rng_state(state["rng"]["global"])
        self.noise.set_state(state["rng"]["noise"])
        self.step, self.last = int(state["step"]), {k: float(v) for k, v in state["last"].items()}

    def _try_resume(self, total_steps: int) -> None:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return
        try:
            state = load_checkpoint(path)
            if state.get("config") != self.cfg.model_dump(mode="json") or state.get("resume_key") != self.resume_key:
                print(f"checkpoint {path} is for other params, data or code; starting fresh")
                return
            if not 0 <= state["step"] <= total_steps:
                raise ValueError(f"step {state['step']} is outside 0..{total_steps}")
            bad = non_finite({"model": state["model"], "optimizers": state["optimizers"]})
            if bad:  # saved before checkpoints were checked: resuming it would fail again on every rerun
                raise ValueError(f"non-finite values in {_some(bad)}")
            fresh = copy.deepcopy(self._state())
            try:
                self._load(state)
            except BaseException:
                self._load(fresh)  # a half-loaded model would be neither the checkpoint nor a fresh start
                raise
        except Exception as exc:  # truncated, not a checkpoint, or not this model's: keep it for a post-mortem
            aside = move_aside(path)
            warnings.warn(f"checkpoint {path} is unusable ({type(exc).__name__}: {exc}); "
                          f"moved it to {aside.name} and starting fresh", stacklevel=3)
            return
        if self.step < total_steps:
            print(f"resumed from {path} at step {self.step} of {total_steps}")

    def checkpoint(self, total: int | None = None) -> None:
        """Save the state, unless a weight, buffer or optimizer moment is NaN/Inf (a finite loss can
        still bring inf gradients): a bad checkpoint would be resumed, or reused as finished, forever."""
        path = self.checkpoint_path
        if path is None:
            return
        state = self._state()
        bad = non_finite({"model": state["model"], "optimizers": state["optimizers"]})
        if bad:
            kept = f"the previous checkpoint {path} is kept" if path.exists() else "no checkpoint was saved"
            of = f" of {total}" if total is not None else ""
            raise FloatingPointError(
                f"train.{self.name} ({self.cfg.family}): non-finite values in {_some(bad)} at step {self.step}{of}; "
                f"not saving this checkpoint, {kept}. Lower train.{self.name}.lr or check the data.")
        save_checkpoint(state, path)

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Train on a preloaded uint8 tensor N×C×H×W for cfg.epochs; return the last logged values.

        A checkpoint of the same key that finished (step == total) is the result: training is
        deterministic, so it is loaded instead of trained again.
        """
        cfg = self.cfg
        steps_per_epoch = images.shape[0] // cfg.batch_size  # drop the ragged last batch: batch norm dislikes tiny ones
        if steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={cfg.batch_size} is larger than the {images.shape[0]} training images")
        total = steps_per_epoch * cfg.epochs
        torch.manual_seed(cfg.seed)
        self.noise.manual_seed(stream_seed(cfg.seed, "noise"))
        self.step, self.last = 0, {}
        self._try_resume(total)
        if self.step == total:
            print(f"checkpoint {self.checkpoint_path} holds the finished training; not training again")
            if self.log_fn is not None and self.last:
                self.log_fn(self.last, self.step)
            self.model.eval()
            return dict(self.last)
        order = torch.Generator().manual_seed(cfg.seed)
        sums: dict[str, torch.Tensor] = {}
        window_steps = 0
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
                for phase, out in self.model.training_losses(x, y, self.noise):
                    if not torch.isfinite(out.loss):
                        self._stop_non_finite(phase, out.loss, total)
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
                if (self.log_every and self.step % self.log_every == 0) or self.step == total:
                    self.last = {k: float(v) / window_steps for k, v in sums.items()}
                    self.last["images_per_sec"] = window_images / (time.perf_counter() - window_start)
                    self.last["epoch"] = epoch + (i + 1) / steps_per_epoch
                    sums, window_steps, window_start, window_images = {}, 0, time.perf_counter(), 0
                    bar.set_postfix({k: f"{v:.3g}" for k, v in self.last.items() if k != "epoch"})
                    if self.log_fn is not None:
                        self.log_fn(dict(self.last), self.step)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < total:
                    self.checkpoint(total)
        bar.close()
        self.checkpoint(total)
        self.model.eval()
        return dict(self.last)

    def _stop_non_finite(self, phase: str, loss: torch.Tensor, total: int) -> None:
        path = self.checkpoint_path
        kept = f"; the last good checkpoint {path} is kept" if path is not None and path.exists() else ""
        raise FloatingPointError(
            f"train.{self.name} ({self.cfg.family}): the {phase!r} loss is {loss.item()} at step {self.step + 1} "
            f"of {total}; stopped before applying that update{kept}. Lower train.{self.name}.lr or check the data.")


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

"""One trainer for every family: walks the model's phases, keeps an EMA, logs, checkpoints, resumes
exactly, and rolls back when training diverges."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from components.config import DivergenceConfig, TrainConfig
from components.images import to_model_input
from components.models.base import FAMILIES, GenerativeModel
from components.training.checkpoint import (global_rng_state, load_checkpoint, move_aside, save_checkpoint,
                                            set_global_rng_state)
from components.training.distributed import Workers, parallel_hooks
from components.training.divergence import Divergence, FiniteWatch
from components.training.ema import EMA

LogFn = Callable[[dict[str, float], int], None]
MonitorFn = Callable[[GenerativeModel], dict[str, float]]


def stream_seed(seed: int, stream: str) -> int:
    """A seed for one random stream, independent of the others drawn from the same cfg.seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little")


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the n training images in `epoch`: a function of (seed, epoch) alone, so a
    resumed or rolled-back run needs no saved order to continue mid-epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


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

    log_every/checkpoint_every/sentinel_every (steps; None = never, logs and checkpoints also at the
    end) decide nothing about the weights, so they are arguments here rather than fields of the
    config that the checkpoint's key compares. `divergence` None allows no rollback: the first
    non-finite value fails the training. `monitor_fn(model) -> values` is called every
    sentinel_every steps on the model in eval mode (holding the EMA weights when there is an EMA)
    and its values are logged. `workers` (from distributed.process_group) trains as one of several
    processes, each on its slice of every global batch (components.training.distributed).

    Finiteness is checked without a host sync per step: each phase's loss and largest gradient stay
    on the device until the next log, sentinel or checkpoint step (and the end), where the first
    non-finite one, if any, sends training back to the last good state: the checkpoint on disk, or
    without a checkpoint path an in-memory copy taken at each checkpoint step (and at the start).
    Weights, EMA and optimizer moments are also scanned before every checkpoint: a checkpoint never
    holds NaN/Inf.
    """

    def __init__(self, model: GenerativeModel, cfg: TrainConfig, *, name: str = "", section: str = "train",
                 log_every: int | None = None, checkpoint_every: int | None = None,
                 checkpoint_path: Path | None = None, resume_key: str = "", log_fn: LogFn | None = None,
                 device: torch.device | str = "cpu", progress: bool = True,
                 divergence: DivergenceConfig | None = None, monitor_fn: MonitorFn | None = None,
                 sentinel_every: int | None = None, workers: Workers | None = None):
        self.device = torch.device(device)
        self.model, self.cfg, self.name = model.to(self.device), cfg, name or cfg.family
        self.config_path = f"{section}.{self.name}"  # where params.yaml holds cfg, for messages: train.vae, latent.ldm
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-D weights; the inputs follow in fit
        if cfg.compile:
            # Each child (generator, discriminator, encoder, ...) in place: training_losses, with its
            # generator-driven noise and phase order, stays eager, and the state_dict keys stay as they are.
            for child in model.children():
                child.compile()
        self.parallel = parallel_hooks(model, workers)  # in one process: hooks that do nothing
        self._offset, self._local_batch = self.parallel.local_batch(cfg.batch_size, self.config_path)
        self.optimizers = model.optimizers()
        self._phase_params = {k: [p for g in opt.param_groups for p in g["params"]] for k, opt in self.optimizers.items()}
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.checkpoint_path, self.resume_key = checkpoint_path, resume_key
        self.log_fn, self.progress = log_fn, progress
        self.divergence, self.monitor_fn, self.sentinel_every = divergence, monitor_fn, sentinel_every
        self.noise = torch.Generator(device=self.device)  # every random draw of the training losses
        self.ema: EMA | None = None
        self.step, self.rollbacks, self.lr_scale = 0, 0, 1.0
        self.last: dict[str, float] = {}  # the last logged values, what fit returns
        self._live: dict[str, torch.Tensor] | None = None  # the live weights once fit put the EMA in the model
        self._good: Path | dict | None = None  # the last good state: the checkpoint file, or a copy in memory
        self._watch = FiniteWatch()

    # --- state -----------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "step": self.step,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,  # the optimizers' learning rates are cfg.lr times this
            "rng": {**global_rng_state(self.device), "noise": self.noise.get_state()},
            "last": dict(self.last),
            "config": self.cfg.model_dump(mode="json"),
            "resume_key": self.resume_key,
        }

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        elif state["ema"]:
            raise ValueError("the checkpoint holds an EMA, this training has none")
        if set(state["optimizers"]) != set(self.optimizers):
            raise ValueError(f"optimizers {sorted(state['optimizers'])}, expected {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        set_global_rng_state(state["rng"], self.device)
        self.noise.set_state(state["rng"]["noise"])
        self.step, self.last = int(state["step"]), {k: float(v) for k, v in state["last"].items()}
        self.rollbacks, self.lr_scale = int(state["rollbacks"]), float(state["lr_scale"])
        self._reseed_rank_noise()

    def _non_finite_state(self, state: dict) -> list[str]:
        return non_finite({k: state[k] for k in ("model", "ema", "optimizers")})

    def live_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model with its live (not averaged) weights; after fit the model itself holds
        the EMA in its ema_modules. Without an EMA the two are the same."""
        return self._live if self._live is not None else self.model.state_dict()

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
            bad = self._non_finite_state(state)
            if bad:  # saved before checkpoints were checked: resuming it would fail again on every rerun
                raise ValueError(f"non-finite values in {_some(bad)}")
            fresh = copy.deepcopy(self._state())
            try:
                self._load(state)
            except BaseException:
                self._load(fresh)  # a half-loaded model would be neither the checkpoint nor a fresh start
                raise
        except Exception as exc:  # truncated, not a checkpoint, or not this model's: keep it for a post-mortem
            if self.parallel.is_main:  # the other ranks read the same file and come to the same verdict
                aside = move_aside(path)
                warnings.warn(f"checkpoint {path} is unusable ({type(exc).__name__}: {exc}); "
                              f"moved it to {aside.name} and starting fresh", stacklevel=3)
            return
        self._good = path
        if self.step < total_steps:
            print(f"resumed from {path} at step {self.step} of {total_steps}")

    def _keep_good_state(self) -> None:
        """Save the state as the last good one: to the checkpoint path, else a copy in memory."""
        if self.checkpoint_path is None:
            self._good = copy.deepcopy(self._state())
        else:
            if self.parallel.is_main:
                save_checkpoint(self._state(), self.checkpoint_path)
            self.parallel.barrier()  # the file is complete before any rank can roll back to it
            self._good = self.checkpoint_path
        self._reseed_rank_noise()

    def _restore_good_state(self) -> None:
        good = self._good
        self._load(load_checkpoint(good) if isinstance(good, Path) else copy.deepcopy(good))

    # --- training --------------------------------------------------------------------------------

    def _seed(self) -> None:
        seed = self.cfg.seed
        torch.manual_seed(seed)
        np.random.seed(stream_seed(seed, "numpy") % 2**32)
        random.seed(stream_seed(seed, "python"))
        self.noise.manual_seed(stream_seed(seed, "noise"))

    def _reseed_rank_noise(self) -> None:
        """Under torchrun, each rank's noise is a function of (seed, rank, step) from every point
        training can restart at (start, kept or restored good state): no per-rank state to save."""
        if self.parallel.world_size > 1:
            self.noise.manual_seed(stream_seed(self.cfg.seed, f"noise/{self.parallel.rank}/{self.step}"))

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        """One batch: every phase of the model, then the EMA. No host sync."""
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.precision == "bf16"
                    else contextlib.nullcontext())
        with self.parallel.wrapped():  # under torchrun: the DDP wrappers in the model
            phases = self.model.training_losses(x, y, self.noise)
            while True:
                # Only the forward passes run under autocast (weights stay fp32); bf16 has fp32's exponent
                # range, so no gradient scaling is needed.
                with autocast:
                    item = next(phases, None)
                if item is None:
                    break
                phase, out = item
                opt = self.optimizers[phase]
                opt.zero_grad(set_to_none=True)
                # Gradients of this phase's own parameters only: G's loss runs through D, and D's weight
                # gradients there would be thrown away (+7 % per DCGAN step here). DDP's reducer waits for
                # every wrapped parameter, so under torchrun all are computed.
                out.loss.backward(inputs=self._phase_params[phase] if self.parallel.world_size == 1 else None)
                self.parallel.sync_gradients(self._phase_params[phase])
                self._watch.add(self.step + 1, phase, out.loss,
                                [p.grad for p in self._phase_params[phase] if p.grad is not None])
                opt.step()
                for k, v in out.logs.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
        if self.ema is not None:
            self.ema.update(self.step)

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Train on a preloaded uint8 tensor N×C×H×W for cfg.epochs; return the last logged values.
        Afterwards the model holds the EMA weights in its ema_modules (live_state_dict() has the others).

        A checkpoint of the same key that finished (step == total) is the result: training is
        deterministic, so it is loaded instead of trained again.
        """
        cfg = self.cfg
        steps_per_epoch = images.shape[0] // cfg.batch_size  # drop the ragged last batch: batch norm dislikes tiny ones
        if steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={cfg.batch_size} is larger than the {images.shape[0]} training images")
        total = max(1, round(steps_per_epoch * cfg.epochs))
        self._seed()
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step, self.rollbacks, self.lr_scale, self.last, self._live = 0, 0, 1.0, {}, None
        self._good = None
        self._try_resume(total)
        self.parallel.check_same_start(self.step)
        self._reseed_rank_noise()
        if self.step == total:
            print(f"checkpoint {self.checkpoint_path} holds the finished training; not training again")
            if self.log_fn is not None and self.last:
                self.log_fn(self.last, self.step)
            return self._finish(images)
        if self._good is None:
            self._good = copy.deepcopy(self._state())  # where a divergence before the first checkpoint returns
        images, labels = images.to(self.device), labels.to(self.device)  # preloaded: no copy per step on a GPU
        self._watch.clear()
        self.model.train()
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_images, window_start = 0, 0, time.perf_counter()
        order_epoch, order = -1, None
        while self.step < total:
            epoch, i = divmod(self.step, steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(cfg.seed, epoch, images.shape[0]).to(self.device)
            start = i * cfg.batch_size + self._offset  # this process's slice of the global batch
            idx = order[start:start + self._local_batch]
            x = to_model_input(images[idx], cfg.image_size, self.device)  # (B, C, size, size) in [-1, 1]
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._train_step(x, labels[idx], sums)
            self.step += 1
            window_steps += 1
            window_images += x.shape[0] * self.parallel.world_size
            bar.update(1)
            log_now = bool(self.log_every and self.step % self.log_every == 0) or self.step == total
            checkpoint_now = bool(self.checkpoint_every and self.step % self.checkpoint_every == 0) or self.step == total
            sentinel_now = bool(self.monitor_fn and self.sentinel_every and self.step % self.sentinel_every == 0)
            if not (log_now or checkpoint_now or sentinel_now):
                continue
            problem = self._divergence(scan_weights=checkpoint_now)
            if problem is not None:
                self._roll_back(problem, total)
                bar.n = self.step
                bar.refresh()
                sums, window_steps, window_images, window_start = {}, 0, 0, time.perf_counter()
                continue
            if log_now:
                self.last = {k: float(v) / window_steps for k, v in self.parallel.average_logs(sums).items()}
                self.last["images_per_sec"] = window_images / (time.perf_counter() - window_start)
                self.last["epoch"] = epoch + (i + 1) / steps_per_epoch
                sums, window_steps, window_start, window_images = {}, 0, time.perf_counter(), 0
                bar.set_postfix({k: f"{v:.3g}" for k, v in self.last.items() if k != "epoch"})
                self._log(dict(self.last))
            if sentinel_now:
                started = time.perf_counter()
                self._log(self._monitor())
                window_start += time.perf_counter() - started  # not training time: keep it out of images_per_sec
            if checkpoint_now and (self.step < total or self.checkpoint_path is not None):
                self._keep_good_state()
        bar.close()
        return self._finish(images)

    def _divergence(self, scan_weights: bool) -> Divergence | None:
        """The first NaN/Inf loss or gradient since the last check (one host sync); before a
        checkpoint also any in the weights, EMA and optimizer moments (finite losses and gradients
        can still overflow a weight)."""
        problem = self._watch.first_divergence()
        if problem is None and scan_weights:
            bad = self._non_finite_state(self._state())
            if bad:
                problem = Divergence(self.step, "", _some(bad), float("nan"))
        problem = self.parallel.first_problem(problem)  # under torchrun: the earliest of any rank
        if problem is None and scan_weights:
            self.parallel.check_same_weights(self.step)
        return problem

    def _log(self, values: dict[str, float]) -> None:
        if self.log_fn is not None:
            self.log_fn(values, self.step)

    def _monitor(self) -> dict[str, float]:
        averaged = self.ema.in_model() if self.ema is not None else contextlib.nullcontext()
        with averaged:
            self.model.eval()
            try:
                return {k: float(v) for k, v in self.monitor_fn(self.model).items()}
            finally:
                self.model.train()

    def _finish(self, images: torch.Tensor) -> dict[str, float]:
        """Leave the model in eval mode holding what is evaluated and registered: the EMA if any,
        its batch-norm statistics measured again for it (on `images`, the training images, for a
        model that is not a sampler)."""
        if self.ema is not None:
            self._live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.ema.copy_to_model()
            self.ema.recalibrate_batch_norm(self.model, stream_seed(self.cfg.seed, "batch-norm"),
                                            FAMILIES.get(self.cfg.family).kind, images)
        self.model.eval()
        return dict(self.last)

    def _roll_back(self, problem: Divergence, total: int) -> None:
        """Back to the last good state with the learning rate lowered, or fail when the rollbacks
        are used up (the model then holds the last good state)."""
        allowed = self.divergence.max_rollbacks if self.divergence is not None else 0
        rollbacks, lr_scale = self.rollbacks, self.lr_scale
        self._restore_good_state()
        where = f"{self.checkpoint_path}" if self.checkpoint_path is not None else "the in-memory copy"
        if rollbacks >= allowed:
            kept = (f"; the last good checkpoint {self.checkpoint_path} is kept"
                    if self.checkpoint_path is not None and self.checkpoint_path.exists() else "")
            raise FloatingPointError(
                f"{self.config_path} ({self.cfg.family}): {problem} of {total}; stopped after {rollbacks} "
                f"rollback(s) (divergence.max_rollbacks={allowed}, learning rate × {lr_scale:g}){kept}. "
                f"Lower {self.config_path}.lr or check the data.")
        factor = lr_scale * self.divergence.lr_factor / self.lr_scale  # the restored rates are cfg.lr × self.lr_scale
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] *= factor
        self.rollbacks, self.lr_scale = rollbacks + 1, lr_scale * self.divergence.lr_factor
        print(f"{self.config_path}: {problem} of {total}; rolled back to step {self.step} ({where}) with the "
              f"learning rate × {self.lr_scale:g} (rollback {self.rollbacks} of {allowed})")
        if self.log_fn is not None:
            self.log_fn({"rollbacks": float(self.rollbacks), "lr_scale": self.lr_scale}, problem.step)


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

"""Training on several devices: one process per device under torchrun, gradients averaged by
DistributedDataParallel (Li et al., 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training").

How a run of N processes divides the work, and what stays the same as in one process:
- `train.<name>.batch_size` is the GLOBAL batch: each step every process takes its contiguous
  slice (batch_size / N images) of the same global permutation (trainer.epoch_order), so the N
  slices together are the batch one process would take, and the averaged gradient is its gradient
  (exactly so for losses that are means over images and models without batch norm).
- Gradients: each submodule of the model that has parameters is wrapped in DDP, except those a
  family lists in `allreduce_modules` (WGAN-GP's critic: its gradient penalty differentiates the
  critic twice, which DDP does not support); their gradients are averaged with one all_reduce after
  each backward. The wrappers are put into the model only for the duration of a training step, so
  state dicts, the EMA and checkpoints see the plain submodules and keep their keys.
  `forward_sync_buffers=False`: a GAN's discriminator runs forward on real and fake images before
  one backward, and DDP's buffer broadcast at each forward would overwrite, in place, batch-norm
  statistics that the pending backward still needs.
- Batch norm is per device: each process normalises its slice with the slice's statistics and keeps
  its own running statistics; rank 0's are the ones saved. (SyncBatchNorm refuses CPU tensors in
  this torch, so it could not be the CPU/gloo path; with per-device statistics a model with batch
  norm trains close to, not exactly like, one process with the same global batch.)
- Noise: each process draws its own, from a generator reseeded with stream_seed(seed,
  "noise/<rank>/<step>") at the start and whenever a good state is kept or restored, so a resumed or
  rolled-back run draws what an uninterrupted one did without saving N generator states.
- Only rank 0 writes: checkpoints, outputs, MLflow metrics, the progress bar. Logged values are
  averaged over the processes first. Every rank loads the same checkpoint file on resume and
  rollback (one machine, `torchrun --standalone`; over several machines GENPIPE_HOME would have to
  be shared); a non-finite value on any rank rolls all of them back (they agree on the first one).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from components.config import ConfigError
from components.models.base import GenerativeModel
from components.training.divergence import Divergence

# Longer than rank 0's slowest work alone (a checkpoint, a sentinel check, writing the outputs while
# the others wait at a barrier); a rank that fails ends its process group, and torchrun stops the rest.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=15)


@dataclass(frozen=True)
class Workers:
    """This process's place among the training processes; world_size 1 is a plain run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def launch_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) in a plain process."""
    try:
        world, rank, local = (int(os.environ.get(k, default)) for k, default in
                              (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}, "
                          f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}: expected integers, as torchrun sets "
                          f"them; unset them to train in one process") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE; "
                          f"start the processes with torchrun (or `genpipe train --nproc N`)")
    return world, rank, local


def is_main_process() -> bool:
    """Whether this is rank 0 (or a plain process): the one that touches the stage's outputs."""
    return launch_env()[1] == 0


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """`python -m <module> <args>` as nproc processes on this machine; torchrun finds a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


@contextmanager
def process_group(device: torch.device) -> Iterator[Workers]:
    """This process's Workers; under torchrun (WORLD_SIZE > 1) the process group for the block, on
    cuda:LOCAL_RANK with nccl when `device` is a GPU, else on the CPU with gloo."""
    world, rank, local = launch_env()
    if world == 1:
        yield Workers(0, 1, 0, device)
        return
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"GENPIPE_DEVICE={device}: names one GPU, but {world} processes need one each; "
                              f"set GENPIPE_DEVICE=cuda (process i then uses cuda:LOCAL_RANK)")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local}: this machine has {torch.cuda.device_count()} GPU(s); "
                              f"start at most that many processes per machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield Workers(rank, world, local, device)
    finally:
        dist.destroy_process_group()


def nothing_to_monitor(model: GenerativeModel) -> dict[str, float]:
    """The sentinel of ranks other than 0: they take part in every check step (which all ranks must
    reach together) but log nothing."""
    return {}


class _DDP(DistributedDataParallel):
    """DDP that also lends the wrapped module's other attributes (a text encoder's caption sampler,
    which reads buffers only). A method that computes with parameters outside forward would bypass
    DDP's gradient hooks: the weight check at checkpoint steps reports the drift it causes."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None or name == "module":
                raise
            return getattr(inner, name)


class SingleProcess:
    """The trainer's parallel hooks in a plain run: they do nothing."""

    rank, world_size, is_main = 0, 1, True

    def local_batch(self, batch_size: int, config_path: str) -> tuple[int, int]:
        return 0, batch_size

    def wrapped(self):
        return nullcontext()

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        pass

    def average_logs(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sums

    def first_problem(self, problem: Divergence | None) -> Divergence | None:
        return problem

    def check_same_weights(self, step: int) -> None:
        pass

    def check_same_start(self, step: int) -> None:
        pass

    def barrier(self) -> None:
        pass


class MultiProcess(SingleProcess):
    """The trainer's parallel hooks in one of several processes (see the module docstring)."""

    def __init__(self, model: GenerativeModel, workers: Workers):
        self.model, self.device = model, workers.device
        self.rank, self.world_size, self.is_main = workers.rank, workers.world_size, workers.is_main
        by_all_reduce = set(model.allreduce_modules)
        unknown = by_all_reduce - set(model._modules)
        if unknown:
            raise ValueError(f"{type(model).__name__}.allreduce_modules names no submodule {sorted(unknown)}")
        with_params = {name: m for name, m in model.named_children() if any(p.requires_grad for p in m.parameters())}
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = {name: _DDP(m, device_ids=device_ids, forward_sync_buffers=False)
                     for name, m in with_params.items() if name not in by_all_reduce}
        # Not broadcast: every rank built the same weights from cfg.seed (the weight check would tell).
        self._reduced = {id(p) for name in by_all_reduce for p in getattr(model, name).parameters()}

    def local_batch(self, batch_size: int, config_path: str) -> tuple[int, int]:
        """(offset, size) of this rank's slice of each global batch; config_path (train.vae) names the model's params."""
        if batch_size % self.world_size:
            raise ConfigError(f"{config_path}.batch_size={batch_size}: the global batch must split evenly over the "
                              f"{self.world_size} processes; set it to a multiple of {self.world_size}")
        size = batch_size // self.world_size
        return self.rank * size, size

    @contextmanager
    def wrapped(self) -> Iterator[None]:
        """The DDP wrappers in the model's place for one training step."""
        plain = {name: self.model._modules[name] for name in self._ddp}
        self.model._modules.update(self._ddp)
        try:
            yield
        finally:
            self.model._modules.update(plain)

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of the all-reduced submodules' parameters among `params`."""
        grads = [p.grad for p in params if p.grad is not None and id(p) in self._reduced]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for the phase
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()

    def average_logs(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The logged sums averaged over the ranks: values of the global batch, not of rank 0's slice."""
        if not sums:
            return sums
        keys = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in keys])
        dist.all_reduce(values)
        return dict(zip(keys, values / self.world_size))

    def first_problem(self, problem: Divergence | None) -> Divergence | None:
        """The earliest non-finite value any rank saw: every rank rolls back (or fails) alike."""
        found: list[Divergence | None] = [None] * self.world_size
        dist.all_gather_object(found, problem)
        problems = [p for p in found if p is not None]
        return min(problems, key=lambda p: p.step) if problems else None

    def check_same_weights(self, step: int) -> None:
        """Every rank holds the same weights; else name the first parameter that drifted."""
        named = list(self.model.named_parameters())
        sums = torch.stack([p.detach().double().sum() for _, p in named])  # (params,)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        differ = (low != high).nonzero()
        if differ.numel():
            raise RuntimeError(
                f"after step {step} the {self.world_size} processes hold different weights, first in "
                f"{named[int(differ[0])][0]!r}: its gradients were not averaged. {type(self.model).__name__} "
                f"must run its submodules through their forward (module(x)) in training_losses, or list them "
                f"in allreduce_modules")

    def check_same_start(self, step: int) -> None:
        steps: list[int | None] = [None] * self.world_size
        dist.all_gather_object(steps, step)
        if len(set(steps)) > 1:
            raise RuntimeError(f"the processes start at different steps {steps}: they read different checkpoints; "
                               f"remove the checkpoint and run again")

    def barrier(self) -> None:
        dist.barrier()


def parallel_hooks(model: GenerativeModel, workers: Workers | None) -> SingleProcess:
    """The trainer's parallel hooks: nothing to do in a plain run, DDP and collectives under torchrun."""
    if workers is None or workers.world_size == 1:
        return SingleProcess()
    return MultiProcess(model, workers)

"""Training in two processes (gloo on the CPU, as under torchrun) against one process.

- A model without batch norm or noise, trained K steps on a global batch B in two processes, ends
  with the weights and logged loss of one process trained on the same B (float summation order
  aside). One submodule goes through DDP, the other through the all_reduce path.
- The families (batch norm, per-rank noise, a GAN's several discriminator forwards per backward,
  WGAN-GP's all-reduced critic) match an exact emulation of two devices in one process: each
  "rank" runs the model on its slice with its own noise generator, and the gradients are averaged.
- Against one process with the same global batch, a batch-norm model's loss agrees loosely only:
  each process normalises its half of the batch with that half's statistics.
- Checkpoints (rank 0 writes, every rank reads): a run stopped and resumed ends bit-identical to an
  uninterrupted one; a divergence only one rank sees rolls every rank back.
- `genpipe train --nproc 2` writes the model folder once, from rank 0, and logs one MLflow run; a
  failure on rank 0 ends every process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from model_configs import model_config
from components.config import DivergenceConfig
from components.images import to_model_input
from components.models import GenerativeModel, StepOutput, build_model
from components.models.base import adam
from components.training.distributed import process_group
from components.training.trainer import Trainer, epoch_order, stream_seed

REPO = Path(__file__).resolve().parents[1]
WORLD, GLOBAL_BATCH, STEPS = 2, 16, 5
# Largest weight difference after STEPS steps, float summation order aside (two halves summed by
# gloo vs one batch by autograd). Measured: 6e-8 (the model without batch norm against one process),
# 0 to 1.5e-6 (the families against their two-device emulation, wgan_gp the largest).
TIGHT_ATOL = 1e-5
# Per-device batch norm against one process's whole-batch statistics: the `ae` loss after STEPS
# steps differed by 1.6e-4 (relative) when measured.
BATCH_NORM_RTOL = 1e-3

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearAutoencoder(GenerativeModel):
    """No batch norm and no noise, a mean loss over images: two processes must reproduce one."""

    ema_modules = ("encoder", "decoder")
    allreduce_modules = ("decoder",)  # the encoder goes through DDP, the decoder through all_reduce

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.channels, self.image_size, self.latent_dim = cfg, 1, 28, 8
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 14 * 14, 8))
        self.decoder = nn.Linear(8, 28 * 28)  # (N, 784) pixel values

    def optimizers(self):
        return {"ae": adam(self.parameters(), self.cfg.lr)}

    def training_losses(self, x, y, generator=None):
        loss = F.mse_loss(self.decoder(self.encoder(x)), x.flatten(1))
        yield "ae", StepOutput(loss, {"loss": loss})


class PoisonedAutoencoder(LinearAutoencoder):
    """Its third loss on rank 1 only is infinite, its gradient finite: a divergence one rank alone sees."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls, self.poisoned = 0, os.environ.get("RANK") == "1"

    def training_losses(self, x, y, generator=None):
        self.calls += 1
        for phase, out in super().training_losses(x, y, generator):
            if self.poisoned and self.calls == 3:
                out = StepOutput(out.loss + torch.tensor(float("inf")), out.logs)
            yield phase, out


def seeded(build, cfg) -> GenerativeModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        return build(cfg)


def images_and_labels(n: int = GLOBAL_BATCH * STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 4


# name → (family of the config, build the model from the config)
CASES = {
    "tight": ("ae", lambda cfg: seeded(LinearAutoencoder, cfg)),
    "poisoned": ("ae", lambda cfg: seeded(PoisonedAutoencoder, cfg)),
    "ae": ("ae", lambda cfg: build_model(cfg, 1, 4)),
    "dcgan": ("dcgan", lambda cfg: build_model(cfg, 1, 4)),
    "cgan": ("cgan", lambda cfg: build_model(cfg, 1, 4)),
    "wgan_gp": ("wgan_gp", lambda cfg: build_model(cfg, 1, 4)),
}


def case_config(name: str, **overrides):
    # EMA on: its average must follow identical weights on every rank.
    return model_config(CASES[name][0], **{"batch_size": GLOBAL_BATCH, "lr": 3e-3, "ema_decay": 0.9, **overrides})


class Interrupted(Exception):
    """Training stopped on every rank after a checkpoint, as by a pre-emption."""


def train(name: str, workers=None, checkpoint: Path | None = None, log_every: int = STEPS,
          stop_at: int | None = None, **overrides) -> tuple[dict, dict]:
    cfg = case_config(name, **overrides)
    model = CASES[name][1](cfg)

    def log(values, step):
        if step == stop_at:
            raise Interrupted

    trainer = Trainer(model, cfg, name=name, log_every=log_every, progress=False, workers=workers,
                      checkpoint_path=checkpoint, checkpoint_every=2 if checkpoint else None, log_fn=log,
                      divergence=DivergenceConfig(max_rollbacks=1, lr_factor=0.5))
    last = trainer.fit(*images_and_labels())
    last.update(rollbacks=trainer.rollbacks, lr_scale=trainer.lr_scale)
    return {k: v.clone() for k, v in trainer.live_state_dict().items()}, last


def _rank_main(rank: int, port: int, out: Path) -> None:
    """One of WORLD processes, set up as torchrun sets them up."""
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    with process_group(torch.device("cpu")) as workers:
        for name in [n for n in CASES if n != "poisoned"]:  # one process group for all: starting processes is slow
            checkpoint = out / "tight.pt" if name == "tight" else None  # rank 0 saves, all read it back
            results[name] = train(name, workers, checkpoint)
        # Checkpoints every 2 steps: uninterrupted, and stopped at step 3 then resumed from step 2's.
        results["uninterrupted"] = train("dcgan", workers, out / "uninterrupted.pt")
        with pytest.raises(Interrupted):
            train("dcgan", workers, out / "resumed.pt", log_every=1, stop_at=3)
        results["resumed"] = train("dcgan", workers, out / "resumed.pt")
        results["poisoned"] = train("poisoned", workers, log_every=1)  # checked at every step
        with pytest.raises(ValueError) as refused:
            train("tight", workers, batch_size=GLOBAL_BATCH - 1)
        results["odd batch"] = str(refused.value)
    torch.save(results, out / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """What each of two gloo processes trained: {case: (live weights, last logged values)}."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_rank_main, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def parameters(model_state: dict, model: nn.Module) -> dict:
    """The state entries that are parameters (not per-device batch-norm statistics)."""
    names = {k for k, _ in model.named_parameters()}
    return {k: v for k, v in model_state.items() if k in names}


def test_two_processes_match_one_process_with_the_same_global_batch(two_processes):
    weights, last = train("tight")
    for rank in range(WORLD):
        rank_weights, rank_last = two_processes[rank]["tight"]
        assert max_difference(rank_weights, weights) < TIGHT_ATOL
        assert rank_last["loss"] == pytest.approx(last["loss"], rel=1e-6)  # the global batch's loss, averaged
    initial = seeded(LinearAutoencoder, case_config("tight")).state_dict()
    assert max_difference(weights, initial) > 1e3 * TIGHT_ATOL, "the weights must have moved"


def lockstep(name: str) -> dict:
    """Two devices emulated in one process: each 'rank' runs every phase on its slice of the global
    batch with its own noise; the phase's gradient is the average of theirs (what DDP computes)."""
    cfg = case_config(name)
    model = CASES[name][1](cfg)
    optimizers = model.optimizers()
    images, labels = images_and_labels()
    order = epoch_order(cfg.seed, 0, images.shape[0])
    noise = [torch.Generator().manual_seed(stream_seed(cfg.seed, f"noise/{r}/0")) for r in range(WORLD)]
    local = GLOBAL_BATCH // WORLD
    model.train()
    for step in range(STEPS):
        slices = [order[step * GLOBAL_BATCH + r * local:step * GLOBAL_BATCH + (r + 1) * local] for r in range(WORLD)]
        phases = [model.training_losses(to_model_input(images[i], 28, "cpu"), labels[i], noise[r])
                  for r, i in enumerate(slices)]
        while (items := [next(p, None) for p in phases])[0] is not None:
            optimizer = optimizers[items[0][0]]
            optimizer.zero_grad(set_to_none=True)
            (sum(out.loss for _, out in items) / WORLD).backward()
            optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("name", ["ae", "dcgan", "cgan", "wgan_gp"])
def test_families_train_in_two_processes_as_two_devices_would(two_processes, name):
    """ae, dcgan, cgan: every submodule in DDP (a GAN's D runs forward on real and fake before one
    backward); wgan_gp: the generator in DDP, the critic all-reduced."""
    reference = lockstep(name)
    model = CASES[name][1](case_config(name))
    rank0, rank1 = (parameters(two_processes[r][name][0], model) for r in range(WORLD))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks must hold the same weights"
    assert max_difference(rank0, parameters(reference, model)) < TIGHT_ATOL
    assert all(np.isfinite(v) for v in two_processes[0][name][1].values())


def test_a_batch_norm_model_stays_close_to_one_process(two_processes):
    """Per-device batch norm: each half of the batch is normalised by its own statistics."""
    _, last = train("ae")
    assert two_processes[0]["ae"][1]["loss"] == pytest.approx(last["loss"], rel=BATCH_NORM_RTOL)


# --- the stage under torchrun ----------------------------------------------------------------------

GENPIPE = [sys.executable, "-m", "flows.cli"]


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder: params.yaml with a tiny autoencoder `tiny` (reconstruct kind: no sentinel,
    so no evaluator classifier), and a packed dataset of 64 training images."""
    from components.config import read_params_raw, write_params_raw
    from components.data.pack import pack_dataset
    from components.data.sources import RawDataset, Split
    from components.params import parse_params
    from model_configs import model_fields

    raw = read_params_raw(REPO / "params.yaml")
    raw["train"]["tiny"] = model_fields("ae", batch_size=GLOBAL_BATCH, epochs=2)
    raw["tracking"].update(log_every=2, checkpoint_every=3)
    write_params_raw(raw, tmp_path / "params.yaml")
    params = parse_params(raw)
    images, labels = (t.numpy() for t in images_and_labels(80))
    split = lambda a, b: Split(images[a:b], labels[a:b], [f"x#{i}" for i in range(a, b)])  # noqa: E731
    pack_dataset(RawDataset(classes=list("abcd"), splits={"train": split(0, 64), "test": split(64, 80)}),
                 tmp_path / "data", params.data, {"name": "unit"})
    return tmp_path


def genpipe_train(project: Path, *extra: str, out: str = "models/tiny") -> subprocess.CompletedProcess:
    args = ["train", "tiny", "--data", "data", "--classifier", "no-classifier", "--out", out,
            "--metrics", "metrics/tiny.json", "--nproc", str(WORLD), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENPIPE_HOME": str(project / ".genpipe"), "GENPIPE_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([*GENPIPE, *args], cwd=project, capture_output=True, text=True, timeout=300, env=env)


def test_genpipe_train_nproc_writes_the_model_once_from_rank_0(project):
    result = genpipe_train(project)
    assert result.returncode == 0, result.stderr[-3000:]

    model_dir = project / "models" / "tiny"
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors", "run.json"]
    assert json.loads((model_dir / "model.json").read_text())["steps"] == 2 * 64 // GLOBAL_BATCH
    assert "loss" in json.loads((project / "metrics" / "tiny.json").read_text())
    assert [p.name for p in (project / "models").iterdir()] == ["tiny"], "no second copy, no leftover temp folder"
    assert not (project / ".genpipe" / "checkpoints" / "fashion-mnist-tiny" / "last.pt").exists()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.genpipe' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion-mnist-tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one training run, from rank 0"
    assert runs[0].data.tags["genpipe.processes"] == str(WORLD)
    assert runs[0].info.run_id == json.loads((model_dir / "run.json").read_text())["run_id"]


def test_a_failure_on_rank_0_ends_every_process(project):
    """Rank 0 cannot write the outputs (their folder's parent is a file) while rank 1 waits at the
    closing barrier: every process ends, with a failure, instead of waiting out the timeout."""
    (project / "blocker").write_text("a file where the outputs' folder should be")
    result = genpipe_train(project, out="blocker/tiny")
    assert result.returncode != 0
    assert "blocker" in result.stderr


def test_a_run_resumed_in_two_processes_ends_as_an_uninterrupted_one(two_processes):
    """Rank 0 saved the checkpoints, both ranks loaded step 2's, and each drew its own noise again."""
    model = CASES["dcgan"][1](case_config("dcgan"))
    for rank in range(WORLD):
        resumed, uninterrupted = two_processes[rank]["resumed"][0], two_processes[rank]["uninterrupted"][0]
        if rank == 0:  # rank 0's batch-norm statistics too: they are the ones saved
            assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
        resumed, uninterrupted = parameters(resumed, model), parameters(uninterrupted, model)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_global_batch_that_does_not_split_evenly_is_refused(two_processes):
    assert two_processes[0]["odd batch"] == (
        f"train.tight.batch_size={GLOBAL_BATCH - 1}: the global batch must split evenly over the {WORLD} "
        f"processes; set it to a multiple of {WORLD}")


def test_a_divergence_on_one_rank_rolls_every_rank_back(two_processes):
    for rank in range(WORLD):
        weights, last = two_processes[rank]["poisoned"]
        assert (last["rollbacks"], last["lr_scale"]) == (1, 0.5)
        assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.equal(two_processes[0]["poisoned"][0][k], two_processes[1]["poisoned"][0][k])
               for k in two_processes[0]["poisoned"][0])

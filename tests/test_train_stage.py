"""The train stage: its checkpoint goes once the outputs are in place, and its MLflow run is tagged
with the dataset version under the one name used everywhere."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import apply_overrides, read_params_raw
from components.params import parse_params
from components.data.pack import dataset_version, pack_dataset
from components.data.sources import RawDataset, Split
from components.pipeline import train_stage
from components.state import checkpoint_path

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(BaseException):
    """A kill between the final checkpoint and the outputs."""


class FakeLog:
    run_id = "run-1"

    def __call__(self, values, step):
        pass


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """params (a tiny VAE), a packed dataset, and the tags of every training run started."""
    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / ".genpipe"))
    monkeypatch.setenv("GENPIPE_DEVICE", "cpu")
    raw = apply_overrides(read_params_raw(REPO / "params.yaml"), [
        "train.vae.epochs=1", "train.vae.batch_size=16", "train.vae.width=8", "train.vae.latent_dim=4",
        "tracking.log_every=1", "tracking.checkpoint_every=1"])
    params = parse_params(raw)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 4).astype(np.int64)
    split = lambda a, b: Split(images[a:b], labels[a:b], [f"x#{i}" for i in range(a, b)])  # noqa: E731
    pack_dataset(RawDataset(classes=list("abcd"), splits={"train": split(0, 32), "test": split(32, 40)}),
                 tmp_path / "dataset", params.data, {"name": "unit"})

    runs = []

    @contextlib.contextmanager
    def training_run(experiment, run_name, params, tags, **kwargs):  # no MLflow needed here
        runs.append(tags)
        yield FakeLog()

    monkeypatch.setattr("components.tracking.runs.training_run", training_run)
    return params, tmp_path, runs


def run_stage(params, tmp_path) -> dict:
    return train_stage(params, "vae", tmp_path / "dataset", tmp_path / "models" / "vae",
                       tmp_path / "metrics" / "vae.json")


def test_the_checkpoint_goes_once_the_outputs_are_in_place(stage):
    params, tmp_path, runs = stage
    metrics = run_stage(params, tmp_path)

    assert (tmp_path / "models" / "vae" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "metrics" / "vae.json").read_text()) == metrics
    # DVC reruns the stage on changes the resume key does not cover (pipeline, packing, config
    # code): a finished checkpoint left here would be returned as the new result.
    assert not checkpoint_path(f"{params.data.name}-vae").exists()
    assert not list(checkpoint_path(f"{params.data.name}-vae").parent.glob(".last.pt.*"))


def test_a_kill_after_the_final_checkpoint_reuses_it(stage, monkeypatch, capsys):
    params, tmp_path, _ = stage

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr("components.tracking.model_files.save_trained_model", killed)
        with pytest.raises(Killed):
            run_stage(params, tmp_path)
    path = checkpoint_path(f"{params.data.name}-vae")
    finished = torch.load(path, weights_only=True)
    assert finished["step"] == 2 and not (tmp_path / "models" / "vae").exists()
    capsys.readouterr()

    metrics = run_stage(params, tmp_path)

    assert "not training again" in capsys.readouterr().out
    assert metrics == finished["last"]  # images_per_sec included: no step was trained again
    assert (tmp_path / "models" / "vae" / "model.safetensors").is_file() and not path.exists()


def test_the_training_run_is_tagged_with_dataset_version(stage):
    params, tmp_path, runs = stage
    run_stage(params, tmp_path)
    [tags] = runs
    assert tags["dataset_version"] == dataset_version(tmp_path / "dataset")
    assert json.loads((tmp_path / "models" / "vae" / "model.json").read_text())["dataset_version"] == \
        tags["dataset_version"]
    assert "genpipe.manifest_sha256" not in tags

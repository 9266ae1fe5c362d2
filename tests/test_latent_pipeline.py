"""A model trained on another model, end to end: the modern profile's kl_ae (train section) and ldm
(latent section) through the real retrain flow (Prefect engine, MLflow on SQLite, DVC). The DAG edge:
train_latent@ldm runs after train@kl_ae; changing the autoencoder's params retrains both, changing only
the ldm's leaves the autoencoder alone. The registered ldm holds its autoencoder and answers requests
with steps and guidance; its evaluation draws the guidance trade-off."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from components.config import apply_overrides, apply_profile, read_params_raw
from fashion import needs_fashion_mnist
from stack import local_project, set_params

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.limit_per_split=160",
    "classifier.epochs=1", "classifier.batch_size=32",
    "train.kl_ae.epochs=1", "train.kl_ae.batch_size=32", "train.kl_ae.width=8",
    "latent.ldm.epochs=1", "latent.ldm.batch_size=32", "latent.ldm.width=16", "latent.ldm.sample_steps=5",
    "tracking.log_every=2", "tracking.checkpoint_every=3",
    "evaluate.num_samples=100", "evaluate.kid_subset_size=50", "evaluate.grid_size=16",
    "evaluate.guidance.samples=40",
]

pytestmark = [pytest.mark.slow, needs_fashion_mnist]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A fresh project (git + DVC) with only the modern profile's kl_ae and ldm, tiny."""
    raw = apply_profile(read_params_raw(REPO / "params.yaml"), REPO / "profiles" / "modern.yaml")
    raw["train"] = {"kl_ae": raw["train"]["kl_ae"]}
    raw["evaluate"]["metrics"] = ["fid", "class_coverage", "recon_mse"]
    with local_project(tmp_path_factory.mktemp("latent"), apply_overrides(raw, TINY)) as ws:
        yield ws


def run_retrain():
    from flows.retrain import retrain

    return retrain()


def test_the_ldm_trains_after_its_autoencoder_and_registers_holding_it(workspace):
    import mlflow.pyfunc

    result = run_retrain()
    assert not result.failures, result.failures
    ran = result.stages_run
    assert set(ran) >= {"train@kl_ae", "evaluate@kl_ae", "train_latent@ldm", "evaluate_latent@ldm"}
    assert ran.index("train@kl_ae") < ran.index("train_latent@ldm") < ran.index("evaluate_latent@ldm")
    assert {r.name: r.version for r in result.registrations} == {"fashion-mnist-kl_ae": "1", "fashion-mnist-ldm": "1"}

    spec = json.loads((workspace / "artifacts" / "models" / "ldm" / "model.json").read_text())
    autoencoder = spec["parts"]["autoencoder"]
    assert autoencoder["family"] == "kl_ae" and autoencoder["training_run_id"]  # the lineage it was trained on
    kl_ae_run = json.loads((workspace / "artifacts" / "models" / "kl_ae" / "run.json").read_text())["run_id"]
    assert autoencoder["training_run_id"] == kl_ae_run

    sweep = json.loads((workspace / "artifacts" / "eval" / "ldm" / "pictures" / "guidance.json").read_text())
    assert [r["guidance"] for r in sweep["scales"]] == sorted(r["guidance"] for r in sweep["scales"])
    assert sum(r["default"] for r in sweep["scales"]) == 1 and all(0 <= r["agreement"] <= 1 for r in sweep["scales"])
    assert (workspace / "artifacts" / "eval" / "ldm" / "pictures" / "guidance.png").stat().st_size > 0
    metrics = json.loads((workspace / "artifacts" / "eval" / "ldm" / "metrics.json").read_text())
    assert metrics["class_agreement"] == next(r["agreement"] for r in sweep["scales"] if r["default"])

    ldm = mlflow.pyfunc.load_model("models:/fashion-mnist-ldm/1")  # the registered files alone
    images = ldm.predict({"labels": [9, 9, 0], "seed": 1, "steps": 3, "guidance": 2.0})
    assert images.shape == (3, 1, 28, 28) and str(images.dtype) == "uint8"
    assert (ldm.predict({"labels": [9, 9, 0], "seed": 1, "steps": 3, "guidance": 2.0}) == images).all()
    assert ldm.predict({"prompt": "ankle boot", "count": 2, "steps": 2}).shape == (2, 1, 28, 28)
    with pytest.raises(Exception, match="steps: must be an integer in 1\\.\\."):
        ldm.predict({"count": 2, "steps": 0})
    with pytest.raises(Exception, match="guidance: must be a number in 0\\.\\.20"):
        ldm.predict({"count": 2, "guidance": -1})

    sample = ["genpipe", "sample", "--model", "fashion-mnist-ldm@champion", "--labels", "9,0", "--out", "ldm.png"]
    done = subprocess.run([*sample, "--steps", "3", "--guidance", "2.5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (workspace / "ldm.png").is_file() and "wrote 2 samples" in done.stdout
    refused = subprocess.run([*sample, "--steps", "5000"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "steps: must be an integer in 1..1000" in refused.stderr


def test_changing_only_the_ldm_leaves_its_autoencoder_alone(workspace):
    set_params(workspace, ["latent.ldm.lr=0.0005"])
    result = run_retrain()
    assert sorted(result.stages_run) == ["evaluate_latent@ldm", "train_latent@ldm"]
    decisions = {r.name: r.decision for r in result.registrations}
    assert decisions["fashion-mnist-kl_ae"] == "unchanged"


def test_changing_the_autoencoder_retrains_the_ldm_on_it(workspace):
    before = json.loads((workspace / "artifacts" / "models" / "ldm" / "model.json").read_text())
    set_params(workspace, ["train.kl_ae.kl_weight=0.002"])
    result = run_retrain()
    assert sorted(result.stages_run) == ["evaluate@kl_ae", "evaluate_latent@ldm", "train@kl_ae", "train_latent@ldm"]
    after = json.loads((workspace / "artifacts" / "models" / "ldm" / "model.json").read_text())
    new_run = json.loads((workspace / "artifacts" / "models" / "kl_ae" / "run.json").read_text())["run_id"]
    assert after["parts"]["autoencoder"]["training_run_id"] == new_run != before["parts"]["autoencoder"]["training_run_id"]
    assert after["parts"]["autoencoder"]["config"]["kl_weight"] == 0.002

"""One end-to-end story on a tiny Fashion-MNIST subset, through the real Prefect engine, MLflow
(SQLite) and DVC (local remote): first run, the README's Python snippet, no-change rerun (which
sweeps leftovers of killed runs), one model's params changed, and a failing model that must leave
its artefacts and registry entry as they were while the other model is still registered."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.config import apply_overrides, read_params_raw
from fashion import needs_fashion_mnist
from model_configs import shrink_every_model
from stack import local_project, set_params

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.limit_per_split=160",
    "classifier.epochs=1", "classifier.batch_size=32",
    *shrink_every_model(REPO / "params.yaml", batch_size=32, width=16),
    "train.srgan.warmup_steps=2",  # past its pixel-MSE warm-up within the 5 steps: the evaluator's features count
    "tracking.log_every=2", "tracking.checkpoint_every=3",
    "evaluate.num_samples=100", "evaluate.kid_subset_size=50", "evaluate.grid_size=16",
]

pytestmark = [pytest.mark.slow, needs_fashion_mnist]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A fresh project checkout (git + DVC) with tiny params, its state in its own .genpipe."""
    with local_project(tmp_path_factory.mktemp("workspace"), apply_overrides(read_params_raw(REPO / "params.yaml"), TINY)) as ws:
        yield ws


@pytest.fixture(scope="module")
def client(workspace):
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def run_retrain():
    from flows.retrain import retrain

    return retrain()


def by_name(result) -> dict:
    return {r.name: r for r in result.registrations}


def test_first_run_trains_evaluates_registers_and_pushes(workspace, client):
    result = run_retrain()

    # The default run: a VAE, an unconditional and a conditional GAN, a 4x super-resolver, an inpainter.
    models = ["vae", "dcgan", "cgan", "srgan", "inpaint"]
    assert set(result.stages_run) == {"ingest", "classifier", "inception",
                                      *(f"{stage}@{m}" for m in models for stage in ("train", "evaluate"))}
    assert result.stages_run.index("ingest") < result.stages_run.index("train@vae") < result.stages_run.index("evaluate@vae")
    assert result.stages_run.index("inception") < result.stages_run.index("evaluate@vae")
    for name in [f"fashion-mnist-{m}" for m in models]:
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == "1"
        for tag in ["dataset_version", "model_md5", "params_hash", "git_commit", "training_run_id",
                    "promotion.decision", "promotion.reason", "metric.fid"]:
            assert champion.tags.get(tag), f"{name} v1 lacks tag {tag}"
        run = client.get_run(champion.tags["training_run_id"])
        assert "eval.fid" in run.data.metrics and run.info.status == "FINISHED"
        assert client.get_metric_history(run.info.run_id, "images_per_sec"), "no live training metrics"
        assert any(a.path == "eval" for a in client.list_artifacts(run.info.run_id))
        report = client.download_artifacts(champion.run_id, "report/report.html")  # each new version's report
        assert by_name(result)[name].report == f"runs:/{champion.run_id}/report/report.html"  # in the summary
        assert f"<title>{name} v1</title>" in Path(report).read_text()

    status = subprocess.run([sys.executable, "-m", "dvc", "status"], capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout
    remote_files = [p for p in (workspace / ".genpipe" / "dvc-remote").rglob("*") if p.is_file()]
    assert len(remote_files) >= 8  # dataset shards + manifest, classifier, the models, their grids

    import mlflow.pyfunc

    images = mlflow.pyfunc.load_model("models:/fashion-mnist-dcgan@champion").predict({"count": 5, "seed": 3})
    assert images.shape == (5, 1, 28, 28) and str(images.dtype) == "uint8"
    again = mlflow.pyfunc.load_model("models:/fashion-mnist-dcgan@champion").predict({"count": 5, "seed": 3})
    assert (images == again).all(), "same seed must give the same images"

    cgan = mlflow.pyfunc.load_model("models:/fashion-mnist-cgan@champion")
    assert cgan.predict({"labels": [7, 7, 9], "seed": 0}).shape == (3, 1, 28, 28)
    assert cgan.predict({"prompt": "ankle boot", "count": 4, "seed": 0}).shape == (4, 1, 28, 28)
    with pytest.raises(Exception, match="prompt:.*names no class this model knows; name one of"):
        cgan.predict({"prompt": "a bicycle", "count": 2})

    low = np.random.default_rng(0).integers(0, 256, (2, 1, 7, 7), dtype=np.uint8)
    assert mlflow.pyfunc.load_model("models:/fashion-mnist-srgan@champion").predict({"images": low}).shape == (2, 1, 28, 28)
    holed, mask = np.full((2, 1, 28, 28), 200, np.uint8), np.zeros((2, 1, 28, 28), np.uint8)
    mask[..., 10:18, 10:18] = 1
    filled = mlflow.pyfunc.load_model("models:/fashion-mnist-inpaint@champion").predict({"images": holed, "mask": mask})
    assert filled.shape == (2, 1, 28, 28) and (filled[mask == 0] == 200).all()  # known pixels kept


def test_metrics_files_match_what_mlflow_holds(workspace, client):
    metrics = json.loads((workspace / "artifacts" / "eval" / "dcgan" / "metrics.json").read_text())
    champion = client.get_model_version_by_alias("fashion-mnist-dcgan", "champion")
    assert float(champion.tags["metric.fid"]) == pytest.approx(metrics["fid"])


def test_sample_command_writes_a_grid_from_the_champion(workspace):
    out = workspace / "grid.png"
    result = subprocess.run(["genpipe", "sample", "--model", "fashion-mnist-vae@champion", "-n", "16", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(out) as grid:
        assert grid.size == (4 * 30 + 2, 4 * 30 + 2)  # 4×4 tiles of 28 px, 2 px padding

    wrong = subprocess.run(["genpipe", "sample", "--model", "fashion-mnist-vae@nope", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2
    assert "alias nope not found" in wrong.stderr and "fashion-mnist-vae (aliases: champion)" in wrong.stderr


def test_readme_python_snippet_runs_as_written(workspace):
    readme = (REPO / "README.md").read_text()
    snippets = [s for s in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "set_tracking_uri" in s]
    assert len(snippets) == 1, "the README has one Python snippet loading the champion from the embedded store"
    check = "\nassert images.shape == (16, 1, 28, 28) and str(images.dtype) == 'uint8', images.shape\nprint('ok')\n"
    # As a user runs it: a fresh interpreter in the project folder, no MLflow variables set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run([sys.executable, "-c", snippets[0] + check], cwd=workspace, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_rerun_without_changes_trains_nothing(workspace, client):
    # Leftovers of killed runs: staged folders, a half-packed dataset, a checkpoint temp, a params temp.
    leftovers = [workspace / "artifacts" / "models" / ".vae.tmp-killed", workspace / "artifacts" / ".dataset.tmp-killed",
                 workspace / "artifacts" / ".dataset.old-killed" / "data", workspace / "artifacts" / "eval" / ".dcgan.tmp-x"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "part.npz").write_bytes(b"half")
    checkpoint_tmp = workspace / ".genpipe" / "checkpoints" / "fashion-mnist-vae" / ".last.pt.tmp-killed"
    checkpoint_tmp.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_tmp.write_bytes(b"half")
    (workspace / ".params.yaml.tmp").write_text("half")
    lock_before = (workspace / "dvc.lock").read_text()
    result = run_retrain()
    assert not [p for p in [*leftovers, checkpoint_tmp, workspace / ".params.yaml.tmp",
                            workspace / "artifacts" / ".dataset.old-killed"] if p.exists()]
    assert result.stages_run == []
    assert all(r.decision == "unchanged" for r in result.registrations)
    assert (workspace / "dvc.lock").read_text() == lock_before
    assert len(client.search_model_versions("name='fashion-mnist-vae'")) == 1


def test_register_uses_the_params_the_run_started_with(workspace, client):
    from prefect import flow

    from components.params import load_params
    from flows.retrain import register

    started = load_params(workspace / "params.yaml")
    original = (workspace / "params.yaml").read_text()

    @flow(name="register-only")
    def register_only():
        set_params(workspace, ["data.name=renamed"])  # params.yaml edited while the run registers
        return register("vae", started)

    try:
        result = register_only()
    finally:
        (workspace / "params.yaml").write_text(original)
    assert (result.name, result.decision) == ("fashion-mnist-vae", "unchanged")
    assert not client.search_registered_models("name='renamed-vae'")


def test_changing_one_models_params_retrains_only_that_model(workspace, client):
    set_params(workspace, ["train.vae.epochs=2"])
    result = run_retrain()
    assert sorted(result.stages_run) == ["evaluate@vae", "train@vae"]
    regs = by_name(result)
    assert regs["fashion-mnist-dcgan"].decision == regs["fashion-mnist-cgan"].decision == "unchanged"
    vae = regs["fashion-mnist-vae"]
    assert vae.version == "2" and vae.decision in {"promoted", "kept"}
    v2 = client.get_model_version("fashion-mnist-vae", "2")
    assert v2.tags["promotion.decision"] == vae.decision and "fid" in v2.tags["promotion.reason"]
    assert str(client.get_model_version_by_alias("fashion-mnist-vae", "challenger").version) == "2"
    champion = str(client.get_model_version_by_alias("fashion-mnist-vae", "champion").version)
    assert champion == ("2" if vae.decision == "promoted" else "1")


def test_new_evaluator_rescores_the_champion_before_comparing(workspace, client):
    set_params(workspace, ["classifier.epochs=2", "train.vae.seed=1"])  # other evaluator features, new VAE
    result = run_retrain()
    assert {"classifier", "train@vae", "evaluate@vae", "evaluate@dcgan", "train@srgan"} <= set(result.stages_run)
    vae = by_name(result)["fashion-mnist-vae"]
    assert vae.version == "3"
    v3 = client.get_model_version("fashion-mnist-vae", "3")
    assert float(v3.tags["promotion.champion_score"]) > 0
    assert v3.tags["evaluator_md5"] != client.get_model_version("fashion-mnist-vae", "1").tags["evaluator_md5"]
    assert f"{float(v3.tags['promotion.champion_score']):.4g}" in vae.reason  # compared with the new score
    protocol = json.loads((workspace / "artifacts" / "eval" / "vae" / "protocol.json").read_text())
    assert v3.tags["protocol"] == json.dumps(protocol, sort_keys=True) and "promotion.pending" not in v3.tags
    score_tag = f"score.{v3.tags['protocol_key']}.fid"  # the champion's re-score, kept on the champion
    rescored = [mv for mv in client.search_model_versions("name='fashion-mnist-vae'") if score_tag in mv.tags]
    assert len(rescored) == 1 and float(rescored[0].tags[score_tag]) == float(v3.tags["promotion.champion_score"])
    # srgan learns from the evaluator's features: retrained, and gated on psnr_gain against its champion,
    # re-scored on today's degraded inputs sent through its registered pyfunc.
    srgan = client.get_model_version("fashion-mnist-srgan", by_name(result)["fashion-mnist-srgan"].version)
    assert str(srgan.version) == "2" and "psnr_gain" in srgan.tags["promotion.reason"]
    champion = client.get_model_version("fashion-mnist-srgan", "1").tags
    rescored_gain = float(champion[f"score.{srgan.tags['protocol_key']}.psnr_gain"])
    assert rescored_gain == float(srgan.tags["promotion.champion_score"])


def test_failed_model_leaves_its_artefacts_untouched_and_the_other_model_registers(workspace, client):
    from flows.retrain import RetrainFailed

    model_file = workspace / "artifacts" / "models" / "dcgan" / "model.safetensors"
    metrics_file = workspace / "artifacts" / "metrics" / "train-dcgan.json"
    metrics_before = metrics_file.read_text()
    weights_before = model_file.read_bytes()
    versions_before = len(client.search_model_versions("name='fashion-mnist-dcgan'"))
    vae_versions_before = len(client.search_model_versions("name='fashion-mnist-vae'"))
    # dcgan: larger than the data, the trainer refuses; vae: a new seed, so it trains in the same run.
    set_params(workspace, ["train.dcgan.batch_size=100000", "train.vae.seed=2"])

    with pytest.raises(RetrainFailed) as failed:
        run_retrain()

    message = str(failed.value)
    assert "retrain failed for model(s) dcgan:" in message and "train@dcgan" in message
    assert "vae" not in message.split("registered anyway")[0], message
    result = failed.value.result
    assert list(result.failures) == ["train@dcgan"] and result.skipped == ["evaluate@dcgan"]
    assert {"train@vae", "evaluate@vae"} <= set(result.stages_run)
    vae = by_name(result)["fashion-mnist-vae"]
    assert vae.version == str(vae_versions_before + 1), "the healthy model is registered in the failed run"
    assert len(client.search_model_versions("name='fashion-mnist-vae'")) == vae_versions_before + 1
    assert "fashion-mnist-dcgan" not in by_name(result)

    assert model_file.read_bytes() == weights_before, "previous good weights must be restored"
    assert metrics_file.read_text() == metrics_before, "uncached metrics files must be restored too"
    assert len(client.search_model_versions("name='fashion-mnist-dcgan'")) == versions_before
    assert str(client.get_model_version_by_alias("fashion-mnist-dcgan", "champion").version) == "1"
    set_params(workspace, ["train.dcgan.batch_size=32"])

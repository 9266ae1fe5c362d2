"""A team installation, all real and on loopback (tests/stack.py): Prefect server, MLflow server with
S3 artefacts, an S3 DVC remote, two process workers on the training pool and one on the retrain
pool. `genpipe deploy` then `genpipe retrain` trains two models at once on the two workers and
registers both; the retrain workspace ends clean and a fresh clone pulls every output bit for bit;
the scheduled deployment's run with nothing changed trains nothing; an S3 outage fails clearly
and changes neither the registry nor the remote."""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fashion import needs_fashion_mnist
from model_configs import shrink_every_model
from stack import BUCKET, REPO, RETRAIN_POOL, TRAINING_POOL, dvc_config, genpipe, make_project, team

MODELS = ["vae", "dcgan"]

pytestmark = [pytest.mark.slow, needs_fashion_mnist]


SECRET = "webhook-test-secret"


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on loopback: `received` holds genpipe's messages whose signature checks out,
    `mlflow` MLflow's own registry deliveries likewise, `forged` anything else."""

    def __init__(self):
        from components.notify import verify_signature

        self.received, self.mlflow, self.forged = [], [], []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers["Content-Length"])).decode()
                sender = "X-Genpipe" if handler.headers.get("X-Genpipe-Signature") else "X-MLflow"
                signed = verify_signature(SECRET, handler.headers.get(f"{sender}-Delivery-Id", ""),
                                          handler.headers.get(f"{sender}-Timestamp", ""), body,
                                          handler.headers.get(f"{sender}-Signature", ""))
                inbox = self.forged if not signed else self.received if sender == "X-Genpipe" else self.mlflow
                inbox.append(json.loads(body))
                handler.send_response(204)
                handler.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/secret-token"


@pytest.fixture(scope="module")
def installation(tmp_path_factory):
    base = tmp_path_factory.mktemp("team")
    overrides = ["data.limit_per_split=160", "classifier.epochs=1", "classifier.batch_size=32",
                 *shrink_every_model(REPO / "params.yaml", batch_size=32, width=16),
                 "evaluate.num_samples=100", "evaluate.kid_subset_size=50", "evaluate.grid_size=16",
                 f"deploy.work_pool={RETRAIN_POOL}", f"deploy.training_pool={TRAINING_POOL}",
                 "deploy.timezone=Europe/Berlin"]
    overrides = [o for o in overrides if o.split(".")[1] in MODELS or not o.startswith("train.")]
    receiver = Receiver()

    ws = base / "project"
    with team(base / "servers", workers=2, retrain_worker_home=ws / ".genpipe",
              extra_env={"GENPIPE_WEBHOOK_URL": receiver.url, "GENPIPE_WEBHOOK_SECRET": SECRET}) as crew:
        make_project(ws, MODELS, overrides, remote=f"s3://{BUCKET}/dvc", endpoint=crew.s3)
        yield crew, ws, crew.client_env(ws / ".genpipe"), receiver
    receiver.shutdown()


@contextlib.contextmanager
def prefect_client(crew):
    """A client of the team's server, whatever another test of this process set Prefect to."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: crew.api}), get_client(sync_client=True) as client:
        yield client


def train_model_runs(crew) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with prefect_client(crew) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-model"])))


def stage_runs(crew, addressing: str) -> list:
    """The Prefect task runs of one DVC stage (they run inside the workers' train-model flow runs,
    inside the model's training slot), oldest first."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with prefect_client(crew) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[addressing])))
    return sorted(runs, key=lambda r: r.start_time)


def worker_of(crew, flow_run_id) -> int:
    """Which of the two training workers ran a flow run: both may try to submit it, the server lets one."""
    def took(log: str) -> bool:
        return f"submitting flow run '{flow_run_id}'" in log and f"Aborted submission of flow run '{flow_run_id}'" not in log

    [worker] = [w for w in (0, 1) if took((crew.root / f"worker-{w}.log").read_text())]
    return worker


def version_counts(crew) -> list[int]:
    client = mlflow_client(crew)
    return [len(client.search_model_versions(f"name='fashion-mnist-{m}'")) for m in MODELS]


def mlflow_client(crew):
    from mlflow import MlflowClient

    return MlflowClient(crew.tracking)


def test_deploy_creates_the_scheduled_deployments_idempotently(installation):
    crew, ws, env, _ = installation
    first = genpipe(["deploy"], ws, env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "deployment retrain/retrain on pool genpipe" in first.stdout
    assert "MLflow's registry webhook genpipe-model-alias" in first.stdout, first.stdout
    second = genpipe(["deploy"], ws, env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    with prefect_client(crew) as client:
        retrain = client.read_deployment_by_name("retrain/retrain")
        train_model = client.read_deployment_by_name("train-model/train-model")
        assert len(client.read_deployments()) == 2, "a second deploy must update, not add"
    assert (retrain.work_pool_name, train_model.work_pool_name) == (RETRAIN_POOL, TRAINING_POOL)
    [schedule] = retrain.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * 1", "Europe/Berlin")


def trigger_retrain(ws: Path, env: dict) -> subprocess.CompletedProcess:
    """Start the retrain deployment as its schedule does, and wait for the run's end."""
    return subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run", "retrain/retrain",
                           "--watch", "--watch-timeout", "600"], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=700)


def test_models_train_at_once_on_two_workers_and_are_registered(installation):
    """The retrain deployment's run (on the retrain pool's worker) sends each model to a training worker."""
    crew, ws, env, receiver = installation
    result = trigger_retrain(ws, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    runs = train_model_runs(crew)
    assert sorted(r.parameters["model"] for r in runs) == sorted(MODELS)
    assert all(r.state.is_completed() for r in runs)
    assert sorted(worker_of(crew, r.id) for r in runs) == [0, 1], "each worker should take one model"
    # The two flow runs are in flight together; their tiny train stages (a few seconds) need not be,
    # when one worker starts its process later on a loaded machine.
    (a_start, a_end), (b_start, b_end) = [(r.start_time, r.end_time) for r in runs]
    assert a_start < b_end and b_start < a_end, "the two models' flow runs did not overlap"

    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr

    from servers import bucket_keys

    keys = bucket_keys(crew.s3, BUCKET)
    client = mlflow_client(crew)
    for model in MODELS:
        champion = client.get_model_version_by_alias(f"fashion-mnist-{model}", "champion")
        assert champion.tags["dvc_remote"] == f"s3://{BUCKET}/dvc"
        md5 = champion.tags["dataset_md5"]
        assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys, "the registered data version is not in S3"
        run = client.get_run(champion.tags["training_run_id"])
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert any(k.startswith("mlflow/") for k in keys), "no MLflow artefact reached the bucket"

    champions = sorted(m["model"] for m in receiver.received if m["event"] == "genpipe.model.champion")
    assert champions == [f"fashion-mnist-{m}" for m in sorted(MODELS)]
    assert not receiver.forged
    deadline = time.monotonic() + 30  # MLflow's server sends its deliveries from a thread pool
    while len(receiver.mlflow) < len(MODELS) and time.monotonic() < deadline:
        time.sleep(0.2)
    aliases = sorted((m["data"]["name"], m["data"]["alias"]) for m in receiver.mlflow)
    assert aliases == [(f"fashion-mnist-{m}", "champion") for m in sorted(MODELS)], receiver.mlflow


def test_a_fresh_clone_pulls_every_output_bit_for_bit(installation, tmp_path):
    crew, ws, env, _ = installation
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    for name in ["params.yaml", "dvc.lock", ".dvc/config.local"]:
        (clone / name).write_bytes((ws / name).read_bytes())
    pull = subprocess.run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=clone, env=env, capture_output=True, text=True)
    assert pull.returncode == 0, pull.stderr

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted((root / "artifacts").rglob("*")) if p.is_file() and p.name != ".gitignore"}

    assert digests(clone) == digests(ws) and len(digests(ws)) > 10


def test_the_scheduled_deployment_with_nothing_changed_trains_nothing(installation):
    crew, ws, env, receiver = installation
    before, messages, versions = len(train_model_runs(crew)), len(receiver.received), version_counts(crew)
    started = time.monotonic()
    run = trigger_retrain(ws, env)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(train_model_runs(crew)) == before, "an unchanged run dispatched training"
    assert len(receiver.received) == messages, "an unchanged run announced something"
    with prefect_client(crew) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        summaries = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-summary"])))
    assert "nothing changed" in max(summaries, key=lambda a: a.created).data
    assert version_counts(crew) == versions
    print(f"unchanged scheduled run, trigger to completed: {elapsed:.1f} s")


def test_an_s3_outage_fails_clearly_and_leaves_registry_and_remote_as_they_were(installation):
    crew, ws, env, receiver = installation
    from servers import bucket_keys, free_port

    keys, versions = sorted(bucket_keys(crew.s3, BUCKET)), version_counts(crew)
    params = (ws / "params.yaml").read_text()
    dead = f"http://127.0.0.1:{free_port()}"
    dvc_config(ws, "remote", "modify", "--local", "storage", "endpointurl", dead)
    try:
        result = genpipe(["retrain", "--set", "train.dcgan.lr=0.0003"], ws, env, timeout=600)
    finally:
        dvc_config(ws, "remote", "modify", "--local", "storage", "endpointurl", crew.s3)
    assert result.returncode != 0
    assert "push" in result.stderr and dead.split("//")[1] in result.stderr, result.stderr[-3000:]
    assert (ws / "params.yaml").read_text() == params, "a failed run must restore params.yaml"
    assert sorted(bucket_keys(crew.s3, BUCKET)) == keys
    assert version_counts(crew) == versions
    assert receiver.received[-1]["event"] == "genpipe.retrain.failed"


def test_an_mlflow_outage_fails_clearly_and_registers_nothing(installation):
    crew, ws, env, receiver = installation
    from servers import free_port

    versions = version_counts(crew)
    dead = f"127.0.0.1:{free_port()}"
    # vae trains anew on a worker (whose MLflow is up); this run's registrations find MLflow down.
    result = genpipe(["retrain", "--set", "train.vae.seed=5"], ws, {**env, "MLFLOW_TRACKING_URI": f"http://{dead}"},
                     timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "train@vae" not in result.stderr.split("retrain failed for")[-1], "the training itself must succeed"
    assert all(f"register@{m}" in result.stderr for m in MODELS) and dead in result.stderr, result.stderr[-3000:]
    assert version_counts(crew) == versions, "nothing may be half-registered"
    assert receiver.received[-1]["event"] == "genpipe.retrain.failed"


def test_two_runs_of_one_model_at_once_train_it_once_and_register_it_once(installation, tmp_path):
    """A teammate's clone and this workspace retrain vae with the same change at the same moment, on
    the two workers. The model's training slot lets one train while the other waits; the waiting one
    then restores that identical run from DVC's run cache on the remote instead of training again, and
    its registration (in turn, under the registration slot) finds the version already registered."""
    crew, ws, env, _ = installation
    other = tmp_path / "teammate"
    subprocess.run(["git", "clone", "-q", str(ws), str(other)], check=True)
    for name in ["params.yaml", "dvc.lock", ".dvc/config.local"]:
        (other / name).write_bytes((ws / name).read_bytes())
    other_env = crew.client_env(other / ".genpipe")
    subprocess.run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=other, env=other_env, check=True)
    client = mlflow_client(crew)
    before = {v.version for v in client.search_model_versions("name='fashion-mnist-vae'")}
    dispatched = {r.id for r in train_model_runs(crew)}

    change = ["retrain", "--set", "train.vae.lr=0.0007"]
    runs = [subprocess.Popen([str(Path(sys.executable).parent / "genpipe"), *change], cwd=where, env=e,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for where, e in [(ws, env), (other, other_env)]]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    new_runs = [r for r in train_model_runs(crew) if r.id not in dispatched]
    assert sorted(worker_of(crew, r.id) for r in new_runs) == [0, 1], "both workers should have a vae run"
    first, second = [(t.start_time, t.end_time) for t in stage_runs(crew, "train@vae")][-2:]
    assert first[1] <= second[0], f"the two train@vae stages overlapped: {first}, {second}"
    new = [v for v in client.search_model_versions("name='fashion-mnist-vae'") if v.version not in before]
    assert len(new) == 1, f"registered twice: {[v.version for v in new]}\n" + "\n".join(o[-1500:] for o in outputs)
    assert "promotion.decision" in new[0].tags and "promotion.pending" not in new[0].tags
    said = sorted(o.split(f"fashion-mnist-vae: version {new[0].version}, ")[1].split(" ")[0] for o in outputs)
    assert said[1] == "unchanged" and said[0] in ("kept", "promoted"), said


def test_one_model_failing_on_its_worker_does_not_stop_the_other(installation):
    crew, ws, env, receiver = installation
    client = mlflow_client(crew)
    dcgan_versions = len(client.search_model_versions("name='fashion-mnist-dcgan'"))
    vae_versions = len(client.search_model_versions("name='fashion-mnist-vae'"))
    # dcgan: a batch larger than the data, the trainer refuses; vae: a new seed, so it trains meanwhile.
    result = genpipe(["retrain", "--set", "train.dcgan.batch_size=100000", "--set", "train.vae.seed=3"], ws, env)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "retrain failed for model(s) dcgan:" in result.stderr and "train@dcgan: WorkerRunFailed" in result.stderr
    assert len(client.search_model_versions("name='fashion-mnist-vae'")) == vae_versions + 1
    assert len(client.search_model_versions("name='fashion-mnist-dcgan'")) == dcgan_versions
    failed = receiver.received[-1]
    assert failed["event"] == "genpipe.retrain.failed" and "dcgan" in failed["model"], failed

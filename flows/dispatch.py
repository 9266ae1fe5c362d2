"""The retrain run's side of per-model training on workers (params.yaml `deploy.training_pool`): each
model whose stages are out of date becomes a flow run of the `train-model` deployment; they run at
once, each on whichever worker of the pool takes it, except that a model built on another (an ldm on
its autoencoder) waits for that one's run and is dispatched in the next wave. The lock entries they
hand back are merged into this workspace's dvc.lock and their outputs pulled, so this workspace ends
as if it had trained them."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from components.config import PARAMS_FILE, Params
from components.state import redact_uri
from components.versioning import dvc_pipeline as dvc
from flows.policies import IO_RETRIES
from flows.workers import handback_key, read_handback

TRAIN_DEPLOYMENT = "train-model/train-model"  # flow name / deployment name, as `genpipe deploy` creates it


class WorkerRunFailed(RuntimeError):
    """A model's flow run on the training pool did not complete; the message has its state and name."""


def check_dispatchable(repo, params: Params) -> None:
    """Refuse, before any stage runs, what workers could not reproduce: uncommitted code, a remote or
    code source with credentials in its URL (job parameters are stored and shown by Prefect)."""
    from components.versioning.worker_workspace import WorkspaceError, head_commit

    head_commit(Path(repo.root_dir))
    remote = dvc.remote_settings(repo)["url"]
    if params.deploy.source != "." and "://" not in remote:
        raise WorkspaceError(f"the default DVC remote is a folder ({remote}), but workers clone deploy.source and may "
                             f"run anywhere: set GENPIPE_DVC_REMOTE=s3://bucket/path (or `dvc remote add -d --global`)")
    for what, url in [("the default DVC remote's URL", remote),
                      ("deploy.source", params.deploy.source)]:
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise WorkspaceError(f"{what} holds credentials ({redact_uri(url)}); workers get it as a flow-run "
                                 f"parameter: give them credentials by environment (AWS_*, a git credential helper)")


def training_job(repo, params: Params) -> dict:
    """What a worker needs to stand where this workspace stands: the commit, this run's params.yaml and
    dvc.lock (the shared stages' entries included), and the DVC remote to pull from and push to."""
    from components.versioning.worker_workspace import head_commit

    root = Path(repo.root_dir)
    source = params.deploy.source
    lock = root / dvc.LOCK_FILE
    return {
        "source": str(root) if source == "." else source,
        "commit": head_commit(root),
        "params_yaml": (root / PARAMS_FILE).read_text(),
        "dvc_lock": lock.read_text() if lock.exists() else None,
        "remote": dvc.remote_settings(repo),
    }


def out_of_date(repo, models: list[str]) -> list[str]:
    """The models whose train/evaluate stages DVC would run here: the others need no worker."""
    needs = dvc.stage_needs(repo)
    return [m for m in models if not all(dvc.is_current(repo, a) for a in dvc.model_stages(needs, m))]


@task(cache_policy=NONE, task_run_name="train-model {model}")  # no retries: the worker's run resumes from its checkpoint
def train_on_worker(model: str, job: dict, timeout_s: float) -> dict:
    """Run the model's train-model flow run on the training pool and wait; returns its lock entries."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(TRAIN_DEPLOYMENT, parameters={"model": model, "job": job}, timeout=timeout_s,
                              poll_interval=2, flow_run_name=f"train-{model}")
    state = flow_run.state
    if state is None or not state.is_completed():
        where = f"flow run {flow_run.name} ({flow_run.id})"
        if state is None or not state.is_final():
            _cancel(flow_run.id)  # it would hold the model's training slot and a worker on for nothing
            raise WorkerRunFailed(f"{where} not finished after {timeout_s:.0f} s (deploy.model_timeout_s), "
                                  f"cancelled; is a worker polling the training pool?")
        raise WorkerRunFailed(f"{where} ended {state.name}: {state.message or 'no message'}")
    get_run_logger().info("%s trained and evaluated by flow run %s", model, flow_run.name)
    return _handback(flow_run.id, model)


def _cancel(flow_run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="deploy.model_timeout_s passed"), force=True)


def _handback(flow_run_id, model: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[handback_key(model)])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    if not artifacts:
        raise WorkerRunFailed(f"flow run {flow_run_id} completed without its {handback_key(model)} artifact")
    return read_handback(artifacts[0].data)


@task(cache_policy=NONE, **IO_RETRIES)
def take_back(model: str, entries: dict) -> None:
    """Merge a worker's lock entries into dvc.lock and check its outputs out from the remote."""
    repo = dvc.open_repo()
    before = dvc.lock_text(repo)
    dvc.merge_lock_entries(repo, entries)
    try:
        dvc.pull(dvc.open_repo(), list(entries))  # reopened: the index reads the merged lock
    except Exception:
        dvc.restore_lock_text(repo, before)  # the lock must not name outputs this workspace does not hold
        raise
    get_run_logger().info("%s: merged %s into dvc.lock and pulled their outputs", model, ", ".join(entries))


def train_models_on_workers(repo, params: Params) -> tuple[list[str], dict[str, str]]:
    """Dispatch the out-of-date models in waves: every model of a wave at once, a model built on another
    (an ldm on its autoencoder) in a wave after it, with a job holding the lock its base's worker handed
    back, so it trains on the new base. Returns (stages run, failures by stage address)."""
    from flows.runtime import describe

    from components.params import built_on, unfit_models

    trainable = [m for m in params.models if m not in unfit_models(params)]  # the others: skipped, with why
    bases = {m: built_on(params, m) for m in trainable}
    ran, failures, handled = [], {}, set()
    while pending := out_of_date(dvc.open_repo(repo.root_dir), [m for m in trainable if m not in handled]):
        wave, blocked = next_wave(pending, bases, {address.partition("@")[2] for address in failures})
        failures.update({params.stage_of("train", m): why for m, why in blocked.items()})
        handled |= set(wave) | set(blocked)
        if not wave:
            break
        job = training_job(dvc.open_repo(repo.root_dir), params)  # the lock as the previous waves left it
        futures = {m: train_on_worker.submit(m, job, params.deploy.model_timeout_s) for m in wave}
        for model, future in futures.items():
            try:
                entries = future.result()
                take_back(model, entries)
                ran += list(entries)
            except Exception as exc:
                failures[params.stage_of("train", model)] = describe(exc)
    unchanged = sorted(set(trainable) - handled)
    if unchanged:
        get_run_logger().info("unchanged, no worker needed: %s", ", ".join(unchanged))
    return ran, failures


def next_wave(pending: list[str], bases: dict[str, list[str]], failed: set[str]) -> tuple[list[str], dict[str, str]]:
    """Of the out-of-date models `pending`: (those to dispatch now, {model: why it is not trained}). A model
    waits while a model it is built on (`bases`: an ldm's autoencoder) is pending, and is not trained once
    one of them failed."""
    blocked = {m: f"not trained: {failing[0]}, which it is built on, failed"
               for m in pending if (failing := [b for b in bases.get(m, []) if b in failed])}
    wave = [m for m in pending if m not in blocked and not set(bases.get(m, [])) & set(pending)]
    return wave, blocked

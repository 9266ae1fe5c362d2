"""The `retrain` flow: walk DVC's stage graph, let DVC skip what is unchanged, push, register."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from components.config import Params
from components.params import load_params, unfit_models
from components.tracking.registry import Registration, model_kind, register_model
from components.versioning import dvc_pipeline as dvc
from components.workspace import retrain_lock, sweep_checkpoints, sweep_stale
from flows.policies import IO_RETRIES, registration_slot, training_slot
from flows.notifications import announce
from flows.runtime import describe, prepare_process


@dataclass(frozen=True)
class RetrainResult:
    stages_run: list[str]
    registrations: list[Registration]
    failures: dict[str, str] = field(default_factory=dict)  # failed stage (or register@model) -> error
    skipped: list[str] = field(default_factory=list)  # stages not run because a stage they need failed
    not_trained: dict[str, str] = field(default_factory=dict)  # model -> why its family cannot learn from this data


class RetrainFailed(RuntimeError):
    """Some models failed; the others were still pushed and registered (see .result)."""

    def __init__(self, result: RetrainResult):
        self.result = result
        failed = sorted({_model_of(a) or a for a in result.failures})
        lines = [f"retrain failed for model(s) {', '.join(failed)}:"]
        lines += [f"  {where}: {error}" for where, error in result.failures.items()]
        if result.skipped:
            lines.append(f"  skipped, as they need a failed stage: {', '.join(result.skipped)}")
        done = ", ".join(f"{r.name} v{r.version} ({r.decision})" for r in result.registrations)
        lines.append(f"  registered anyway: {done or 'none'}")
        super().__init__("\n".join(lines))


@task(cache_policy=NONE, task_run_name="{addressing}")
def run_stage(addressing: str) -> bool:
    """Reproduce one DVC stage; True if it ran, False if DVC found it up to date."""
    ran = dvc.reproduce_stage(dvc.open_repo(), addressing)
    get_run_logger().info("%s: %s", addressing, "ran" if ran else "unchanged, skipped")
    return ran


@task(cache_policy=NONE, **IO_RETRIES)
def push_artifacts() -> int:
    """Push the dataset, classifier, models and grids to the DVC remote (retried: it is I/O)."""
    pushed = dvc.push(dvc.open_repo())
    get_run_logger().info("dvc push: %d file(s) sent", pushed)
    return pushed


@task(cache_policy=NONE, **IO_RETRIES)
def register(model: str, params: Params) -> Registration:
    """Register one evaluated model in MLflow and decide its aliases, under the params the run started with."""
    from components.tracking.registry import registered_already

    repo = dvc.open_repo()
    name = params.registered_name(model)
    train_stage = params.stage_of("train", model)
    model_dir = dvc.stage_paths(repo, train_stage)["out"]
    model_md5 = dvc.locked_md5(repo.root_dir, train_stage, model_dir)
    done = registered_already(name, model_md5)  # the common case of a scheduled run: nothing new to judge
    if done is not None:
        get_run_logger().info("%s v%s: %s (%s)", done.name, done.version, done.decision, done.reason)
        return done
    from components.pipeline import dataset_version, rescore_registered

    data_dir = dvc.stage_paths(repo, "ingest")["out"]
    classifier_dir = dvc.stage_paths(repo, "classifier")["out"]
    eval_dir = dvc.stage_paths(repo, params.stage_of("evaluate", model))["metrics"].parent
    lineage = {
        "dataset_version": dataset_version(data_dir),  # content hash: the same value as model.json's
        "dataset_md5": dvc.locked_md5(repo.root_dir, "ingest", data_dir),
        "dvc_remote": dvc.remote_url(repo),  # where that dataset version and the model files are stored
        "evaluator_md5": dvc.locked_md5(repo.root_dir, "classifier", classifier_dir),
        "model_md5": model_md5,
        "params_hash": _params_hash(params, model),
        "git_commit": _git_commit(repo.root_dir),
        "training_run_id": _training_run_id(model_dir),
    }
    metric = params.registry.metric_for(model_kind(model_dir))

    def rescore(version: str, protocol: dict) -> dict:
        return rescore_registered(f"models:/{name}/{version}", metric, protocol, data_dir, classifier_dir,
                                  model_dir)

    result = register_model(name, model_dir, eval_dir, lineage, params.registry, rescore)
    get_run_logger().info("%s v%s: %s (%s)", result.name, result.version, result.decision, result.reason)
    return replace(result, report=_log_report(result, data_dir))


def _log_report(registration: Registration, data_dir: Path) -> str | None:
    """The new version's HTML report, logged with its run. The registration has been made: a
    report that cannot be drawn is a warning, never a failed registration."""
    from components.reporting.report import log_report

    logger = get_run_logger()
    try:
        uri = log_report(registration.name, registration.version, data_dir)
    except Exception as exc:  # noqa: BLE001 - any failure of the pictures leaves the registry as it is
        logger.warning("%s v%s: no report (%s: %s)", registration.name, registration.version,
                       type(exc).__name__, exc)
        return None
    logger.info("%s v%s: report at %s", registration.name, registration.version, uri)
    return uri


@flow(name="retrain", log_prints=True)
def retrain(persistent_workspace: bool = False) -> RetrainResult:
    """Ingest → classifier → train → evaluate (as DVC decides) → push → register.

    A failing train@X / evaluate@X (train_latent@X, evaluate_latent@X) skips only the stages that need it;
    the other models are still pushed and registered, then the flow fails naming what failed. A failing shared stage (ingest,
    classifier) stops everything. With `deploy.training_pool` set, each model's train + evaluate is
    a flow run on that pool's workers, at once except a model built on another, which waits for it
    (flows/dispatch.py).

    persistent_workspace: set by `genpipe deploy` for a git source, whose runs start in a fresh clone:
    the run moves to $GENPIPE_HOME/workspaces/retrain at the clone's commit, where DVC's state lives on.
    """
    if persistent_workspace:
        _enter_persistent_workspace()
    prepare_process()  # a deployment's run starts here, not in the CLI
    with retrain_lock():  # re-entrant: already held when `genpipe retrain` called this flow
        try:
            result = _train_and_register(load_params())  # bad params fail before any work starts
        except Exception as exc:
            announce([], {"retrain": describe(exc)})
            raise
        publish_summary(result)
        announce(result)  # Prefect events, and the webhook when GENPIPE_WEBHOOK_URL is set
        if result.failures:
            raise RetrainFailed(result)
        return result


def _enter_persistent_workspace() -> None:
    import os

    from components.config import ConfigError
    from components.versioning.worker_workspace import persistent_copy

    home = os.environ.get("GENPIPE_HOME")
    if not home:
        raise ConfigError("deploy.source is a git URL, so this run started in a throw-away clone: set GENPIPE_HOME "
                          "on the retrain pool's workers to a lasting folder, where the run keeps its workspace")
    workspace = persistent_copy(Path.cwd(), Path(home).resolve() / "workspaces" / "retrain")
    os.chdir(workspace)
    get_run_logger().info("working in %s at commit %s", workspace, _git_commit(str(workspace)))


def _train_and_register(params: Params) -> RetrainResult:
    """The run under the workspace lock; `params` are the ones registered."""
    repo = dvc.open_repo()
    _sweep_leftovers(repo)
    not_trained = unfit_models(params)  # e.g. colorize on a grey dataset: skipped with the reason, not failed
    for model, why in not_trained.items():
        get_run_logger().warning("%s: not trained: %s", model, why)
    if params.deploy.training_pool:
        from flows.dispatch import check_dispatchable, train_models_on_workers

        check_dispatchable(repo, params)  # before any work: refused code changes, a remote workers can use
        ran, _, skipped = _run_stages(repo, params, shared_only=True)  # ingest, classifier: a failure raises
        push_artifacts()  # the workers pull the dataset and the classifier from the remote
        on_workers, failures = train_models_on_workers(repo, params)
        ran += on_workers
    else:
        ran, failures, skipped = _run_stages(repo, params)
        push_artifacts()
    blocked = {_model_of(a, params) for a in [*failures, *skipped]} | set(not_trained)
    registrations = []
    for model in params.models:
        if model in blocked:
            continue
        try:
            with registration_slot(params.registered_name(model)):
                registrations.append(register(model, params))
        except Exception as exc:
            failures[f"register@{model}"] = describe(exc)
    return RetrainResult(stages_run=ran, registrations=registrations, failures=failures, skipped=skipped,
                         not_trained=not_trained)


def _run_stages(repo, params: Params, shared_only: bool = False) -> tuple[list[str], dict[str, str], list[str]]:
    """Run the DVC stages in order (only those of no model, with shared_only; never those of a model the data
    cannot train, unfit_models); returns (ran, failures, skipped)."""
    ran, failures, skipped = [], {}, []
    not_trained = unfit_models(params)
    for addressing, needs in dvc.stage_needs(repo).items():
        model = _model_of(addressing, params)
        if (shared_only and model is not None) or model in not_trained:
            continue
        if any(n in failures or n in skipped for n in needs):
            skipped.append(addressing)
            continue
        try:
            with _training_slot(addressing, params):
                if run_stage(addressing):
                    ran.append(addressing)
        except Exception as exc:
            if model is None:
                raise  # a shared stage: no model can be trusted without it
            failures[addressing] = describe(exc)
    return ran, failures, skipped


def _training_slot(addressing: str, params: Params):
    """A model's train stage (train@X, train_latent@X) holds its training slot (with a Prefect server), as a
    worker's run of it does."""
    import contextlib

    model = _model_of(addressing, params)
    if model is None or addressing != params.stage_of("train", model):
        return contextlib.nullcontext()
    return training_slot(params.registered_name(model))


def publish_summary(result: RetrainResult) -> None:
    """What the run did, in its log and as its `retrain-summary` artifact in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    if not result.stages_run and not result.failures and all(r.decision == "unchanged" for r in result.registrations):
        line = "nothing changed: no stage ran, nothing trained, nothing new registered"
    else:
        line = f"stages run: {', '.join(result.stages_run) or 'none'}"
    logger.info(line)
    rows = [f"| {r.name} | {r.version} | {r.decision} | {r.reason} | {r.report or ''} |" for r in result.registrations]
    rows += [f"| {where} | | failed | {error} | |" for where, error in result.failures.items()]
    rows += [f"| {model} | | not trained | {why} | |" for model, why in result.not_trained.items()]
    create_markdown_artifact(key="retrain-summary", description="what this retrain run did",
                             markdown="\n".join([f"**{line}**", "", "| model | version | decision | reason | report |",
                                                 "|---|---|---|---|---|", *rows]))

def _sweep_leftovers(repo) -> None:
    """Temp files and folders of killed runs: beside every stage output (and beside the folder a file
    output was staged in), under the checkpoints, beside params.yaml. Only genpipe's own temp names
    (components.workspace.is_temp_of, `.last.pt.tmp-*`): an editor's `.params.yaml.swp` stays. Under
    DVC's lock too, so no `dvc repro` in this workspace is writing them."""
    outs = dvc.output_paths(repo)
    paths = [*outs, *(p.parent for p in outs if not p.is_dir()), Path(repo.root_dir) / "params.yaml"]
    with dvc.workspace_locked(repo):
        swept = sweep_stale(dict.fromkeys(paths)) + sweep_checkpoints()
    if swept:
        get_run_logger().info("removed %d leftover(s) of interrupted runs: %s", len(swept), ", ".join(map(str, swept)))


def _model_of(addressing: str, params: Params | None = None) -> str | None:
    """The model a per-model stage (`train@vae`, `register@vae`) belongs to; None for a shared stage."""
    _, at, key = addressing.partition("@")
    return key if at and (params is None or key in params.models) else None


def _params_hash(params, model: str) -> str:
    from components.config import config_hash

    return config_hash(params.data, params.model(model), params.evaluate)


def _training_run_id(model_dir: Path) -> str:
    import json

    run_file = model_dir / "run.json"
    return json.loads(run_file.read_text())["run_id"] if run_file.exists() else ""


def _git_commit(root: str) -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no") else "")

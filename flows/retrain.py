"""The `retrain` flow: walk DVC's stage graph, let DVC skip what is unchanged, push, register."""
from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from components.config import Params
from components.params import load_params
from components.tracking.registry import Registration, register_model
from components.versioning import dvc_pipeline as dvc
from components.workspace import retrain_lock, sweep_checkpoints, sweep_stale

REGISTER_SLOT_WAIT_S = 1800  # another worker registering the same model: wait this long for it


@dataclass(frozen=True)
class RetrainResult:
    stages_run: list[str]
    registrations: list[Registration]
    failures: dict[str, str] = field(default_factory=dict)  # failed stage (or register@model) -> error
    skipped: list[str] = field(default_factory=list)  # stages not run because a stage they need failed


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


@task(cache_policy=NONE, retries=3, retry_delay_seconds=[2, 10, 30])
def push_artifacts() -> int:
    """Push the dataset, classifier, models and grids to the DVC remote (retried: it is I/O)."""
    pushed = dvc.push(dvc.open_repo())
    get_run_logger().info("dvc push: %d file(s) sent", pushed)
    return pushed


@task(cache_policy=NONE, retries=2, retry_delay_seconds=[5, 20])
def register(model: str, params: Params) -> Registration:
    """Register one evaluated model in MLflow and decide its aliases, under the params the run started with."""
    from components.pipeline import dataset_version, rescore_registered

    repo = dvc.open_repo()
    data_dir = dvc.stage_paths(repo, "ingest")["out"]
    classifier_dir = dvc.stage_paths(repo, "classifier")["out"]
    model_dir = dvc.stage_paths(repo, f"train@{model}")["out"]
    eval_dir = dvc.stage_paths(repo, f"evaluate@{model}")["metrics"].parent
    lineage = {
        "dataset_version": dataset_version(data_dir),  # content hash: the same value as model.json's
        "dataset_md5": dvc.locked_md5(repo.root_dir, "ingest", data_dir),
        "evaluator_md5": dvc.locked_md5(repo.root_dir, "classifier", classifier_dir),
        "model_md5": dvc.locked_md5(repo.root_dir, f"train@{model}", model_dir),
        "params_hash": _params_hash(params, model),
        "git_commit": _git_commit(repo.root_dir),
        "training_run_id": _training_run_id(model_dir),
    }
    name = f"{params.data.name}-{model}"
    metric = params.registry.gating_metric

    def rescore(version: str, protocol: dict) -> float:
        return rescore_registered(f"models:/{name}/{version}", metric, protocol, data_dir, classifier_dir)

    result = register_model(name, model_dir, eval_dir, lineage, params.registry, rescore)
    get_run_logger().info("%s v%s: %s (%s)", result.name, result.version, result.decision, result.reason)
    return result


@flow(name="retrain", log_prints=True)
def retrain() -> RetrainResult:
    """Ingest → classifier → train → evaluate (as DVC decides) → push → register.

    A failing train@X / evaluate@X skips only the stages that need it; the other models are still
    pushed and registered, then the flow fails naming what failed. A failing shared stage (ingest,
    classifier) stops everything.
    """
    with retrain_lock():  # re-entrant: already held when `genpipe retrain` called this flow
        params = load_params()  # fail on bad params before any work starts; these are the params registered
        repo = dvc.open_repo()
        _sweep_leftovers(repo)
        ran, failures, skipped = [], {}, []
        for addressing, needs in dvc.stage_needs(repo).items():
            if any(n in failures or n in skipped for n in needs):
                skipped.append(addressing)
                continue
            try:
                if run_stage(addressing):
                    ran.append(addressing)
            except Exception as exc:
                if _model_of(addressing, params) is None:
                    raise  # a shared stage: no model can be trusted without it
                failures[addressing] = _describe(exc)
        push_artifacts()
        blocked = {_model_of(a, params) for a in [*failures, *skipped]}
        registrations = []
        for model in params.train:
            if model in blocked:
                continue
            try:
                with _registration_slot(f"{params.data.name}-{model}"):
                    registrations.append(register(model, params))
            except Exception as exc:
                failures[f"register@{model}"] = _describe(exc)
        result = RetrainResult(stages_run=ran, registrations=registrations, failures=failures, skipped=skipped)
        if failures:
            raise RetrainFailed(result)
        return result


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
    return key if at and (params is None or key in params.train) else None


def _describe(exc: BaseException | None) -> str:
    """An error and its causes on one line: DVC's ReproductionError carries the command's in __cause__."""
    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


@contextlib.contextmanager
def _registration_slot(registered_name: str) -> Iterator[None]:
    """One registration per registered model at a time across workspaces and workers: a Prefect
    global concurrency limit (limit 1, created when missing) when a Prefect server is configured.
    The embedded ephemeral API serves one workspace, which the workspace lock already serialises."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = registration_limit_name(registered_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another worker created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    try:
        with concurrency(limit, occupy=1, timeout_seconds=REGISTER_SLOT_WAIT_S, strict=True):
            yield
    except TimeoutError:
        raise TimeoutError(f"Prefect concurrency limit {limit!r}: another run kept registering "
                           f"{registered_name} for {REGISTER_SLOT_WAIT_S} s") from None


def registration_limit_name(registered_name: str) -> str:
    return f"genpipe-register-{registered_name}"


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

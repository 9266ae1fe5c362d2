"""The `retrain` flow: walk DVC's stage graph, let DVC skip what is unchanged, push, register."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from components.config import load_params
from components.tracking.registry import Registration, register_model
from components.versioning import dvc_pipeline as dvc


@dataclass(frozen=True)
class RetrainResult:
    stages_run: list[str]
    registrations: list[Registration]


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
def register(model: str) -> Registration:
    """Register one evaluated model in MLflow and decide its aliases."""
    from components.pipeline import rescore_registered

    params = load_params()
    repo = dvc.open_repo()
    data_dir = dvc.stage_paths(repo, "ingest")["out"]
    classifier_dir = dvc.stage_paths(repo, "classifier")["out"]
    model_dir = dvc.stage_paths(repo, f"train@{model}")["out"]
    eval_dir = dvc.stage_paths(repo, f"evaluate@{model}")["metrics"].parent
    lineage = {
        "dataset_version": dvc.locked_md5(repo.root_dir, "ingest", data_dir),
        "evaluator_md5": dvc.locked_md5(repo.root_dir, "classifier", classifier_dir),
        "model_md5": dvc.locked_md5(repo.root_dir, f"train@{model}", model_dir),
        "params_hash": _params_hash(params, model),
        "git_commit": _git_commit(repo.root_dir),
        "training_run_id": _training_run_id(model_dir),
    }
    name = f"{params.data.name}-{model}"
    metric = params.registry.gating_metric

    def rescore(version: str) -> float:
        return rescore_registered(f"models:/{name}/{version}", metric, params, data_dir, classifier_dir)

    result = register_model(name, model_dir, eval_dir, lineage, params.registry, rescore)
    get_run_logger().info("%s v%s: %s (%s)", result.name, result.version, result.decision, result.reason)
    return result


@flow(name="retrain", log_prints=True)
def retrain() -> RetrainResult:
    """Ingest → classifier → train → evaluate (as DVC decides) → push → register."""
    params = load_params()  # fail on bad params before any work starts
    ran = [addressing for addressing in dvc.stage_order(dvc.open_repo()) if run_stage(addressing)]
    push_artifacts()
    return RetrainResult(stages_run=ran, registrations=[register(model) for model in params.train])


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

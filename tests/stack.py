"""A team's genpipe installation on loopback, for tests and benchmarks/bench_orchestration.py: a
committed project checkout with small params, a Prefect server, an MLflow server whose artefacts
go to S3, an S3 bucket as the DVC remote (moto), and process workers on the training pool, each in
a folder of its own. Everything is pointed at by environment variables only, as a user would."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from servers import S3_CREDENTIALS, clean_env, make_bucket, mlflow_server, moto_s3, prefect_server, prefect_worker

REPO = Path(__file__).resolve().parents[1]
BUCKET = "genpipe-team"
TRAINING_POOL = "genpipe-train"
RETRAIN_POOL = "genpipe"


@dataclass
class Team:
    root: Path
    api: str          # Prefect API URL
    tracking: str     # MLflow tracking URL
    s3: str           # S3 endpoint
    env: dict = field(default_factory=dict)  # what a genpipe client of the team sets

    def client_env(self, home: Path, **extra: str) -> dict[str, str]:
        return {**self.env, "GENPIPE_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), **extra}


def make_project(ws: Path, models: list[str], overrides: list[str], remote: str | None = None,
                 endpoint: str | None = None) -> Path:
    """A git-committed copy of the project at ws keeping only `models` of params.yaml's train section,
    with `overrides` applied and, given `remote`, that S3 URL as the default DVC remote (--local)."""
    from components.config import apply_overrides, read_params_raw, write_params_raw

    ws.mkdir(parents=True)
    for name in ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"]:
        shutil.copy(REPO / name, ws / name)
    shutil.copytree(REPO / ".dvc", ws / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for package in ["components", "flows"]:  # dvc.yaml's code deps
        shutil.copytree(REPO / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    raw = read_params_raw(ws / "params.yaml")
    raw["train"] = {name: raw["train"][name] for name in models}
    write_params_raw(apply_overrides(raw, overrides), ws / "params.yaml")
    git = ["git", "-c", "user.name=genpipe-test", "-c", "user.email=test@genpipe.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "project"]):
        subprocess.run([*git, *args], cwd=ws, check=True, capture_output=True)
    if remote:
        dvc_config(ws, "remote", "add", "-d", "--local", "storage", remote)
        dvc_config(ws, "remote", "modify", "--local", "storage", "endpointurl", endpoint)
    return ws


@contextlib.contextmanager
def local_project(ws: Path, params_raw) -> Iterator[Path]:
    """A fresh project checkout at ws (git + DVC, the embedded stores) with these params, its state in its
    own .genpipe and MLflow on SQLite there, run from ws inside a Prefect test server; as a user's clone."""
    from components.config import write_params_raw

    for name in ["dvc.yaml", ".dvcignore", ".gitignore"]:
        shutil.copy(REPO / name, ws / name)
    shutil.copytree(REPO / ".dvc", ws / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for package in ["components", "flows"]:  # dvc.yaml's code deps
        shutil.copytree(REPO / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    write_params_raw(params_raw, ws / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update({
        "GENPIPE_HOME": str(ws / ".genpipe"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{ws / '.genpipe' / 'mlflow' / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # stage commands call `genpipe`
        "DVC_NO_ANALYTICS": "1",
    })
    (ws / ".genpipe" / "mlflow").mkdir(parents=True)
    os.chdir(ws)
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=60):
            yield ws
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def set_params(ws: Path, overrides: list[str]) -> None:
    """Apply `--set`-style overrides to the project's params.yaml, as `genpipe retrain --set` writes them."""
    from components.config import apply_overrides, read_params_raw, write_params_raw

    write_params_raw(apply_overrides(read_params_raw(ws / "params.yaml"), overrides), ws / "params.yaml")


def dvc_config(ws: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, check=True, capture_output=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})


@contextlib.contextmanager
def team(base: Path, workers: int = 2, retrain_worker_home: Path | None = None,
         threads_per_worker: int = 1, extra_env: dict[str, str] | None = None) -> Iterator[Team]:
    """The servers and `workers` process workers on the training pool (one flow run at a time each);
    with retrain_worker_home, also a worker on the retrain pool whose runs keep their state there (the
    retrain deployment's runs work in the project folder that `genpipe deploy` named as source).
    extra_env: more variables for every client and worker (e.g. GENPIPE_WEBHOOK_URL)."""
    base.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(moto_s3(base))
        make_bucket(s3, BUCKET)
        api = stack.enter_context(prefect_server(base / "prefect"))
        from cryptography.fernet import Fernet

        webhooks = {"MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}  # a receiver on loopback
        tracking = stack.enter_context(mlflow_server(base / "mlflow", artifacts_destination=f"s3://{BUCKET}/mlflow",
                                                     s3_endpoint=s3, env=webhooks))
        env = clean_env(PREFECT_API_URL=api, MLFLOW_TRACKING_URI=tracking, **S3_CREDENTIALS, AWS_ENDPOINT_URL=s3,
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                        GENPIPE_IO_RETRY_DELAYS="0.5,1", PREFECT_WORKER_QUERY_SECONDS="1",
                        OMP_NUM_THREADS=str(threads_per_worker), **(extra_env or {}))
        crew = Team(base, api, tracking, s3, env)
        for i in range(workers):
            folder = base / f"worker-{i}"
            folder.mkdir()
            stack.enter_context(prefect_worker(folder, TRAINING_POOL, api, crew.client_env(folder / "home"),
                                               name=f"worker-{i}", log_dir=base, limit=1))
        if retrain_worker_home is not None:
            folder = base / "retrain-worker"
            folder.mkdir()
            stack.enter_context(prefect_worker(folder, RETRAIN_POOL, api, crew.client_env(retrain_worker_home),
                                               name="retrain-worker", log_dir=base, limit=1))
        yield crew


def genpipe(args: list[str], ws: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "genpipe"), *args], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=timeout)

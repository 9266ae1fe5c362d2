"""Real servers for tests: moto's S3, a Prefect server, an MLflow server, MLflow's scoring server
and Prefect process workers, each a subprocess on a free loopback port. Each helper waits for a
real readiness check (health endpoint or port, with a deadline), keeps the server's output in a log
file under the given directory, and stops the server by its own process id when the `with` block ends."""
from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
# moto accepts any credentials; these go only to the processes that talk to S3 directly.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
MLFLOW_ADMIN = "admin"
# Variables a server must not inherit from the test process: they would point it elsewhere.
_FOREIGN_PREFIXES = ("AWS_", "MLFLOW_", "PREFECT_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**variables: str) -> dict[str, str]:
    """A minimal environment (PATH, HOME, locale, temp dir) plus `variables`: a client started
    with it sees no AWS_*, MLFLOW_* or PREFECT_* setting of the test process."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    return {**keep, **variables}


def _server_env(**variables: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    return {**inherited, **variables}


def log_tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def _stop(proc: subprocess.Popen, first_signal: int, grace_s: float = 15.0) -> None:
    """Signal the process, wait, then SIGKILL its process group (its id is the process's own pid,
    as it was started in a new session), which also ends children it left behind."""
    if proc.poll() is None:
        proc.send_signal(first_signal)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # no process of the group is left


@contextmanager
def _running(name: str, cmd: list[str], log_path: Path, env: Mapping[str, str], cwd: Path,
             ready: Callable[[], bool], stop_signal: int, timeout_s: float) -> Iterator[subprocess.Popen]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd, start_new_session=True)
    try:
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before it was ready; "
                                   f"its log {log_path}:\n{log_tail(log_path)}")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"{name} was not ready after {timeout_s:.0f} s; "
                                   f"its log {log_path}:\n{log_tail(log_path)}")
            time.sleep(0.2)
        print(f"{name} ready in {time.monotonic() - start:.1f} s", file=sys.stderr)
        yield proc
    finally:
        _stop(proc, stop_signal)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _http_ok(url: str, headers: Mapping[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def prefect_auth_header(auth_string: str | None) -> dict[str, str]:
    """The header a Prefect client sends for PREFECT_API_AUTH_STRING."""
    if auth_string is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


# --- S3 ---------------------------------------------------------------------------------------

@contextmanager
def moto_s3(workdir: Path, timeout_s: float = 30) -> Iterator[str]:
    """moto's S3 server; yields its endpoint URL (http://127.0.0.1:P)."""
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with _running("moto S3", cmd, Path(workdir) / "moto-s3.log", _server_env(), Path(workdir),
                  lambda: _port_open(port), signal.SIGTERM, timeout_s):
        yield f"http://127.0.0.1:{port}"


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def make_bucket(endpoint: str, name: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=name)


def bucket_keys(endpoint: str, name: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=name)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# --- Prefect ----------------------------------------------------------------------------------

@contextmanager
def prefect_server(workdir: Path, auth_string: str | None = None, env: Mapping[str, str] | None = None,
                   timeout_s: float = 90) -> Iterator[str]:
    """`prefect server start` with its own PREFECT_HOME (SQLite) under workdir, UI off; yields the
    API URL (http://127.0.0.1:P/api). With auth_string, clients must send it
    (PREFECT_API_AUTH_STRING); the health endpoint stays open. env: extra server variables."""
    workdir = Path(workdir)
    port = free_port()
    env = _server_env(PREFECT_HOME=str(workdir / "prefect-server-home"),
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", **(env or {}))
    if auth_string is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    api = f"http://127.0.0.1:{port}/api"
    # SIGINT runs the server's orderly shutdown (~1.5 s); SIGTERM ends it at once, skipping it.
    with _running("Prefect server", cmd, workdir / "prefect-server.log", env, workdir,
                  lambda: _http_ok(f"{api}/health"), signal.SIGINT, timeout_s):
        yield api


def _worker_has_polled(api_url: str, pool: str, name: str, auth_string: str | None) -> bool:
    try:
        response = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={},
                              headers=prefect_auth_header(auth_string), timeout=2)
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    return any(w["name"] == name and w.get("last_heartbeat_time") for w in response.json())


@contextmanager
def prefect_worker(workdir: Path, pool: str, api_url: str, env: Mapping[str, str], *,
                   name: str | None = None, log_dir: Path | None = None, limit: int | None = None,
                   timeout_s: float = 60) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool POOL --type process` in workdir (the pool is created if
    missing); yields the Popen once the worker has sent its first heartbeat to the API.

    `env` is the worker's whole environment (start from `clean_env()` or os.environ); the helper
    sets PREFECT_API_URL to api_url, and PREFECT_HOME under log_dir unless env has one. The log is
    log_dir/NAME.log; log_dir defaults to workdir's parent so the workspace stays as checked out."""
    workdir = Path(workdir)
    name = name or f"{workdir.name}-{uuid.uuid4().hex[:6]}"
    log_dir = Path(log_dir) if log_dir is not None else workdir.parent
    full_env = {"PREFECT_HOME": str(log_dir / f"{name}-prefect-home"), **env, "PREFECT_API_URL": api_url}
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit is not None:  # at most this many flow runs at once on this worker
        cmd += ["--limit", str(limit)]
    auth = full_env.get("PREFECT_API_AUTH_STRING")
    # `prefect worker start` passes SIGINT on to its worker child, which then stops in ~0.3 s.
    with _running(f"Prefect worker {name}", cmd, log_dir / f"{name}.log", full_env, workdir,
                  lambda: _worker_has_polled(api_url, pool, name, auth), signal.SIGINT, timeout_s) as proc:
        yield proc


# --- MLflow -----------------------------------------------------------------------------------

def _write_auth_config(workdir: Path) -> Path:
    """MLflow's basic-auth settings with the user store under workdir. The admin password is not
    in this file: the server gets it from MLFLOW_AUTH_ADMIN_PASSWORD, as in infra/."""
    path = workdir / "mlflow-auth.ini"
    path.write_text("[mlflow]\n"
                    "default_permission = READ\n"
                    f"database_uri = sqlite:///{workdir / 'mlflow-auth.db'}\n"
                    f"admin_username = {MLFLOW_ADMIN}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


@contextmanager
def mlflow_server(workdir: Path, artifacts_destination: str | None = None, s3_endpoint: str | None = None,
                  basic_auth_password: str | None = None, env: Mapping[str, str] | None = None,
                  timeout_s: float = 90) -> Iterator[str]:
    """`mlflow server` on a SQLite store under workdir with artefacts proxied (clients need no
    storage credentials); yields the tracking URL (http://127.0.0.1:P).

    artifacts_destination: where the server keeps artefacts, e.g. s3://bucket/prefix; default a
    folder under workdir. s3_endpoint: the S3 endpoint for it; the server alone gets the
    endpoint and S3 credentials. basic_auth_password: run the basic-auth app, with user
    `admin` (MLFLOW_ADMIN) holding this password (MLflow wants at least 12 characters).
    env: extra variables for the server process (e.g. _MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true so
    registry webhooks may reach a receiver on loopback)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Job execution runs GenAI judge jobs in 7 extra processes; the registry and webhooks need none.
    env = _server_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {}))
    if s3_endpoint is not None:
        env.update(S3_CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3_endpoint)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination or str(workdir / "mlflow-artifacts")]
    if basic_auth_password is not None:
        cmd += ["--app-name", "basic-auth"]
        # The auth app's CSRF protection refuses to start without a static Flask secret key.
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(_write_auth_config(workdir)),
                   MLFLOW_AUTH_ADMIN_PASSWORD=basic_auth_password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32))
    url = f"http://127.0.0.1:{port}"
    with _running("MLflow server", cmd, workdir / "mlflow-server.log", env, workdir,
                  lambda: _http_ok(f"{url}/health"), signal.SIGTERM, timeout_s):
        yield url


# --- MLflow scoring server ----------------------------------------------------------------------

@contextmanager
def scoring_server(workdir: Path, model_uri: str, tracking_uri: str, env: Mapping[str, str] | None = None,
                   timeout_s: float = 120) -> Iterator[str]:
    """`mlflow models serve -m model_uri` in this environment (no new virtualenv), the model read
    from tracking_uri; yields its URL (http://127.0.0.1:P, POST /invocations). It runs uvicorn
    from PATH, so the venv's bin comes first."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _server_env(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                      **(env or {}))
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with _running("MLflow scoring server", cmd, workdir / "scoring-server.log", env, workdir,
                  lambda: _http_ok(f"{url}/ping"), signal.SIGTERM, timeout_s):
        yield url

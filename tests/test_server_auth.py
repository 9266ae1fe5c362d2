"""The servers' auth layers, against real servers started here: MLflow's basic-auth app and
Prefect's API auth string accept the right secret, refuse a wrong one, and never write the wrong
one to their logs or to what the client shows; MLflow proxies S3 artefacts so a client without
any AWS_* variable can log them."""
from __future__ import annotations

import base64
import secrets
import subprocess
import sys

import httpx
import pytest
from servers import (MLFLOW_ADMIN, bucket_keys, clean_env, make_bucket, mlflow_server, moto_s3,
                     prefect_auth_header, prefect_server, prefect_worker, s3_client)

pytestmark = pytest.mark.slow


def _leaks(secret: str, username: str, *texts: str) -> list[str]:
    """Which forms of the secret (plain, or inside a Basic auth header) appear in the texts."""
    header = base64.b64encode(f"{username}:{secret}".encode()).decode()
    return [form for form in (secret, header) if any(form in text for text in texts)]


def test_mlflow_basic_auth_refuses_wrong_password_without_leaking_it(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    right, wrong = "right-" + secrets.token_hex(8), "wrong-" + secrets.token_hex(8)
    with mlflow_server(tmp_path, basic_auth_password=right) as url:
        client = MlflowClient(tracking_uri=url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", right)
        assert client.create_experiment("admitted")

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
        with pytest.raises(MlflowException) as refused:
            client.create_experiment("refused")
        assert refused.value.get_http_status_code() in (401, 403)

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", right)
        assert client.get_experiment_by_name("refused") is None
    log = (tmp_path / "mlflow-server.log").read_text()
    assert "401" in log or "403" in log  # the refusal reached the server and is in this log
    assert _leaks(wrong, MLFLOW_ADMIN, log, str(refused.value), refused.value.message) == []


def test_a_server_that_exits_before_ready_fails_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)MLflow server exited with code.*at least 12 characters"):
        with mlflow_server(tmp_path, basic_auth_password="too-short"):
            pass


def _prefect_cli(*args: str, api_url: str, auth_string: str, home) -> subprocess.CompletedProcess:
    env = clean_env(PREFECT_API_URL=api_url, PREFECT_API_AUTH_STRING=auth_string, PREFECT_HOME=str(home),
                    PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_prefect_auth_string_refuses_wrong_string_without_leaking_it(tmp_path):
    right, wrong = "admin:right-" + secrets.token_hex(8), "admin:wrong-" + secrets.token_hex(8)
    # At DEBUG the server logs every request, so its log is the most it would ever reveal.
    with prefect_server(tmp_path, auth_string=right, env={"PREFECT_SERVER_LOGGING_LEVEL": "DEBUG"}) as api:
        home = tmp_path / "client-home"
        created = _prefect_cli("work-pool", "create", "admitted-pool", "--type", "process",
                               api_url=api, auth_string=right, home=home)
        assert created.returncode == 0, created.stdout + created.stderr

        refused = _prefect_cli("work-pool", "create", "refused-pool", "--type", "process",
                               api_url=api, auth_string=wrong, home=home)
        shown = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "401" in shown, shown

        assert httpx.get(f"{api}/work_pools/admitted-pool").status_code == 401  # no header at all
        admitted = httpx.get(f"{api}/work_pools/admitted-pool", headers=prefect_auth_header(right))
        assert admitted.status_code == 200
        assert httpx.get(f"{api}/work_pools/refused-pool", headers=prefect_auth_header(right)).status_code == 404

        # A worker holding the right string polls its pool (the helper waits for its heartbeat).
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        worker_env = clean_env(PREFECT_API_AUTH_STRING=right, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        with prefect_worker(workspace, "admitted-pool", api, worker_env, name="auth-worker") as worker:
            assert worker.poll() is None
        assert list(workspace.iterdir()) == []  # the worker's log and home stay outside its workspace
    log = (tmp_path / "prefect-server.log").read_text()
    assert '"POST /api/work_pools/' in log and " 401" in log  # the requests, refusals too, are logged
    secret_part = wrong.split(":", 1)[1]
    assert _leaks(secret_part, "admin", log, shown) == []
    assert wrong not in log and wrong not in shown


CLIENT = """
import os, sys
from mlflow import MlflowClient
assert not [k for k in os.environ if k.startswith("AWS_")]
client = MlflowClient()
experiment = client.create_experiment("proxied")
run = client.create_run(experiment)
client.log_text(run.info.run_id, sys.argv[1], "notes/hello.txt")
print(run.info.artifact_uri)
"""


def test_mlflow_proxies_s3_artefacts_for_a_client_without_credentials(tmp_path):
    bucket, text = "mlflow-artefacts", "hello " + secrets.token_hex(4)
    with moto_s3(tmp_path) as endpoint:
        make_bucket(endpoint, bucket)
        with mlflow_server(tmp_path / "mlflow", artifacts_destination=f"s3://{bucket}/store",
                           s3_endpoint=endpoint) as url:
            # HOME too is fresh, so no ~/.aws file can lend the client credentials.
            env = clean_env(MLFLOW_TRACKING_URI=url, HOME=str(tmp_path / "client-home"))
            client = subprocess.run([sys.executable, "-c", CLIENT, text], env=env, capture_output=True,
                                    text=True, timeout=120)
            assert client.returncode == 0, client.stdout + client.stderr
            assert client.stdout.strip().splitlines()[-1].startswith("mlflow-artifacts:/")

        keys = [k for k in bucket_keys(endpoint, bucket) if k.endswith("/notes/hello.txt")]
        assert len(keys) == 1 and keys[0].startswith("store/"), bucket_keys(endpoint, bucket)
        body = s3_client(endpoint).get_object(Bucket=bucket, Key=keys[0])["Body"].read()
        assert body.decode() == text

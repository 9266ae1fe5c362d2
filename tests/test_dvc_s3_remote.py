"""Artefacts reach an S3 remote chosen by configuration alone (DVC's --local config + AWS_*
variables), against a real S3 endpoint: moto's server on loopback, started and stopped here."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.versioning.dvc_pipeline import open_repo, push

BUCKET = "genpipe-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # the server is ready once its port accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        for key, value in {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _dvc(cwd: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def test_push_and_pull_through_s3_remote(tmp_path, s3_endpoint, monkeypatch):
    origin = tmp_path / "origin"
    origin.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=origin, check=True)
    _dvc(origin, "init", "-q")
    _dvc(origin, "remote", "add", "-d", "--local", "storage", f"s3://{BUCKET}/dvc")
    _dvc(origin, "remote", "modify", "--local", "storage", "endpointurl", s3_endpoint)
    payload = os.urandom(4096)
    (origin / "shard-000.npz").write_bytes(payload)
    _dvc(origin, "add", "-q", "shard-000.npz")

    assert push(open_repo(origin)) == 1

    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.startswith("dvc/files/md5/") for k in keys)

    # A stateless worker: same tracked files, no cache, configured for the same remote.
    worker = tmp_path / "worker"
    shutil.copytree(origin, worker, ignore=shutil.ignore_patterns("cache", "tmp", "shard-000.npz"))
    _dvc(worker, "pull", "-q")
    assert (worker / "shard-000.npz").read_bytes() == payload

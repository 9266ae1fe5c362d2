"""The genpipe command as a user meets it: config errors at start, and the UI server."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from components.models import FAMILIES

REPO = Path(__file__).resolve().parents[1]
GENPIPE = [sys.executable, "-m", "flows.cli"]


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GENPIPE, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_bad_override_fails_at_start_naming_key_and_rule(project):
    before = (project / "params.yaml").read_text()
    result = run_cli(["retrain", "--set", "train.vae.lr=-1"], project, GENPIPE_HOME=str(project / ".genpipe"))
    assert result.returncode == 2
    assert "train.vae.lr: must be > 0, got -1" in result.stderr
    assert (project / "params.yaml").read_text() == before, "a rejected override must not be written"


def test_unknown_key_in_params_file_is_refused(project):
    text = (project / "params.yaml").read_text().replace("  lr: 0.003\n", "  lr: 0.003\n  learning_rate: 1\n", 1)
    (project / "params.yaml").write_text(text)
    result = run_cli(["params"], project, GENPIPE_HOME=str(project / ".genpipe"))
    assert result.returncode == 2
    assert "classifier.learning_rate: unknown key" in result.stderr


def test_params_override_is_validated_and_printed(project):
    result = run_cli(["params", "--set", "train.dcgan.epochs=7"], project, GENPIPE_HOME=str(project / ".genpipe"))
    assert result.returncode == 0, result.stderr
    assert '"epochs": 7' in result.stdout


def test_the_zoo_and_modern_profiles_add_every_family_and_a_bad_profile_is_named(project):
    shutil.copytree(REPO / "profiles", project / "profiles")
    families = set()
    for profile in ("zoo", "modern"):
        result = run_cli(["params", "--profile", profile], project, GENPIPE_HOME=str(project / ".genpipe"))
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        families |= {cfg["family"] for section in ("train", "latent") for cfg in shown[section].values()}
    assert families == set(FAMILIES.names())

    result = run_cli(["params", "--profile", "everything"], project, GENPIPE_HOME=str(project / ".genpipe"))
    assert result.returncode == 2
    assert "--profile everything: no profiles/everything.yaml; profiles here: ['gpu', 'modern', 'zoo']" in result.stderr

    (project / "profiles" / "typo.yaml").write_text("evalute:\n  seed: 1\n")
    result = run_cli(["params", "--profile", "typo"], project, GENPIPE_HOME=str(project / ".genpipe"))
    assert result.returncode == 2
    assert "typo.yaml: evalute: unknown key" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status
        except OSError:
            time.sleep(0.25)  # polling a port until it answers, bounded by the deadline
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_ui_serves_mlflow_over_the_embedded_store(project):
    port = _free_port()
    proc = subprocess.Popen([*GENPIPE, "ui", "--port", str(port)], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "GENPIPE_HOME": str(project / ".genpipe")})
    try:
        assert _wait_http(f"http://127.0.0.1:{port}/health", proc) == 200
        first_line = proc.stdout.readline()
        assert "MLflow UI for sqlite:///" in first_line and str(project / ".genpipe") in first_line
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_failed_retrain_takes_its_overrides_back(project):
    before = (project / "params.yaml").read_text()
    # No dvc.yaml here, so the flow fails right after the override was written.
    result = run_cli(["retrain", "--set", "train.dcgan.epochs=3"], project, GENPIPE_HOME=str(project / ".genpipe"),
                     PREFECT_SERVER_ANALYTICS_ENABLED="false")
    assert result.returncode != 0
    assert "params.yaml restored" in result.stderr
    assert (project / "params.yaml").read_text() == before


@pytest.mark.parametrize("name", ["Bad Name", "-dash-first", "UPPER", "a/b"])
def test_model_names_must_be_safe_for_shells_paths_and_the_registry(project, name):
    text = (project / "params.yaml").read_text().replace("\n  vae:\n", f"\n  {name!r}:\n", 1)
    (project / "params.yaml").write_text(text)
    result = run_cli(["params"], project, GENPIPE_HOME=str(project / ".genpipe"))
    assert result.returncode == 2
    assert f"train.{name}: model name must match ^[a-z0-9][a-z0-9_-]*$, got {name!r}" in result.stderr


@pytest.mark.parametrize("uri", ["postgresql://alice:s3cret-pw@127.0.0.1:1/mlflow", "https://alice:s3cret-pw@127.0.0.1:1/"])
def test_ui_never_prints_a_password_from_the_tracking_uri(project, uri):
    # The database is unreachable (or its driver missing), so the server gives up: all it said is here.
    result = run_cli(["ui", "--port", str(_free_port())], project, GENPIPE_HOME=str(project / ".genpipe"),
                     MLFLOW_TRACKING_URI=uri)
    output = result.stdout + result.stderr
    assert "s3cret-pw" not in output
    assert "alice:***@127.0.0.1:1" in output

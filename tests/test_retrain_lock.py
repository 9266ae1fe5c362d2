"""One retrain at a time: two real `genpipe retrain` processes in one workspace, and the Prefect
global concurrency limit around registration against a real Prefect server."""
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

from components.config import read_params_raw, write_params_raw

REPO = Path(__file__).resolve().parents[1]
GENPIPE = [sys.executable, "-m", "flows.cli"]
DEADLINE_S = 240  # a fresh Prefect API starts in seconds, slower on a busy 2-core machine

# One stage that holds the workspace until the test creates `release`; it refuses to overlap itself.
HOLD = """
import os, sys, time
from pathlib import Path
with open("holds.log", "a") as log:
    log.write("start\\n")
fd = os.open("active", os.O_CREAT | os.O_EXCL)  # a second holder at the same time fails here
deadline = time.monotonic() + 600
while not Path("release").exists():
    if time.monotonic() > deadline:
        sys.exit("never released")
    time.sleep(0.05)
os.close(fd)
os.unlink("active")
with open("holds.log", "a") as log:
    log.write("end\\n")
"""
DVC_YAML = """stages:
  hold:
    cmd: python hold.py
    always_changed: true
"""

pytestmark = pytest.mark.slow


@pytest.fixture
def workspace(tmp_path):
    """A git + DVC project whose one stage blocks, and no models (nothing to register)."""
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "hold.py").write_text(HOLD)
    raw = read_params_raw(REPO / "params.yaml")
    raw["train"] = {}
    write_params_raw(raw, tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def _env(workspace: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "PYTHONPATH": str(REPO), "GENPIPE_HOME": str(workspace / ".genpipe"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", **extra}


def _start(args: list[str], workspace: Path, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([*GENPIPE, *args], cwd=workspace, env=_env(workspace, **env), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _until(condition, what: str, *procs: subprocess.Popen, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"process {proc.args} exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)  # polling a condition, bounded by the deadline


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_a_second_retrain_exits_or_waits_while_the_first_holds_the_workspace(workspace):
    params_before = (workspace / "params.yaml").read_text()
    first = _start(["retrain"], workspace, workspace / "first.log")
    waiting = None
    try:
        _until(lambda: (workspace / "active").exists(), "first retrain holding its stage", first)

        busy = subprocess.run([*GENPIPE, "retrain", "--set", "classifier.epochs=5"], cwd=workspace,
                              env=_env(workspace), capture_output=True, text=True, timeout=120)
        assert busy.returncode == 75, busy.stdout + busy.stderr
        assert f"{workspace / '.genpipe' / 'retrain.lock'} (PID {first.pid})" in busy.stderr
        assert (workspace / "params.yaml").read_text() == params_before, "a refused retrain must not write params"

        waiting = _start(["retrain", "--wait", "600"], workspace, workspace / "second.log")
        _until(lambda: f"(PID {first.pid})" in (workspace / "second.log").read_text(), "second retrain waiting",
               waiting, first)
        assert (workspace / "holds.log").read_text() == "start\n", "the waiting retrain must not run a stage"

        (workspace / "release").touch()
        assert first.wait(timeout=DEADLINE_S) == 0, (workspace / "first.log").read_text()[-3000:]
        assert waiting.wait(timeout=DEADLINE_S) == 0, (workspace / "second.log").read_text()[-3000:]
    finally:
        _stop(first, *([waiting] if waiting else []))
    assert (workspace / "holds.log").read_text() == "start\nend\nstart\nend\n", "the two runs overlapped"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLOT = """
import sys, time
from pathlib import Path
from flows.policies import model_slot, registration_limit_name
name, wait, release = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
try:
    with model_slot(registration_limit_name(name), wait, f"registering {name}"):
        print("held", flush=True)
        deadline = time.monotonic() + 600
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
except TimeoutError as exc:
    print(f"timeout: {exc}", flush=True)
    sys.exit(3)
"""


def test_registration_takes_a_prefect_concurrency_slot_per_model_when_a_server_is_configured(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path, PREFECT_HOME=str(tmp_path / "prefect"))
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=tmp_path, env=env, stdout=(tmp_path / "server.log").open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    client_env = {**env, "PREFECT_API_URL": api}

    def slot(name: str, wait: float, release: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", SLOT, name, str(wait), release], cwd=tmp_path, env=client_env,
                              capture_output=True, text=True, timeout=180)

    def limit(name: str) -> dict:
        with urllib.request.urlopen(f"{api}/v2/concurrency_limits/genpipe-register-{name}", timeout=10) as response:
            return json.loads(response.read())

    holder = None
    try:
        _until(lambda: _healthy(f"{api}/health"), "Prefect server", server)
        (tmp_path / "open").touch()
        holder = subprocess.Popen([sys.executable, "-c", SLOT, "fashion-mnist-dcgan", "600", "release"],
                                  cwd=tmp_path, env=client_env, stdout=(tmp_path / "holder.log").open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        _until(lambda: "held" in (tmp_path / "holder.log").read_text(), "first registration slot", holder, server)
        dcgan = limit("fashion-mnist-dcgan")
        assert (dcgan["limit"], dcgan["active_slots"]) == (1, 1)

        same = slot("fashion-mnist-dcgan", 2, "open")
        assert same.returncode == 3, same.stdout + same.stderr
        assert "'genpipe-register-fashion-mnist-dcgan'" in same.stdout

        other = slot("fashion-mnist-vae", 60, "open")  # another model is not held up
        assert other.returncode == 0 and "held" in other.stdout, other.stdout + other.stderr

        (tmp_path / "release").touch()
        assert holder.wait(timeout=120) == 0, (tmp_path / "holder.log").read_text()
        again = slot("fashion-mnist-dcgan", 60, "open")  # released: the next registration gets the slot
        assert again.returncode == 0 and "held" in again.stdout, again.stdout + again.stderr
        assert limit("fashion-mnist-dcgan")["active_slots"] == 0
    finally:
        (tmp_path / "release").touch()
        _stop(*([holder] if holder else []), server)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False

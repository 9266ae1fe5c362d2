"""A tracking-server outage never kills a training: against a real `mlflow server`, stopped and
restarted on the same port and database, metrics are buffered and the run still ends FINISHED or
FAILED with every metric present."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from model_configs import model_config
from components.models import FAMILIES, build_model
from components.tracking.runs import MetricLogger, client, training_run
from components.training.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS = 8  # 64 images, batch 16, 2 epochs


class Server:
    """`mlflow server` on a fixed port and SQLite file, so a restart is the same server."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.root, self.proc = root, None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner: starts faster
            stdout=subprocess.DEVNULL, stderr=(self.root / "server.log").open("ab"), start_new_session=True)
        deadline = time.monotonic() + 90
        while not self.healthy():
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server not healthy after 90 s"
            time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # an abrupt outage; the group is the one start() created
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.healthy():
            assert time.monotonic() < deadline, "mlflow server still answering after being stopped"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture
def tracking(server, monkeypatch):
    """The server up, and a client that fails fast while it is down."""
    if not server.healthy():
        server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    return server


def tiny_training():
    cfg = model_config("vae", epochs=2, batch_size=16)
    data = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), generator=data, dtype=torch.uint8)
    return cfg, build_model(cfg, 1, 4), images, torch.zeros(64, dtype=torch.long)


def loss_steps(run_id: str) -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, "loss"))


def test_outage_mid_training_buffers_metrics_and_the_run_ends_finished(tracking):
    cfg, model, images, labels = tiny_training()
    pending_in_outage = []
    with pytest.warns(UserWarning, match="MLflow unreachable"):
        with training_run("outage", "train-vae", params=cfg.model_dump(), tags={}, flush_seconds=0) as log:
            def log_fn(values, step):
                log(values, step)  # flushes at once: flush_seconds=0
                if step == 2:
                    tracking.stop()
                elif step == 5:
                    pending_in_outage.append(log.pending)
                    tracking.start()

            Trainer(model, cfg, log_every=1, log_fn=log_fn, progress=False).fit(images, labels)
    assert pending_in_outage == [3 * 5]  # steps 3, 4 and 5, five values each, waiting for the server
    run = client().get_run(log.run_id)
    assert run.info.status == "FINISHED"
    assert loss_steps(log.run_id) == list(range(1, STEPS + 1))


def test_server_back_during_the_final_retries_gets_a_failed_run_ended(tracking):
    cfg, model, images, labels = tiny_training()
    restarted = []

    def log_fn(values, step):
        log(values, step)
        if step == 3:
            tracking.stop()
        elif step == 4:  # its values are buffered: the server is down
            restarted.append(threading.Thread(target=tracking.start))
            restarted[0].start()  # healthy only seconds later, after the training has failed
            raise RuntimeError("the training broke")

    with pytest.raises(RuntimeError, match="the training broke"), \
            pytest.warns(UserWarning, match="MLflow unreachable"):  # the training's error is what propagates
        with training_run("outage", "train-vae", params={}, tags={}, flush_seconds=0, finish_timeout=90) as log:
            Trainer(model, cfg, log_every=1, log_fn=log_fn, progress=False).fit(images, labels)
    restarted[0].join()
    assert client().get_run(log.run_id).info.status == "FAILED"
    assert loss_steps(log.run_id) == [1, 2, 3, 4]


def test_server_still_down_at_the_end_warns_instead_of_failing_the_training(tracking):
    cfg, model, images, labels = tiny_training()
    with pytest.warns(UserWarning) as caught:
        with training_run("outage", "train-vae", params={}, tags={}, flush_seconds=0, finish_timeout=1) as log:
            tracking.stop()
            result = Trainer(model, cfg, log_every=1, log_fn=log, progress=False).fit(images, labels)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "MLflow unreachable" in messages[0]  # warned once per outage, not per flush
    assert re.search(r"still unreachable after 1 s.*stays RUNNING.*the training succeeded", messages[1])
    assert "loss" in result and log.pending == STEPS * 5


def test_buffer_is_bounded_keeping_the_newest_metrics(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    log = MetricLogger("no-such-run", flush_seconds=0, max_pending=10)
    with pytest.warns(UserWarning, match="MLflow unreachable"):
        for step in range(1, 5):
            log({"a": step, "b": step, "c": step}, step)
    assert log.pending == 10
    assert not log.flush()
    assert [(m.key, m.step) for m in log._pending][:2] == [("c", 1), ("a", 2)]  # 12 logged, the 2 oldest dropped


def test_a_refused_batch_is_dropped_not_retried_forever(tracking):
    log = MetricLogger("0123456789abcdef0123456789abcdef", flush_seconds=60)  # no such run: 404
    log({"loss": 1.0}, 1)
    with pytest.warns(UserWarning, match="MLflow refused 1 metrics"):
        assert log.flush()
    assert log.pending == 0


def test_a_server_down_when_training_starts_is_waited_for(tracking):
    cfg, model, images, labels = tiny_training()
    tracking.stop()
    restart = threading.Thread(target=tracking.start)  # comes back while the run is being created
    restart.start()
    try:
        with pytest.warns(UserWarning, match="retrying to start the training run"):
            with training_run("late-server", "train-vae", params=cfg.model_dump(), tags={},
                              finish_timeout=120) as log:
                Trainer(model, cfg, log_every=1, log_fn=log, progress=False).fit(images, labels)
    finally:
        restart.join()
    assert client().get_run(log.run_id).info.status == "FINISHED"
    assert loss_steps(log.run_id) == list(range(1, STEPS + 1))

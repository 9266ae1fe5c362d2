"""Notifications: signed webhook delivery to a real local HTTP receiver (retries, refusals, outages),
MLflow's own alias webhook from a real `mlflow server`, and Prefect events read back from a real
`prefect server` and from the ephemeral API."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from components import notify
from components.tracking.registry import Registration
from components.tracking.webhooks import ALIAS_WEBHOOK, ensure_alias_webhook

REPO = Path(__file__).resolve().parents[1]
TOKEN = "T0KEN-in-the-path"  # webhook URLs carry secrets like this one: never in a log
SECRET = "shared-hmac-secret"
FAST = {"backoff_s": (0.02, 0.05, 0.1)}
DEADLINE_S = 120  # a server's start on a busy 2-core machine


class Receiver:
    """A webhook receiver on a free loopback port: answers the scripted statuses in turn (200 after
    them) and keeps every request's headers and body."""

    def __init__(self):
        self.statuses: list[int] = []
        self.requests: list[tuple[dict, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{TOKEN}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 30) -> list[tuple[dict, str]]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} of {count} request(s) within {timeout} s"
            time.sleep(0.05)
        return self.requests


@pytest.fixture
def receiver():
    rx = Receiver()
    yield rx
    rx.server.shutdown()
    rx.server.server_close()


def _verified(headers: dict, body: str, prefix: str) -> bool:
    return notify.verify_signature(SECRET, headers[f"{prefix}-delivery-id"], headers[f"{prefix}-timestamp"], body,
                                   headers[f"{prefix}-signature"])


def _champion() -> dict:
    registration = Registration("fashion-mnist-dcgan", "3", "promoted", "fid 12.5 beats champion's 14")
    links = notify.links("https://alice:pa55word@mlflow.example.org:5000/", registration.name, "3",
                         "http://prefect.example.org/runs/flow-run/abc")
    return notify.champion_message(registration, {"fid": 12.5, "kid": float("nan")}, links)


def test_champion_payload_arrives_with_a_valid_signature(receiver):
    payload = _champion()
    assert notify.post_webhook(receiver.url, payload, secret=SECRET, **FAST)
    [(headers, body)] = receiver.requests
    assert json.loads(body) == payload
    assert payload["event"] == "genpipe.model.champion" and payload["decision"] == "promoted"
    assert payload["metrics"] == {"fid": 12.5, "kid": None}  # NaN is not JSON
    assert payload["links"] == {"mlflow": "https://mlflow.example.org:5000/#/models/fashion-mnist-dcgan/versions/3",
                                "prefect": "http://prefect.example.org/runs/flow-run/abc"}
    assert headers["content-type"] == "application/json"
    assert _verified(headers, body, "x-genpipe")
    assert not notify.verify_signature("another secret", headers["x-genpipe-delivery-id"],
                                       headers["x-genpipe-timestamp"], body, headers["x-genpipe-signature"])


def test_unsigned_without_a_secret(receiver):
    assert notify.post_webhook(receiver.url, _champion(), **FAST)
    [(headers, _)] = receiver.requests
    assert "x-genpipe-signature" not in headers


def test_5xx_is_retried_until_it_succeeds(receiver):
    receiver.statuses = [500, 503]
    assert notify.post_webhook(receiver.url, _champion(), secret=SECRET, **FAST)
    assert len(receiver.requests) == 3
    assert len({headers["x-genpipe-delivery-id"] for headers, _ in receiver.requests}) == 1  # one delivery
    assert all(_verified(headers, body, "x-genpipe") for headers, body in receiver.requests)


def test_4xx_is_not_retried_and_the_warning_names_only_the_host(receiver, caplog):
    receiver.statuses = [400]
    with caplog.at_level(logging.WARNING, logger="components.notify"):
        assert notify.post_webhook(receiver.url, _champion(), secret=SECRET, **FAST) is False
    assert len(receiver.requests) == 1
    assert f"127.0.0.1:{receiver.server.server_port}" in caplog.text and "HTTP 400" in caplog.text
    assert TOKEN not in caplog.text and "/hooks" not in caplog.text


def test_unreachable_gives_up_within_the_backoff_budget_without_leaking_the_url(caplog):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hooks/{TOKEN}?key={TOKEN}"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="components.notify"):
        assert notify.post_webhook(url, _champion(), secret=SECRET, attempts=3, backoff_s=(0.05, 0.1)) is False
    assert time.monotonic() - start < 0.15 + 2  # the two backoffs and three refused connects
    assert f"127.0.0.1:{port}" in caplog.text and "3 attempt(s)" in caplog.text
    assert TOKEN not in caplog.text and "/hooks" not in caplog.text


def test_messages_per_decision():
    links = notify.links("sqlite:///state/mlflow.db", "m", "2")
    assert links == {}  # a database file has no page to link
    kept = Registration("m", "2", "kept", "fid 15 does not beat champion's 14 by 0.5")
    assert notify.registration_message(kept, {"fid": 15}, links)["event"] == "genpipe.model.challenger"
    assert notify.registration_message(Registration("m", "1", "champion", "first"), {}, links)["event"] == \
        "genpipe.model.champion"
    assert notify.registration_message(Registration("m", "2", "unchanged", "registered already"), {}, links) is None
    with pytest.raises(ValueError, match="decision 'kept'.*champion or promoted"):
        notify.champion_message(kept, {}, links)


def test_failure_message_names_models_and_redacts_passwords():
    failures = {"train@vae": "RuntimeError: diverged",
                "register@dcgan": "OperationalError: postgresql://mlflow:hunter2@db:5432/mlflow refused"}
    message = notify.failure_message(failures, {"prefect": "http://p/runs/flow-run/1"})
    assert (message["event"], message["model"], message["decision"]) == \
        ("genpipe.retrain.failed", "dcgan, vae", "failed")
    assert "hunter2" not in message["reason"] and "postgresql://mlflow:***@db:5432" in message["reason"]
    assert "train@vae: RuntimeError: diverged" in message["reason"]
    with pytest.raises(ValueError, match="failures"):
        notify.failure_message({}, {})


def test_webhook_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(notify.URL_VAR, raising=False)
    monkeypatch.delenv(notify.SECRET_VAR, raising=False)
    assert notify.webhook_from_env() is None
    monkeypatch.setenv(notify.URL_VAR, f"https://hooks.example.org/services/{TOKEN}")
    monkeypatch.setenv(notify.SECRET_VAR, SECRET)
    webhook = notify.webhook_from_env()
    assert (webhook.url, webhook.secret) == (f"https://hooks.example.org/services/{TOKEN}", SECRET)
    assert TOKEN not in repr(webhook) and SECRET not in repr(webhook) and "hooks.example.org" in repr(webhook)
    monkeypatch.setenv(notify.URL_VAR, f"ftp://hooks.example.org/{TOKEN}")
    with pytest.raises(ValueError, match="GENPIPE_WEBHOOK_URL must be an http") as bad:
        notify.webhook_from_env()
    assert TOKEN not in str(bad.value)
    monkeypatch.delenv(notify.URL_VAR)
    with pytest.raises(ValueError, match="GENPIPE_WEBHOOK_SECRET is set but GENPIPE_WEBHOOK_URL is not"):
        notify.webhook_from_env()


def test_alias_webhooks_need_a_tracking_server(tmp_path):
    from mlflow import MlflowClient

    with pytest.raises(ValueError, match="sent by a tracking server.*'sqlite'"):
        ensure_alias_webhook(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "https://h/x", SECRET)


# ---- real servers ----------------------------------------------------------------------------------

def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "GENPIPE_"))}
    return {**env, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """`mlflow server` (SQLite, allowed to call loopback receivers over http) and `prefect server`
    (tests/servers.py: each stopped by its own process id)."""
    from contextlib import ExitStack

    from cryptography.fernet import Fernet

    from servers import mlflow_server, prefect_server

    root = tmp_path_factory.mktemp("servers")
    webhooks = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    with ExitStack() as stack:
        mlflow = stack.enter_context(mlflow_server(root / "mlflow", env=webhooks))
        prefect = stack.enter_context(prefect_server(root / "prefect"))
        yield {"mlflow": mlflow, "prefect": prefect, "root": root}


@pytest.fixture(scope="module")
def registered(servers):
    """A registered version carrying metric tags, as components/tracking/registry.py writes them."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers["mlflow"])
    name = "fashion-mnist-dcgan"
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(name))
    client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                tags={"metric.fid": "12.5", "metric.kid": "0.01", "model_md5": "abc"})
    return client, name


@pytest.mark.slow
def test_mlflow_alias_webhook_delivers_a_signed_alias_created(servers, registered, receiver):
    client, name = registered
    first = ensure_alias_webhook(client, receiver.url.replace("/hooks/", "/old/"), "old secret")
    again = ensure_alias_webhook(client, receiver.url, SECRET)  # a second deploy: same webhook, new settings
    ours = [w for w in client.list_webhooks() if w.name == ALIAS_WEBHOOK]
    assert [w.webhook_id for w in ours] == [first.webhook_id] == [again.webhook_id]
    assert ours[0].url == receiver.url and [str(e) for e in ours[0].events] == ["model_version_alias.created"]

    client.set_registered_model_alias(name, "champion", "1")
    [(headers, body)] = receiver.wait_for(1)
    assert json.loads(body)["entity"] == "model_version_alias" and json.loads(body)["action"] == "created"
    assert json.loads(body)["data"] == {"name": name, "alias": "champion", "version": "1"}
    assert _verified(headers, body, "x-mlflow")  # MLflow's scheme is the one notify signs with


ANNOUNCE = """
import json, sys, time
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.worker import EventsWorker
from components.tracking.registry import Registration
from flows.notifications import announce

@flow
def retrain_end():
    return announce([Registration("fashion-mnist-dcgan", "1", "champion", "first version: no champion yet"),
                     Registration("fashion-mnist-vae", "4", "unchanged", "registered already")],
                    {"train@cvae": "RuntimeError: postgresql://u:hunter2@db/x unreachable"})

sent = retrain_end()
EventsWorker.drain_all()
with get_client(sync_client=True) as client:
    deadline = time.monotonic() + 60
    while True:  # the server persists events in batches
        events = client.read_events(EventFilter(event=EventNameFilter(prefix=["genpipe."])), limit=50).events
        if len(events) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
print("RESULT " + json.dumps({"sent": sent, "events": [json.loads(e.model_dump_json()) for e in events]}))
"""


def _announce(tmp_path, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", ANNOUNCE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=DEADLINE_S, env=_clean_env(PREFECT_HOME=str(tmp_path / "prefect"), **env))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "hunter2" not in done.stdout + done.stderr and TOKEN not in done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def _by_event(events: list[dict]) -> dict[str, dict]:
    return {e["event"]: e for e in events}


@pytest.mark.slow
def test_announce_emits_prefect_events_to_a_server_and_posts_the_webhook(servers, registered, receiver, tmp_path):
    out = _announce(tmp_path, PREFECT_API_URL=servers["prefect"], MLFLOW_TRACKING_URI=servers["mlflow"],
                    GENPIPE_WEBHOOK_URL=receiver.url, GENPIPE_WEBHOOK_SECRET=SECRET)
    assert [p["event"] for p in out["sent"]] == ["genpipe.model.champion", "genpipe.retrain.failed"]  # not "unchanged"
    events = _by_event(out["events"])
    assert set(events) == {"genpipe.model.champion", "genpipe.retrain.failed"}
    champion = events["genpipe.model.champion"]
    assert champion["resource"]["prefect.resource.id"] == "genpipe.model.fashion-mnist-dcgan"
    assert champion["payload"]["metrics"] == {"fid": 12.5, "kid": 0.01}  # read from the version's tags
    assert champion["payload"]["links"]["mlflow"] == f"{servers['mlflow']}/#/models/fashion-mnist-dcgan/versions/1"
    flow_run = [r["prefect.resource.id"] for r in champion["related"] if r["prefect.resource.role"] == "flow-run"]
    assert len(flow_run) == 1 and champion["payload"]["links"]["prefect"].endswith(
        flow_run[0].removeprefix("prefect.flow-run."))
    assert events["genpipe.retrain.failed"]["payload"]["model"] == "cvae"

    posted = {json.loads(body)["event"]: (headers, body) for headers, body in receiver.wait_for(2)}
    assert json.loads(posted["genpipe.model.champion"][1]) == champion["payload"]
    assert all(_verified(headers, body, "x-genpipe") for headers, body in posted.values())


@pytest.mark.slow
def test_announce_emits_prefect_events_under_the_ephemeral_api(servers, registered, tmp_path):
    out = _announce(tmp_path, MLFLOW_TRACKING_URI=servers["mlflow"])  # no PREFECT_API_URL: ephemeral
    events = _by_event(out["events"])
    assert set(events) == {"genpipe.model.champion", "genpipe.retrain.failed"}
    champion = events["genpipe.model.champion"]["payload"]
    assert champion["metrics"] == {"fid": 12.5, "kid": 0.01}
    assert "prefect" not in champion["links"]  # the ephemeral API has no UI to link

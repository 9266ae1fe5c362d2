"""Registration against a real MLflow store (SQLite): crash safety at every write, compare-and-set
of the champion, scores compared only under one protocol, and errors that are not "absent"."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from model_configs import model_config
from components.config import RegistryConfig
from components.models import FAMILIES, build_model
from components.tracking import registry
from components.tracking.model_files import save_trained_model
from components.tracking.registry import CHAMPION, ChampionChanged, ChampionUnscorable, register_model
from components.training.checkpoint import write_json

NAME = "toy-dcgan"
CFG = RegistryConfig(gating_metric="fid", min_improvement={"fid": 5.0}, ceiling={"fid": 100.0})
PROTOCOL = {"evaluator": "e1", "num_samples": 100, "seed": 1}
OTHER_PROTOCOL = {**PROTOCOL, "evaluator": "e2"}


def tiny_cfg(seed: int):
    return model_config("dcgan", seed=seed, latent_dim=4)


def make_candidate(root: Path, seed: int, fid: float) -> tuple[Path, Path, dict]:
    """A trained-model folder, its evaluation folder and its lineage, as the pipeline writes them."""
    torch.manual_seed(seed)
    cfg = tiny_cfg(seed)
    model = build_model(cfg, 1, 10)
    model_dir, eval_dir = root / f"model-{seed}", root / f"eval-{seed}"
    spec = {"family": "dcgan", "config": cfg.model_dump(mode="json"), "channels": 1, "num_classes": 10,
            "classes": [str(i) for i in range(10)], "dataset": "toy", "dataset_version": "d1", "steps": 1}
    save_trained_model(model, spec, model_dir)
    write_json({"fid": fid, "kid": 0.01}, eval_dir / "metrics.json")
    from components.evaluation.grid import save_grid

    save_grid(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), eval_dir / "grid.png")
    lineage = {"dataset_version": "d1", "evaluator_md5": "e1", "model_md5": f"md5-{seed}", "params_hash": "p",
               "git_commit": "c", "training_run_id": ""}
    return model_dir, eval_dir, lineage


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite tracking store with its artefacts under tmp_path."""
    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "home").mkdir()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)  # explicit: an earlier test's mlflow.set_tracking_uri would win


def register(candidate, protocol=PROTOCOL, rescore=None, cfg=CFG):
    model_dir, eval_dir, lineage = candidate
    write_json(protocol, eval_dir / "protocol.json")
    return register_model(NAME, model_dir, eval_dir, lineage, cfg,
                          rescore or (lambda version, protocol: pytest.fail("the champion must not be re-scored")))


def snapshot(c) -> dict:
    """The registry as a user sees it: every version's tags, and the aliases."""
    versions = {mv.version: dict(mv.tags) for mv in c.search_model_versions(f"name='{NAME}'")}
    return {"versions": versions, "aliases": dict(c.get_registered_model(NAME).aliases)}


class CrashAt:
    """Wraps the registry's MLflow client and raises on its n-th write, as a killed process would stop."""

    WRITES = {"set_model_version_tag", "delete_model_version_tag", "set_registered_model_alias"}

    def __init__(self, inner, n: int):
        self.inner, self.n, self.count = inner, n, 0

    def __getattr__(self, attr):
        value = getattr(self.inner, attr)
        if attr not in self.WRITES:
            return value

        def write(*args, **kwargs):
            if self.count == self.n:
                raise KeyboardInterrupt(f"crash before write {self.n}: {attr}{args}")
            self.count += 1
            return value(*args, **kwargs)

        return write


SCENARIOS = {
    # name: (champion's fid, challenger's fid, challenger's protocol, rescored champion fid)
    "first": (None, 40.0, PROTOCOL, None),
    "promoted": (60.0, 40.0, PROTOCOL, None),
    "kept": (41.0, 40.0, PROTOCOL, None),
    "rescored-promoted": (60.0, 40.0, OTHER_PROTOCOL, 50.0),
}


def use_store(home: Path, monkeypatch) -> None:
    monkeypatch.setenv("GENPIPE_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")


def register_challenger(home: Path, scenario: str, crash_at: int | None, monkeypatch) -> tuple[dict, int]:
    """Register the scenario's challenger in the store at `home`, crashing before write `crash_at`
    and then running again; returns the registry's state and the writes made before the crash."""
    from components.tracking.runs import client

    use_store(home, monkeypatch)
    _, fid, protocol, rescored = SCENARIOS[scenario]
    candidate = make_candidate(home, 2, fid)
    rescore = (lambda version, protocol: rescored) if rescored is not None else None
    writes = 0
    if crash_at is not None:
        crashing = CrashAt(client(), crash_at)
        monkeypatch.setattr(registry, "client", lambda: crashing)
        try:
            register(candidate, protocol, rescore)
        except KeyboardInterrupt:
            pass
        writes = crashing.count
        monkeypatch.setattr(registry, "client", client)
    register(candidate, protocol, rescore)
    return snapshot(client()), writes


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_crash_between_any_two_writes_then_a_rerun_ends_as_an_uninterrupted_run(tmp_path, store, scenario,
                                                                                   monkeypatch):
    template = tmp_path / "template"  # the store before the challenger comes: empty, or with its champion
    template.mkdir()
    use_store(template, monkeypatch)
    champion_fid = SCENARIOS[scenario][0]
    if champion_fid is not None:
        register(make_candidate(template, 1, champion_fid))
    shutil.copytree(template, tmp_path / "reference")
    reference, _ = register_challenger(tmp_path / "reference", scenario, None, monkeypatch)
    assert all(registry.PENDING not in tags for tags in reference["versions"].values())
    crash_at = 0
    while True:
        home = tmp_path / f"crash-{crash_at}"
        shutil.copytree(template, home)
        state, writes = register_challenger(home, scenario, crash_at, monkeypatch)
        assert state == reference, f"crash before write {crash_at}"
        if writes < crash_at:  # the run finished before reaching this write: every point was tried
            break
        crash_at += 1
    assert crash_at >= 4  # pending, (aliases), reason, decision, clean-up


def test_a_crash_after_the_version_exists_never_creates_a_second_one(tmp_path, store, monkeypatch):
    candidate = make_candidate(tmp_path, 2, 40.0)
    create = registry._log_and_register

    def create_then_crash(*args, **kwargs):
        create(*args, **kwargs)
        raise KeyboardInterrupt("killed right after the version was created")

    monkeypatch.setattr(registry, "_log_and_register", create_then_crash)
    with pytest.raises(KeyboardInterrupt):
        register(candidate)
    monkeypatch.setattr(registry, "_log_and_register", create)
    result = register(candidate)
    assert (result.version, result.decision) == ("1", "champion")
    assert len(store.search_model_versions(f"name='{NAME}'")) == 1


def test_the_champion_moved_during_judging_is_not_overwritten(tmp_path, store):
    register(make_candidate(tmp_path, 1, 60.0))  # v1 champion
    register(make_candidate(tmp_path, 3, 59.0))  # v2 kept
    challenger = make_candidate(tmp_path, 2, 40.0)

    def concurrent_promotion(version, protocol):  # another retrain promotes v2 while v3 is judged against v1
        store.set_registered_model_alias(NAME, CHAMPION, "2")
        return 60.0

    with pytest.raises(ChampionChanged, match="champion is v2 now, v1 when v3 was judged"):
        register(challenger, OTHER_PROTOCOL, concurrent_promotion)
    assert str(store.get_model_version_by_alias(NAME, CHAMPION).version) == "2"
    assert not {registry.PENDING, registry.DECISION} & set(store.get_model_version(NAME, "3").tags)

    result = register(challenger, OTHER_PROTOCOL, lambda version, protocol: 59.0)  # the retry judges against v2
    assert (result.version, result.decision) == ("3", "promoted")
    assert "59" in result.reason and str(store.get_model_version_by_alias(NAME, CHAMPION).version) == "3"


def test_a_champion_scored_under_another_protocol_is_rescored_once_and_the_score_kept(tmp_path, store):
    register(make_candidate(tmp_path, 1, 60.0))
    calls = []

    def rescore(version, protocol):
        calls.append((version, protocol))
        return 70.0

    second = register(make_candidate(tmp_path, 2, 66.0), OTHER_PROTOCOL, rescore)
    assert calls == [("1", OTHER_PROTOCOL)] and second.decision == "kept"  # 66 vs 70: not by more than 5
    assert "70" in second.reason
    champion_tags = store.get_model_version(NAME, "1").tags
    key = registry.protocol_key(OTHER_PROTOCOL)
    assert float(champion_tags[f"score.{key}.fid"]) == 70.0
    assert json.loads(champion_tags[f"score.{key}.protocol"]) == OTHER_PROTOCOL

    third = register(make_candidate(tmp_path, 3, 60.0), OTHER_PROTOCOL, rescore)
    assert len(calls) == 1, "the stored re-score is reused, not measured again"
    assert third.decision == "promoted" and "70" in third.reason

    same = register(make_candidate(tmp_path, 4, 56.0), OTHER_PROTOCOL)  # v3 was scored under this protocol
    assert same.decision == "kept" and "60" in same.reason


def test_an_unscorable_champion_lets_the_challenger_decide_on_its_own_score(tmp_path, store):
    register(make_candidate(tmp_path, 1, 10.0))
    attempts = []

    def unscorable(version, protocol):
        attempts.append(version)
        raise ChampionUnscorable("ModuleNotFoundError: No module named 'components.models.old'")

    too_far = register(make_candidate(tmp_path, 2, 140.0), OTHER_PROTOCOL, unscorable)
    assert too_far.decision == "kept"  # 140 > registry.ceiling.fid 100: the champion stays
    assert "cannot be scored" in too_far.reason and "exceeds registry.ceiling.fid 100" in too_far.reason
    result = register(make_candidate(tmp_path, 3, 40.0), OTHER_PROTOCOL, unscorable)
    assert result.decision == "promoted"
    assert "No module named" in result.reason and "is within registry.ceiling.fid 100" in result.reason
    assert str(store.get_model_version_by_alias(NAME, CHAMPION).version) == "3"
    assert attempts == ["1"], "a champion found unscorable under a protocol is not tried again"
    key = registry.protocol_key(OTHER_PROTOCOL)
    assert "No module named" in store.get_model_version(NAME, "1").tags[f"score.{key}.unscorable"]


def test_the_margin_is_the_gating_metrics_own(tmp_path, store):
    kid_gate = RegistryConfig(gating_metric="kid", min_improvement={"fid": 5.0, "kid": 0.001},
                              ceiling={"kid": 0.5})
    first, second = make_candidate(tmp_path, 1, 60.0), make_candidate(tmp_path, 2, 60.0)
    write_json({"fid": 60.0, "kid": 0.020}, first[1] / "metrics.json")
    write_json({"fid": 60.0, "kid": 0.015}, second[1] / "metrics.json")
    register(first, cfg=kid_gate)
    result = register(second, cfg=kid_gate)
    assert result.decision == "promoted", result.reason  # a FID margin of 5 would never let a KID through


def test_a_missing_protocol_is_an_error_naming_the_file(tmp_path, store):
    model_dir, eval_dir, lineage = make_candidate(tmp_path, 1, 60.0)
    with pytest.raises(FileNotFoundError, match=r"protocol\.json: missing; evaluate the model again"):
        register_model(NAME, model_dir, eval_dir, lineage, CFG, lambda version, protocol: 0.0)


def test_requirements_pin_versions_pypi_serves(monkeypatch):
    monkeypatch.setattr(registry, "version", lambda pkg: {"torch": "2.14.1+cu128"}.get(pkg, "1.2.3"))
    pins = registry.pip_requirements()
    assert "torch==2.14.1" in pins and all("+" not in pin for pin in pins)


# --- errors reading the registry are errors, not "absent" -------------------------------------------

@pytest.fixture
def failing_server(monkeypatch):
    """A real HTTP server answering every request with the status the test sets (or never answering)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    behaviour = {"status": 503}
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            if behaviour["status"] is None:
                stop.wait(10)  # a hung server: the client's timeout must fire
                return
            body = json.dumps({"error_code": "X", "message": "nope"}).encode()
            self.send_response(behaviour["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    yield behaviour
    stop.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [403, 500, 503, None], ids=["403", "500", "503", "timeout"])
def test_an_unreadable_champion_or_run_is_an_error_not_absent(failing_server, status):
    from components.tracking.runs import client

    failing_server["status"] = status
    with pytest.raises(Exception) as champion_error:
        registry._champion(client(), NAME)
    with pytest.raises(Exception) as run_error:
        registry._run_exists(client(), "0" * 32)
    for error in (champion_error, run_error):
        assert not isinstance(error.value, AssertionError)


def test_absent_champion_and_run_are_absent(tmp_path, store):
    assert registry._champion(store, NAME) is None  # no registered model
    register(make_candidate(tmp_path, 1, 60.0))
    store.delete_registered_model_alias(NAME, CHAMPION)
    assert registry._champion(store, NAME) is None  # model without the alias
    assert registry._run_exists(store, "0" * 32) is False


# --- re-scoring draws samples with the champion's own registered code ------------------------------

def test_registered_samples_come_from_the_models_own_code_snapshot(tmp_path, store):
    from components.evaluation.grid import sample_uint8
    from components.tracking.champion_samples import RegisteredModelUnloadable, registered_images
    from components.tracking.model_files import load_trained_model

    model_dir, _, _ = candidate = make_candidate(tmp_path, 1, 60.0)
    register(candidate)
    reference = np.zeros((6, 1, 28, 28), dtype=np.uint8)  # a sampler's images: as many as the reference holds
    samples, code = registered_images(f"models:/{NAME}/1", reference, seed=4)
    repo_components = Path(registry.__file__).resolve().parents[1]
    assert Path(code).resolve().parent != repo_components, "must load the registered snapshot, not today's code"
    assert Path(code).parent.name == "components"
    expected = sample_uint8(load_trained_model(model_dir), 6, seed=4).numpy()
    assert samples.dtype == expected.dtype and (samples == expected).all()

    # A version whose family today's code no longer has: registered, then its stored spec edited.
    register(make_candidate(tmp_path, 2, 50.0))
    stored = Path(urlparse(store.get_model_version_download_uri(NAME, "2")).path)
    (stored_spec,) = stored.glob("artifacts/*/model.json")
    stored_spec.write_text(json.dumps({**json.loads(stored_spec.read_text()), "family": "retired-family"}))
    with pytest.raises(RegisteredModelUnloadable, match="retired-family") as unloadable:
        registered_images(f"models:/{NAME}/2", reference[:2], seed=0)
    assert "genpipe-champion-" not in str(unloadable.value), "no temp path of this machine in the reason"
    with pytest.raises(RegisteredModelUnloadable, match=f"models:/{NAME}/99"):  # gone for good: not a retry
        registered_images(f"models:/{NAME}/99", reference[:2], seed=0)


def test_a_rescored_champions_interval_is_stored_and_judged(tmp_path, store):
    """A champion scored again under a new protocol brings its interval along: the gate still
    compares intervals, and the interval is stored beside the re-score, so it is measured once."""
    from components.evaluation.protocol import protocol_key

    register(make_candidate(tmp_path, 1, 60.0))  # v1, champion under PROTOCOL
    model_dir, eval_dir, lineage = make_candidate(tmp_path, 2, 40.0)
    write_json({"fid": 40.0, "fid_ci_low": 38.0, "fid_ci_high": 55.0}, eval_dir / "metrics.json")
    calls = []

    def rescore(version, protocol):
        calls.append(version)
        return {"fid": 50.0, "fid_ci_low": 45.0, "fid_ci_high": 56.0}

    result = register((model_dir, eval_dir, lineage), protocol=OTHER_PROTOCOL, rescore=rescore)
    assert calls == ["1"] and result.decision == "kept"  # 10 better, but the intervals overlap
    assert "intervals overlap" in result.reason
    tags = store.get_model_version(NAME, "1").tags
    key = protocol_key(OTHER_PROTOCOL)
    assert float(tags[f"score.{key}.fid_ci_low"]) == 45.0 and float(tags[f"score.{key}.fid_ci_high"]) == 56.0
    assert store.get_model_version(NAME, "2").tags["promotion.champion_ci"] == "[45.0, 56.0]"


def test_the_inception_scores_protocol_is_stored_with_the_version(tmp_path, store):
    candidate = make_candidate(tmp_path, 0, 100.0)
    info = {"num_samples": 12, "why": "12 images (mode: always)", "protocol": {"extractor_sha1": "a16e", "num_samples": 12}}
    write_json(info, candidate[1] / "inception.json")
    registration = register(candidate)
    assert json.loads(store.get_model_version(NAME, registration.version).tags["inception_protocol"]) == info

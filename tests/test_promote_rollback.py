"""The champion gate with intervals, a person's promote / rollback with their audit trail, and the
champion lock: against real SQLite tracking stores, the concurrent case in two processes."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from test_registry import CFG, PROTOCOL, make_candidate
from components.tracking import audit, registry
from components.tracking.champion_lock import (HEARTBEAT, INTERNAL, OWNER, RELEASED, LockBusy, LockLost,
                                                champion_lock)
from components.tracking.registry import CHAMPION, RegistryRequestError, promote, register_model, rollback
from components.training.checkpoint import write_json

NAME = "toy-dcgan"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite tracking store with its artefacts under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("GENPIPE_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setenv("GENPIPE_USER", "ada")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def candidate(root: Path, seed: int, fid: float, ci: tuple[float, float] | None):
    """A model ready to register whose evaluation scored `fid` with interval `ci` (None: before intervals)."""
    model_dir, eval_dir, lineage = make_candidate(root, seed, fid)
    metrics = {"fid": fid, "kid": 0.01, **({"fid_ci_low": ci[0], "fid_ci_high": ci[1]} if ci else {})}
    write_json(metrics, eval_dir / "metrics.json")
    write_json(PROTOCOL, eval_dir / "protocol.json")
    return model_dir, eval_dir, lineage


def register(parts, name: str = NAME):
    model_dir, eval_dir, lineage = parts
    return register_model(name, model_dir, eval_dir, lineage, CFG,
                          lambda version, protocol: pytest.fail("the champion must not be re-scored"))


def champion_of(c, name: str = NAME) -> str:
    return str(c.get_model_version_by_alias(name, CHAMPION).version)


# --- the gate, as registration records it ------------------------------------------------------------

def test_the_gate_records_both_intervals_the_rule_and_the_protocol(tmp_path, store):
    register(candidate(tmp_path, 1, 60.0, (58.0, 62.0)))
    kept = register(candidate(tmp_path, 2, 50.0, (49.0, 59.0)))  # 10 better, but the intervals overlap
    assert kept.decision == "kept" and "intervals overlap" in kept.reason
    tags = store.get_model_version(NAME, "2").tags
    assert json.loads(tags["promotion.challenger_ci"]) == [49.0, 59.0]
    assert json.loads(tags["promotion.champion_ci"]) == [58.0, 62.0]
    assert tags["promotion.protocol"] == registry.protocol_key(PROTOCOL)
    assert tags["promotion.rule"] == "fid lower by more than registry.min_improvement 5 and beyond both intervals"
    promoted = register(candidate(tmp_path, 3, 50.0, (49.0, 57.5)))
    assert promoted.decision == "promoted" and "intervals apart" in promoted.reason
    assert champion_of(store) == "3"


def test_a_champion_registered_before_intervals_is_judged_on_the_margin_and_it_says_so(tmp_path, store):
    register(candidate(tmp_path, 1, 60.0, None))
    result = register(candidate(tmp_path, 2, 50.0, (40.0, 61.0)))
    assert result.decision == "promoted"
    assert "no interval for the champion, margin alone decides" in result.reason
    tags = store.get_model_version(NAME, "2").tags
    assert tags["promotion.champion_ci"] == "none"
    assert tags["promotion.rule"] == "fid lower by more than registry.min_improvement 5"


# --- promote, rollback, history ----------------------------------------------------------------------

def test_promote_rollback_and_the_trail_they_leave(tmp_path, store, monkeypatch):
    register(candidate(tmp_path, 1, 60.0, (58.0, 62.0)))  # v1 champion
    register(candidate(tmp_path, 2, 58.0, (56.0, 60.0)))  # v2 kept
    register(candidate(tmp_path, 3, 40.0, (38.0, 42.0)))  # v3 promoted
    monkeypatch.setenv("GENPIPE_USER", "grace")
    record = promote(NAME, "2", "v3's samples show artefacts on shoes")
    assert champion_of(store) == "2"
    assert (record["from"], record["to"], record["who"], record["action"]) == ("3", "2", "grace", "promote")

    trail = registry.history(NAME)
    assert [(r["action"], r["from"], r["to"], r["who"]) for r in trail] == [
        ("register", None, "1", "ada"), ("register", "1", "3", "ada"), ("promote", "3", "2", "grace")]
    assert trail[-1]["why"] == "v3's samples show artefacts on shoes"
    times = [datetime.fromisoformat(r["at"]) for r in trail]
    assert times == sorted(times) and all(t.utcoffset().total_seconds() == 0 for t in times)
    assert "first version" in trail[0]["why"] and "intervals apart" in trail[1]["why"]

    assert rollback(NAME, "the artefacts were a display bug")["to"] == "3"
    assert champion_of(store) == "3"
    assert rollback(NAME, "back to the first")["to"] == "1"
    assert champion_of(store) == "1"
    with pytest.raises(RegistryRequestError, match=f"NAME {NAME}: no previous champion recorded in its audit trail"):
        rollback(NAME, "once more")
    assert champion_of(store) == "1" and len(registry.history(NAME)) == 5

    table = audit.table(registry.history(NAME)).splitlines()
    assert table[0].split() == ["when", "(UTC)", "who", "action", "from", "to", "why"]
    assert table[3].split()[2:6] == ["grace", "promote", "v3", "v2"] and len(table) == 6


def test_a_champion_moved_outside_genpipe_is_not_rolled_back_blindly(tmp_path, store):
    register(candidate(tmp_path, 1, 60.0, None))
    register(candidate(tmp_path, 2, 40.0, None))
    register(candidate(tmp_path, 3, 59.0, None))  # kept
    store.set_registered_model_alias(NAME, CHAMPION, "3")  # by hand in the MLflow UI: no record
    with pytest.raises(RegistryRequestError, match="champion v3 was set outside genpipe.*trail ends at v2"):
        rollback(NAME, "undo")


def test_bad_requests_name_the_argument(tmp_path, store):
    with pytest.raises(RegistryRequestError, match="NAME nope: no registered model of that name .registered: none"):
        promote("nope", "1", "why")
    register(candidate(tmp_path, 1, 60.0, None))
    register(candidate(tmp_path, 2, 70.0, None))
    with pytest.raises(RegistryRequestError, match=f"NAME nope: no registered model of that name .registered: {NAME}"):
        rollback("nope", "why")
    with pytest.raises(RegistryRequestError, match=f"VERSION 9: {NAME} has no version 9 .versions: 1, 2"):
        promote(NAME, "9", "why")
    with pytest.raises(RegistryRequestError, match=f"VERSION 1: already {NAME}'s champion"):
        promote(NAME, "1", "why")
    with pytest.raises(RegistryRequestError, match="reason: empty"):
        promote(NAME, "2", "  ")
    with pytest.raises(RegistryRequestError, match="no previous champion"):
        rollback(NAME, "why")
    assert champion_of(store) == "1" and len(registry.history(NAME)) == 1
    names = [m.name for m in store.search_registered_models()]
    assert len(names) == 2 and names[1].startswith(f"{NAME}.lock."), names  # one lock model stays at rest


def test_a_crash_between_the_alias_move_and_its_record_is_finished_by_the_rerun(tmp_path, store, monkeypatch):
    register(candidate(tmp_path, 1, 60.0, None))
    parts = candidate(tmp_path, 2, 40.0, None)
    write = audit.write

    def crash(*args):
        raise KeyboardInterrupt("killed after the alias moved")

    monkeypatch.setattr(audit, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        register(parts)
    assert champion_of(store) == "2" and len(registry.history(NAME)) == 1
    monkeypatch.setattr(audit, "write", write)
    assert register(parts).decision == "promoted"
    assert [(r["from"], r["to"]) for r in registry.history(NAME)] == [(None, "1"), ("1", "2")]
    assert register(parts).decision == "unchanged" and len(registry.history(NAME)) == 2


def test_the_cli_promotes_rolls_back_and_prints_the_history(tmp_path, store):
    register(candidate(tmp_path, 1, 60.0, None))
    register(candidate(tmp_path, 2, 70.0, None))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})

    result = cli("promote", NAME, "7", "--reason", "x")
    assert result.returncode == 2 and f"genpipe: VERSION 7: {NAME} has no version 7" in result.stderr
    result = cli("promote", NAME, "2", "--reason", "a person decided")
    assert result.returncode == 0, result.stderr
    assert f"{NAME}: champion v1 -> v2" in result.stdout
    assert cli("rollback", NAME, "--reason", "no").returncode == 0
    result = cli("history", NAME)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and "register" in lines[1] and "a person decided" in lines[2] and "rollback" in lines[3]
    assert cli("rollback", NAME).returncode == 2  # --reason is required


# --- the lock --------------------------------------------------------------------------------------

def test_a_dead_holders_lock_is_broken_after_its_heartbeat_stops(store):
    store.create_registered_model(f"{NAME}.lock.7", tags={OWNER: "host:1:dead", HEARTBEAT: "3"})
    start = time.monotonic()
    with champion_lock(store, NAME, stale_s=0.5, wait_s=10) as lock:
        assert lock.epoch == 8 and time.monotonic() - start >= 0.5
    assert [m.name for m in store.search_registered_models()] == [f"{NAME}.lock.8"]


def test_a_live_holder_keeps_its_lock_and_a_broken_holder_stops_writing(store):
    with champion_lock(store, NAME, stale_s=0.4, wait_s=10) as holder:
        with pytest.raises(LockBusy, match=f"{NAME}: another registration or promotion holds the champion lock"):
            with champion_lock(store, NAME, stale_s=0.4, wait_s=1.2):  # the heartbeat keeps it alive
                pass
        holder._stop.set()  # the holder hangs: no more heartbeats
        with champion_lock(store, NAME, stale_s=0.4, wait_s=10):
            with pytest.raises(LockLost, match="taken over"):
                holder.check()
            with pytest.raises(LockLost, match="taken over .* its last write may have raced"):
                holder.confirm()


def test_a_holder_whose_heartbeat_stops_landing_stops_writing_before_anyone_takes_over(store):
    with champion_lock(store, NAME, stale_s=2, wait_s=10) as holder:
        holder.check()
        holder._stop.set()  # the server stops answering its heartbeats
        time.sleep(1.1)
        with pytest.raises(LockLost, match=rf"no heartbeat of {NAME}\.lock\.1 has landed for [\d.]+ s"):
            holder.check()  # more than half the stale window: a write now could land after a take-over
        holder.confirm()  # still the newest epoch: what it wrote before is safe


def test_a_failure_right_after_taking_the_lock_leaves_it_free(store, monkeypatch):
    from mlflow.exceptions import MlflowException

    search, calls = store.search_registered_models, []

    def search_failing_once_after_create(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the read that verifies the epoch just created
            raise MlflowException("the tracking server went away")
        return search(*args, **kwargs)

    monkeypatch.setattr(store, "search_registered_models", search_failing_once_after_create)
    with pytest.raises(MlflowException, match="went away"):
        with champion_lock(store, NAME, stale_s=300, wait_s=10):
            pytest.fail("the lock must not be held")
    assert RELEASED in store.get_registered_model(f"{NAME}.lock.1").tags
    start = time.monotonic()
    with champion_lock(store, NAME, stale_s=300, wait_s=10) as lock:  # at once, not after the 300 s stale window
        assert lock.epoch == 2 and time.monotonic() - start < 5


def test_a_create_whose_answer_was_lost_and_retried_is_taken_as_ours(store, monkeypatch):
    create = store.create_registered_model

    def create_retried_after_a_lost_answer(*args, **kwargs):
        create(*args, **kwargs)  # it lands, the answer is lost, the client sends it again
        return create(*args, **kwargs)

    monkeypatch.setattr(store, "create_registered_model", create_retried_after_a_lost_answer)
    with champion_lock(store, NAME, stale_s=300, wait_s=2) as lock:
        assert lock.epoch == 1
        lock.check()

    def another_process_creates_it_first(model_name, tags, description):
        create(model_name, tags={**tags, OWNER: "host:1:other"}, description=description)
        return create(model_name, tags=tags, description=description)

    monkeypatch.setattr(store, "create_registered_model", another_process_creates_it_first)
    with pytest.raises(LockBusy, match=f"{NAME}.lock.2, owner host:1:other"):  # its ALREADY_EXISTS is a loss
        with champion_lock(store, NAME, stale_s=300, wait_s=0.5):
            pass


def test_an_older_epoch_another_user_may_not_delete_is_left_the_newest_decides(store, monkeypatch):
    from mlflow.exceptions import RestException

    store.create_registered_model(f"{NAME}.lock.3", tags={OWNER: "host:1:bob", HEARTBEAT: "5", RELEASED: "1"})

    def delete_denied(model_name):  # as a tracking server with basic auth answers another user's model
        raise RestException({"error_code": "PERMISSION_DENIED", "message": f"no MANAGE permission on {model_name}"})

    monkeypatch.setattr(store, "delete_registered_model", delete_denied)
    with champion_lock(store, NAME, stale_s=300, wait_s=2) as lock:
        assert lock.epoch == 4
    with champion_lock(store, NAME, stale_s=300, wait_s=2) as lock:
        assert lock.epoch == 5
    assert sorted(m.name for m in store.search_registered_models()) == [f"{NAME}.lock.{n}" for n in (3, 4, 5)]


def test_lock_models_are_marked_as_not_models(store):
    with champion_lock(store, NAME, stale_s=300, wait_s=2) as lock:
        model = store.get_registered_model(lock.model_name)
    assert model.tags[INTERNAL] == "true"
    assert model.description == f"genpipe's champion lock for {NAME}; not a model"


# --- two registrations at once ---------------------------------------------------------------------

def _register_in_process(home: str, rounds: list, barrier, results) -> None:
    """A retrain's registration in its own process: judging is slowed so that the two overlap."""
    os.environ.update(GENPIPE_HOME=home, MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")
    from components.tracking import registry as reg

    decide = reg.decide

    def slow_decide(*args, **kwargs):
        time.sleep(0.5)
        return decide(*args, **kwargs)

    reg.decide = slow_decide
    for name, parts in rounds:
        barrier.wait(timeout=120)
        try:
            result = reg.register_model(name, *map(Path, parts[:2]), parts[2], CFG,
                                        lambda version, protocol: 0.0)
            results.put((name, parts[2]["model_md5"], result.version, result.decision))
        except Exception as exc:  # reported, so that the test fails naming it
            results.put((name, parts[2]["model_md5"], None, repr(exc)))


def test_two_registrations_at_once_end_with_one_champion_the_better_one(tmp_path, store):
    rounds = 3
    worse, better = [], []
    for r in range(rounds):
        name = f"race-{r}"
        register(candidate(tmp_path / name, 1, 60.0, (58.0, 62.0)), name)
        worse.append((name, candidate(tmp_path / name, 2, 40.0, (38.0, 42.0))))
        better.append((name, candidate(tmp_path / name, 3, 30.0, (28.0, 32.0))))
    as_args = lambda rs: [(name, (str(p[0]), str(p[1]), p[2])) for name, p in rs]  # noqa: E731
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    home = os.environ["GENPIPE_HOME"]
    workers = [ctx.Process(target=_register_in_process, args=(home, as_args(rs), barrier, results))
               for rs in (worse, better)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=300) for _ in range(2 * rounds)]
    for w in workers:
        w.join(timeout=60)
    assert all(version is not None for _, _, version, _ in outcomes), outcomes
    for r in range(rounds):
        name = f"race-{r}"
        decided = {md5: (version, decision) for n, md5, version, decision in outcomes if n == name}
        better_version, better_decision = decided["md5-3"]
        worse_version, worse_decision = decided["md5-2"]
        assert champion_of(store, name) == better_version and better_decision == "promoted", decided
        trail = registry.history(name)
        assert [r["to"] for r in trail][-1] == better_version
        assert all(a["to"] == b["from"] for a, b in zip(trail, trail[1:])), "each move starts at the last one's end"
        promoted = {r["to"] for r in trail[1:]}
        assert (worse_decision == "promoted") == (worse_version in promoted), decided
        if worse_decision == "promoted":  # it was judged first, and the better one was judged against it
            assert store.get_model_version(name, better_version).tags["promotion.champion_score"] == "40.0"


def test_a_persons_rollback_during_a_crashed_registration_stands(tmp_path, store, monkeypatch):
    """v2's registration crashes right after it moved the champion alias; a person rolls v2 back; the
    rerun must not re-apply the pending plan over that, and the retry judging v2 anew keeps it out."""
    from test_registry import CrashAt

    from components.tracking.registry import ChampionChanged
    from components.tracking.runs import client

    register(candidate(tmp_path, 1, 60.0, None))
    challenger = candidate(tmp_path, 2, 40.0, None)
    crashing = CrashAt(client(), 3)  # writes: pending, challenger alias, champion alias | crash
    monkeypatch.setattr(registry, "client", lambda: crashing)
    with pytest.raises(KeyboardInterrupt):
        register(challenger)
    monkeypatch.setattr(registry, "client", client)
    assert champion_of(store) == "2" and registry.PENDING in store.get_model_version(NAME, "2").tags

    rollback(NAME, "v2's samples have artefacts the metric misses")
    with pytest.raises(ChampionChanged, match=r"ada moved the champion \(rollback to v1\) after v2 was judged"):
        register(challenger)
    assert champion_of(store) == "1"
    retry = register(challenger)
    assert retry.decision == "kept" and "ada rolled v2 back" in retry.reason and "genpipe promote" in retry.reason
    assert champion_of(store) == "1"
    assert [r["action"] for r in audit.trail(store.get_registered_model(NAME))] == ["register", "register", "rollback"]

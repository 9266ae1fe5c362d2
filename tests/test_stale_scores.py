"""Versions scored under an older protocol are marked stale at each registration, against a real
MLflow store (SQLite); the marks follow the registry, so a protocol that comes back clears them.
The Inception scores are marked against the newest version that has them, the same way."""
from __future__ import annotations

import json

import test_registry
from test_registry import NAME, make_candidate, register
from components.evaluation.protocol import INCEPTION_PROTOCOL_FILE, protocol_key
from components.tracking.registry import CHAMPION
from components.tracking.stale_scores import INCEPTION_STALE, MAX_NOTE, STALE, mark_stale
from components.training.checkpoint import write_json

A = {"evaluator": "e1", "metrics_code": "m1", "num_samples": 100, "seed": 1}
B = {**A, "evaluator": "e2"}  # the evaluator classifier was retrained
KEY_A, KEY_B = protocol_key(A), protocol_key(B)
store = test_registry.store  # the same SQLite store fixture


def notes(c) -> dict[str, str | None]:
    return {str(mv.version): mv.tags.get(STALE) for mv in c.search_model_versions(f"name='{NAME}'")}


def rescored(value: float, calls: list):
    def rescore(version, protocol):
        calls.append((version, protocol_key(protocol)))
        return value
    return rescore


def test_versions_under_another_protocol_are_marked_and_cleared_when_it_comes_back(tmp_path, store):
    register(make_candidate(tmp_path, 1, 60.0), A)  # v1 champion
    register(make_candidate(tmp_path, 2, 58.0), A)  # v2 kept: not better by more than 5
    assert notes(store) == {"1": None, "2": None}

    calls = []
    third = register(make_candidate(tmp_path, 3, 40.0), B, rescored(70.0, calls))
    assert third.decision == "promoted" and calls == [("1", KEY_B)]
    marked = notes(store)
    assert marked["3"] is None
    for version in ("1", "2"):
        note = marked[version]
        assert f"measured under protocol {KEY_A}" in note and f"protocol {KEY_B} is current since v3" in note
        assert "(changed: evaluator)" in note, "only the evaluator differs between A and B"
        assert "\n" not in note and len(note) < MAX_NOTE
    # the champion was re-scored under B: its note says where those scores are
    assert f"score.{KEY_B}.* tags hold its fid under the current protocol" in marked["1"]
    assert float(store.get_model_version(NAME, "1").tags[f"score.{KEY_B}.fid"]) == 70.0
    assert "not re-scored" in marked["2"] and "score." not in marked["2"]

    calls.clear()
    fourth = register(make_candidate(tmp_path, 4, 30.0), A, rescored(50.0, calls))  # the old evaluator is back
    assert fourth.decision == "promoted" and calls == [("3", KEY_A)]
    marked = notes(store)
    assert {v: n for v, n in marked.items() if n is None} == {"1": None, "2": None, "4": None}
    assert f"measured under protocol {KEY_B}" in marked["3"]
    assert f"protocol {KEY_A} is current since v4" in marked["3"]
    assert f"score.{KEY_A}.* tags hold its fid" in marked["3"]

    from components.reporting.report import _summary, resolve

    rows = dict(_summary(resolve(f"{NAME}/3"), "generate").table)  # the version's report shows the note
    assert rows["metrics_stale"] == marked["3"] and "metrics_stale" not in dict(_summary(resolve(f"{NAME}/4"),
                                                                                         "generate").table)


def test_marking_again_writes_nothing_and_an_outdated_caller_changes_nothing(tmp_path, store):
    register(make_candidate(tmp_path, 1, 60.0), A)
    register(make_candidate(tmp_path, 2, 40.0), B, lambda version, protocol: 70.0)
    register(make_candidate(tmp_path, 3, 39.0), B)  # B stays current: still "since v2"
    before = notes(store)
    assert "current since v2" in before["1"] and before["2"] is None and before["3"] is None

    assert mark_stale(store, NAME, B, "3") == {}, "nothing changed, nothing written"
    # a registration judged under A after v3 exists under B must not mark the newer versions stale
    assert mark_stale(store, NAME, A, "1") == {}
    assert notes(store) == before


def test_a_version_without_a_readable_protocol_is_marked_without_error(tmp_path, store):
    register(make_candidate(tmp_path, 1, 60.0), A)
    register(make_candidate(tmp_path, 2, 50.0), A)
    store.delete_model_version_tag(NAME, "1", "protocol")  # as registered before protocols were stored
    store.delete_model_version_tag(NAME, "1", "protocol_key")
    store.set_model_version_tag(NAME, "2", "protocol", "{not json")  # its key stays, the fields are lost
    store.set_model_version_tag(NAME, "2", "protocol_key", "0123456789ab")
    store.set_model_version_tag(NAME, "2", f"score.{KEY_B}.unscorable", "No module named 'old'")

    changes = mark_stale(store, NAME, B, "3")[STALE]
    assert set(changes) == {"1", "2"}
    assert "measured under an unknown protocol" in changes["1"] and f"protocol {KEY_B}" in changes["1"]
    assert "protocol 0123456789ab" in changes["2"] and "fields were not stored" in changes["2"]
    assert "cannot be scored under the current protocol" in changes["2"]
    assert notes(store) == changes


def test_a_note_stays_one_line_under_the_limit_however_many_fields_changed(tmp_path, store):
    register(make_candidate(tmp_path, 1, 60.0), A)
    wide = {f"field_{i:03d}_with_a_long_name": i for i in range(60)}
    (note,) = mark_stale(store, NAME, wide, "2")[STALE].values()
    assert len(note) <= MAX_NOTE and "\n" not in note and note.endswith("...")
    assert str(store.get_model_version_by_alias(NAME, CHAMPION).version) == "1", "marks move no alias"


def test_a_note_left_on_a_version_under_the_current_protocol_is_removed(tmp_path, store):
    register(make_candidate(tmp_path, 1, 60.0), A)
    store.set_model_version_tag(NAME, "1", STALE, "left by an earlier protocol")
    assert mark_stale(store, NAME, A, "1") == {STALE: {"1": None}}
    assert notes(store) == {"1": None}


# Inception protocols as components/evaluation/inception.py writes them (fields abridged)
CPU = {"extractor_sha1": "a16e", "num_samples": 1000, "resize": "bilinear to 299",
       "reference": {"dataset_version": "d1", "split": "test", "seed": 1, "count": 1000}}
GPU = {**CPU, "num_samples": 10000, "reference": {**CPU["reference"], "count": 10000}}
NEW_EXTRACTOR = {**GPU, "extractor_sha1": "b7f0"}


def with_inception(candidate, protocol: dict | None, fid: float = 30.0):
    """The candidate's evaluation with Inception scores under `protocol`, or none (skipped, as on a CPU)."""
    _, eval_dir, _ = candidate
    info = ({"num_samples": 0, "why": "skipped: no GPU here and evaluate.inception.cpu_samples is 0", "protocol": None}
            if protocol is None else {"num_samples": protocol["num_samples"], "why": "test", "protocol": protocol})
    write_json(info, eval_dir / INCEPTION_PROTOCOL_FILE)
    if protocol is not None:
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        write_json({**metrics, "inception_fid": fid, "inception_kid": 0.01}, eval_dir / "metrics.json")
    return candidate


def inception_notes(c) -> dict[str, str | None]:
    return {str(mv.version): mv.tags.get(INCEPTION_STALE) for mv in c.search_model_versions(f"name='{NAME}'")}


def test_inception_scores_under_another_protocol_than_the_newest_are_marked_and_cleared(tmp_path, store):
    register(with_inception(make_candidate(tmp_path, 1, 60.0), CPU), A)  # 1,000 images on a CPU
    register(with_inception(make_candidate(tmp_path, 2, 50.0), None), A)  # no Inception scores
    assert inception_notes(store) == {"1": None, "2": None}

    register(with_inception(make_candidate(tmp_path, 3, 40.0), GPU), A)  # 10,000 on a GPU
    marked = inception_notes(store)
    assert marked["2"] is None and marked["3"] is None, "no scores, no mark; the newest is the reference"
    note = marked["1"]
    assert f"Inception protocol {protocol_key(CPU)}" in note and f"(v3) are under {protocol_key(GPU)}" in note
    assert "(changed: num_samples 1000 -> 10000, reference)" in note, "counts shown, nested fields named"
    assert "\n" not in note and len(note) <= MAX_NOTE
    assert all(mv.tags.get(STALE) is None for mv in store.search_model_versions(f"name='{NAME}'")), \
        "one domain protocol throughout: no metrics_stale"

    register(with_inception(make_candidate(tmp_path, 4, 30.0), NEW_EXTRACTOR), A)
    marked = inception_notes(store)
    assert "(changed: extractor_sha1)" in marked["3"] and "(v4)" in marked["3"]
    assert "(changed: extractor_sha1, num_samples 1000 -> 10000, reference)" in marked["1"]
    assert marked["2"] is None and marked["4"] is None

    register(with_inception(make_candidate(tmp_path, 5, 20.0), GPU), A)  # the GPU protocol is back
    marked = inception_notes(store)
    assert {v for v, n in marked.items() if n is None} == {"2", "3", "5"}, "v3 cleared: its protocol is current"
    assert "(v5)" in marked["1"] and "(changed: extractor_sha1)" in marked["4"]

    assert mark_stale(store, NAME, A, "5") == {}, "nothing changed, nothing written"
    assert mark_stale(store, NAME, B, "1") == {}, "an outdated caller changes neither tag"
    assert inception_notes(store) == marked


def test_an_inception_note_without_scores_or_without_a_stored_protocol(tmp_path, store):
    register(with_inception(make_candidate(tmp_path, 1, 60.0), GPU), A)
    register(with_inception(make_candidate(tmp_path, 2, 50.0), GPU), A)
    register(with_inception(make_candidate(tmp_path, 3, 40.0), None), A)
    store.set_model_version_tag(NAME, "3", INCEPTION_STALE, "left by an earlier registration")
    store.delete_model_version_tag(NAME, "1", "inception_protocol")  # registered before it was stored

    changes = mark_stale(store, NAME, A, "3")
    assert set(changes) == {INCEPTION_STALE}, "the domain protocol is unchanged"
    assert changes[INCEPTION_STALE]["3"] is None, "a version without Inception scores carries no mark"
    assert "measured under an unknown Inception protocol" in changes[INCEPTION_STALE]["1"]
    assert set(changes[INCEPTION_STALE]) == {"1", "3"}

    store.set_model_version_tag(NAME, "2", "inception_protocol", "{not json")  # the newest's protocol is lost
    changes = mark_stale(store, NAME, A, "3")[INCEPTION_STALE]
    assert set(changes) == {"1"} and "(v2) carry no protocol to compare with" in changes["1"]
    assert inception_notes(store) == {"1": changes["1"], "2": None, "3": None}

"""Mark registered versions whose scores cannot be compared with the current ones.

A version's `metric.*` tags are its evaluation's scores under its own protocol (`protocol`,
`protocol_key` tags). Once the evaluator classifier, the metric code or the sample counts change,
those numbers look current but cannot be compared with a newer version's. Each such version gets
a `metrics_stale` tag saying so in one line; a version under today's protocol has none (a protocol
that comes back clears it).

The Inception scores (`metric.inception_*`) have a protocol of their own, stored in the version's
`inception_protocol` tag (the evaluation's inception.json): 1,000 images on a CPU and 10,000 on a
GPU, or another extractor, give FIDs that must not sit side by side unmarked. A version with
Inception scores whose Inception protocol is not that of the newest version with Inception scores
gets an `inception_stale` tag naming the fields that differ; a version without them gets none.

The marks are a function of the registry's versions alone, so writing them again changes nothing,
and a rerun after a crash ends where an uninterrupted run ends.
"""
from __future__ import annotations

import json

from components.evaluation.protocol import protocol_key

STALE = "metrics_stale"
INCEPTION_STALE = "inception_stale"
INCEPTION_SCORE = "metric.inception_fid"  # a version with this tag has Inception scores
MAX_NOTE = 500  # characters of a tag's value
SCORE_PARTS = ("protocol", "unscorable")  # score.<key>.<part> tags that are not a metric

Notes = dict[str, str | None]  # version -> its note, None for no tag


def mark_stale(c, name: str, current_protocol: dict, since_version: str) -> dict[str, Notes]:
    """Set or clear `metrics_stale` and `inception_stale` on every version of `name`, from one search.

    `metrics_stale` is set where the version's protocol is not `current_protocol`, cleared where it is.
    `since_version` is the version registered under `current_protocol` by the caller. When a newer
    version carries another protocol, that one is current: no `metrics_stale` is written here (the newer
    registration marks, under the same champion lock). `inception_stale` follows the newest version with
    Inception scores, whoever calls. Returns the changes made: tag -> {version: its new note, or None
    where a note was removed}, holding only the tags that changed."""
    versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version), reverse=True)
    wanted = {INCEPTION_STALE: _inception_notes(versions)}
    domain = _domain_notes(versions, current_protocol, since_version)
    if domain is not None:
        wanted[STALE] = domain
    changes: dict[str, Notes] = {}
    for tag, notes in wanted.items():
        for mv in versions:
            version = str(mv.version)
            note = notes[version]
            if mv.tags.get(tag) == note:  # only changed tags are written
                continue
            if note is None:
                c.delete_model_version_tag(name, version, tag)
            else:
                c.set_model_version_tag(name, version, tag, note)
            changes.setdefault(tag, {})[version] = note
    return changes


def _domain_notes(versions: list, current_protocol: dict, since_version: str) -> Notes | None:
    """Each version's `metrics_stale` note; None when a newer version than `since_version` carries
    another protocol (the caller's protocol is not current)."""
    current = protocol_key(current_protocol)
    keys = {str(mv.version): _key(mv.tags) for mv in versions}
    if any(int(version) > int(since_version) and key != current for version, key in keys.items()):
        return None
    since = _current_since(keys, current, since_version)
    return {str(mv.version): None if keys[str(mv.version)] == current else
            _note(mv.tags, keys[str(mv.version)], current_protocol, current, since) for mv in versions}


def _key(tags: dict) -> str | None:
    """A version's protocol key; None for one registered before protocols were stored."""
    if "protocol_key" in tags:
        return tags["protocol_key"]
    protocol = _protocol(tags)
    return None if protocol is None else protocol_key(protocol)


def _protocol(tags: dict) -> dict | None:
    try:
        protocol = json.loads(tags["protocol"])
    except (KeyError, ValueError):
        return None
    return protocol if isinstance(protocol, dict) else None


def _current_since(keys: dict[str, str | None], current: str, since_version: str) -> str:
    """The oldest version of the unbroken run under the current protocol that ends at `since_version`:
    with v1 under A, v2 under B and v3, v4 under A, A is current since v3."""
    since = since_version
    for version, key in keys.items():  # newest first
        if int(version) > int(since_version):
            continue
        if key != current:
            break
        since = version
    return since


def _note(tags: dict, old: str | None, current_protocol: dict, current: str, since: str) -> str:
    """One line: under which protocol the metric.* tags were measured, what changed since, and
    where the version's scores under today's protocol are, if it was re-scored."""
    if old is None:
        measured, changed = "an unknown protocol (registered before protocols were stored)", ""
    else:
        old_protocol = _protocol(tags)
        measured = f"protocol {old}"
        changed = (" (its protocol's fields were not stored)" if old_protocol is None else
                   f" (changed: {', '.join(_differing_fields(old_protocol, current_protocol))})")
    note = f"metric.* tags measured under {measured}; protocol {current} is current since v{since}{changed}"
    prefix = f"score.{current}."
    rescored = sorted(k.removeprefix(prefix) for k in tags
                      if k.startswith(prefix) and k.removeprefix(prefix) not in SCORE_PARTS
                      and not k.endswith(("_ci_low", "_ci_high")))
    if rescored:
        note += f"; {prefix}* tags hold its {', '.join(rescored)} under the current protocol"
    elif f"{prefix}unscorable" in tags:
        note += f"; it cannot be scored under the current protocol ({prefix}unscorable)"
    else:
        note += "; not re-scored under it, so do not compare its metric.* with current versions'"
    return _one_line(note)


def _differing_fields(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _inception_notes(versions: list) -> Notes:
    """Each version's `inception_stale` note: set where it has Inception scores under another Inception
    protocol than the newest version with Inception scores (`versions` is newest first)."""
    scored = [mv for mv in versions if INCEPTION_SCORE in mv.tags]
    notes: Notes = {str(mv.version): None for mv in versions}
    if not scored:
        return notes
    newest = scored[0]
    current = _inception_protocol(newest.tags)
    for mv in scored[1:]:
        old = _inception_protocol(mv.tags)
        if old is None or current is None or protocol_key(old) != protocol_key(current):
            notes[str(mv.version)] = _inception_note(old, current, str(newest.version))
    return notes


def _inception_protocol(tags: dict) -> dict | None:
    """The `protocol` inside a version's `inception_protocol` tag; None when it was not stored."""
    try:
        protocol = json.loads(tags["inception_protocol"]).get("protocol")
    except (KeyError, ValueError, AttributeError):
        return None
    return protocol if isinstance(protocol, dict) else None


def _inception_note(old: dict | None, current: dict | None, newest: str) -> str:
    """One line: the Inception protocol the version's metric.inception_* were measured under, and
    how it differs from that of the newest Inception scores (v`newest`)."""
    measured = ("an unknown Inception protocol (its inception_protocol tag holds none)" if old is None
                else f"Inception protocol {protocol_key(old)}")
    if current is None:
        newest_text = f"the newest Inception scores (v{newest}) carry no protocol to compare with"
    else:
        newest_text = f"the newest Inception scores (v{newest}) are under {protocol_key(current)}"
        if old is not None:
            changed = ", ".join(_field_change(k, old.get(k), current.get(k)) for k in _differing_fields(old, current))
            newest_text += f" (changed: {changed})"
    return _one_line(f"metric.inception_* measured under {measured}; {newest_text}; "
                     f"do not compare its metric.inception_* with v{newest}'s")


def _field_change(field: str, old, new) -> str:
    """`num_samples 1000 -> 10000` for counts and flags; the field's name alone for hashes and dicts."""
    shown = (int, float, bool, type(None))
    return f"{field} {json.dumps(old)} -> {json.dumps(new)}" if isinstance(old, shown) and isinstance(new, shown) \
        else field


def _one_line(note: str) -> str:
    note = " ".join(note.split())
    return note if len(note) <= MAX_NOTE else note[:MAX_NOTE - 3] + "..."

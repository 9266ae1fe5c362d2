"""Mark registered versions whose `metric.*` tags were measured under an older score protocol.

A version's `metric.*` tags are its evaluation's scores under its own protocol (`protocol`,
`protocol_key` tags). Once the evaluator classifier, the metric code or the sample counts change,
those numbers look current but cannot be compared with a newer version's. Each such version gets
a `metrics_stale` tag saying so in one line; a version under today's protocol has none (a protocol
that comes back clears it). The marks are a function of the registry's versions alone, so writing
them again changes nothing, and a rerun after a crash ends where an uninterrupted run ends.
"""
from __future__ import annotations

import json

from components.evaluation.protocol import protocol_key

STALE = "metrics_stale"
MAX_NOTE = 500  # characters of the tag's value
SCORE_PARTS = ("protocol", "unscorable")  # score.<key>.<part> tags that are not a metric


def mark_stale(c, name: str, current_protocol: dict, since_version: str) -> dict[str, str | None]:
    """Set or clear `metrics_stale` on every version of `name`: set where the version's protocol is not
    `current_protocol`, cleared where it is. `since_version` is the version registered under
    `current_protocol` by the caller. When a newer version carries another protocol, that one is
    current: nothing is written here (the newer registration marks, under the same champion lock).
    Returns the changes made: version -> its new note, or None where a note was removed."""
    current = protocol_key(current_protocol)
    versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version), reverse=True)
    keys = {str(mv.version): _key(mv.tags) for mv in versions}
    if any(int(version) > int(since_version) and key != current for version, key in keys.items()):
        return {}
    since = _current_since(keys, current, since_version)
    changes: dict[str, str | None] = {}
    for mv in versions:
        version, tags = str(mv.version), mv.tags
        note = None if keys[version] == current else _note(tags, keys[version], current_protocol, current, since)
        if tags.get(STALE) == note:  # only changed tags are written
            continue
        if note is None:
            c.delete_model_version_tag(name, version, STALE)
        else:
            c.set_model_version_tag(name, version, STALE, note)
        changes[version] = note
    return changes


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
    return note if len(note) <= MAX_NOTE else note[:MAX_NOTE - 3] + "..."


def _differing_fields(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))

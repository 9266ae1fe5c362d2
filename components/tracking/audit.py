"""The audit trail of a registered model's `champion` alias: who moved it, when, from which version
to which, and why — the pipeline's promotions and a person's promote / rollback alike.

One registered-model tag per record, `audit.<UTC time>.<random>` → JSON. Setting a tag is one write
that touches no other record, so two processes never lose each other's records; an appended
JSON-lines artifact would need a read-modify-write, and artifact stores (S3, a local folder) have no
atomic append. Tags also live in the tracking database itself, beside the aliases they describe.
Records are written under the champion lock, right after the alias move; oldest-first order is the
order of their UTC times (the clocks of the machines that wrote them).
"""
from __future__ import annotations

import getpass
import json
import os
import uuid
from datetime import datetime, timezone

PREFIX = "audit."
FIELDS = ("at", "who", "action", "from", "to", "why")
MAX_WHY = 2000  # characters of a reason kept in a record


def who() -> str:
    """GENPIPE_USER (set it where every process runs as one service account), else the login name."""
    user = os.environ.get("GENPIPE_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid {os.getuid()}"


def new_record(action: str, from_version: str | None, to_version: str, why: str) -> tuple[str, dict]:
    """A record and its tag key, made before the move so that a rerun after a crash writes the same one."""
    now = datetime.now(timezone.utc)
    key = f"{PREFIX}{now.strftime('%Y%m%dT%H%M%S.%fZ')}.{uuid.uuid4().hex[:6]}"
    record = {"at": now.isoformat(timespec="microseconds"), "who": who(), "action": action,
              "from": from_version, "to": to_version, "why": why[:MAX_WHY]}
    return key, record


def write(c, name: str, key: str, record: dict) -> None:
    c.set_registered_model_tag(name, key, json.dumps(record, sort_keys=True))


def trail(model) -> list[dict]:
    """A registered model's audit records, oldest first."""
    records = [(key, json.loads(value)) for key, value in model.tags.items() if key.startswith(PREFIX)]
    return [record for _, record in sorted(records, key=lambda kv: (kv[1]["at"], kv[0]))]


def champion_stack(records: list[dict]) -> list[str]:
    """The champions in order of succession, as the trail tells it: a promotion pushes its version
    (after the version it replaced, when the trail had not seen that one), a rollback pops one."""
    stack: list[str] = []
    for record in records:
        if record["action"] == "rollback" and stack and stack[-1] == record["from"]:
            stack.pop()
        elif record["from"] is not None and (not stack or stack[-1] != record["from"]):
            stack.append(record["from"])  # a champion from before the trail, or moved outside genpipe
        if not stack or stack[-1] != record["to"]:
            stack.append(record["to"])
    return stack


def table(records: list[dict]) -> str:
    """The records as a plain-text table, one line each."""
    rows = [["when (UTC)", "who", "action", "from", "to", "why"]]
    for r in records:
        rows.append([r["at"][:19].replace("T", " "), r["who"], r["action"],
                     "-" if r["from"] is None else f"v{r['from']}", f"v{r['to']}", " ".join(r["why"].split())])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)

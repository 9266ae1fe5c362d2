"""Mutual exclusion for moving a registered model's `champion` alias, through any MLflow store.

MLflow has no conditional alias update; its one atomic test-and-set is creating a registered model
(a second create of a name fails with RESOURCE_ALREADY_EXISTS, in SQLite, PostgreSQL or through a
server). The lock of NAME is therefore a series of registered models `NAME.lock.<epoch>`:
  - the newest epoch is the lock; it is free when tagged `released`, or stale when its `heartbeat`
    tag has not changed for `stale_s` by the waiter's own clock (no clock of two machines compared);
  - taking it creates epoch n+1, so of two processes that found epoch n free only one gets it, and
    breaking a dead holder's lock is the same atomic create: no second holder can slip in;
  - epochs only grow (older ones are deleted, the newest never), so a process that stalled between
    reading n and creating n+1 finds a newer epoch when it checks, and backs off;
  - the holder refreshes its heartbeat from a thread while it works (a re-score can take minutes),
    and checks that no newer epoch exists right before each alias move (`LockLost` otherwise).
At rest one model `NAME.lock.<n>` tagged `released` stays: it carries the epoch forward.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
import uuid
from typing import Iterator

LOCK_STALE_S = 60.0   # a holder silent this long (no heartbeat) is presumed dead; it beats every quarter of it
LOCK_WAIT_S = 3600.0  # a registration waits this long for another one's judging (re-scores included)
OWNER, HEARTBEAT, RELEASED = "genpipe.lock.owner", "genpipe.lock.heartbeat", "genpipe.lock.released"


class LockBusy(RuntimeError):
    """The lock stayed held, with a live heartbeat, for the whole wait."""


class LockLost(RuntimeError):
    """A newer epoch exists: this holder was presumed dead and its lock broken; its writes must stop."""


def lock_prefix(name: str) -> str:
    return f"{name}.lock."


def is_lock_model(registered_name: str) -> bool:
    head, sep, epoch = registered_name.rpartition(".lock.")
    return bool(sep and head and epoch.isdigit())


def _is(exc: Exception, code: str) -> bool:
    return getattr(exc, "error_code", None) == code


def _epochs(c, name: str) -> dict[int, dict[str, str]]:
    """epoch -> tags of every lock model of `name`."""
    prefix = lock_prefix(name)
    found, token = {}, None
    while True:
        page = c.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=100, page_token=token)
        for model in page:  # LIKE also matches '_' and '%' as wildcards, and ignores case in SQLite
            epoch = model.name[len(prefix):]
            if model.name.startswith(prefix) and epoch.isdigit():
                found[int(epoch)] = dict(model.tags)
        token = page.token
        if not token:
            return found


class ChampionLock:
    """Held by `champion_lock`; `check()` before each write that must not race."""

    def __init__(self, c, name: str, stale_s: float):
        self.c, self.name, self.stale_s = c, name, stale_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.epoch: int | None = None
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    @property
    def model_name(self) -> str:
        return f"{lock_prefix(self.name)}{self.epoch}"

    def acquire(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        seen: tuple | None = None  # (epoch, heartbeat) of a held lock and when this process first saw it
        seen_at = 0.0
        while True:
            epochs = _epochs(self.c, self.name)
            newest = max(epochs, default=0)
            tags = epochs.get(newest, {})
            state = (newest, tags.get(HEARTBEAT))
            if state != seen:
                seen, seen_at = state, time.monotonic()
            free = newest == 0 or RELEASED in tags or time.monotonic() - seen_at >= self.stale_s
            if free and self._create(newest + 1):
                if max(_epochs(self.c, self.name)) == self.epoch:
                    self._delete_older(epochs)
                    self._start_heartbeat()
                    return
                self._delete_own()  # stalled between reading and creating: a newer holder exists
            if time.monotonic() > deadline:
                raise LockBusy(f"{self.name}: another registration or promotion holds the champion lock "
                               f"({lock_prefix(self.name)}{newest}, owner {tags.get(OWNER, '?')}) after waiting "
                               f"{wait_s:g} s; try again later, or delete that registered model if its owner is gone")
            time.sleep(random.uniform(0.05, 0.25))

    def _create(self, epoch: int) -> bool:
        from mlflow.exceptions import MlflowException

        self.epoch = epoch
        try:  # tags in the create call itself: no moment where the lock exists without its owner
            self.c.create_registered_model(
                self.model_name, tags={OWNER: self.owner, HEARTBEAT: "0"},
                description=f"genpipe's lock on moving {self.name}'s champion alias; it stays, tagged released, "
                            f"between registrations")
            return True
        except MlflowException as exc:
            if _is(exc, "RESOURCE_ALREADY_EXISTS"):
                return False
            raise

    def _delete_older(self, epochs: dict) -> None:
        for epoch in epochs:
            if epoch < self.epoch:
                self._delete(f"{lock_prefix(self.name)}{epoch}")

    def _delete_own(self) -> None:
        self._delete(self.model_name)

    def _delete(self, model_name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.c.delete_registered_model(model_name)
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                raise

    def _start_heartbeat(self) -> None:
        from mlflow import MlflowClient

        beater = MlflowClient(tracking_uri=self.c.tracking_uri)  # its own client: the thread runs beside writes

        def beat():
            count = 0
            while not self._stop.wait(self.stale_s / 4):
                count += 1
                with contextlib.suppress(Exception):  # a missed beat only risks a break, which check() sees
                    beater.set_registered_model_tag(self.model_name, HEARTBEAT, str(count))

        self._beats = threading.Thread(target=beat, name=f"lock-heartbeat-{self.name}", daemon=True)
        self._beats.start()

    def check(self) -> None:
        """Raise LockLost when another process broke this lock (this one was presumed dead)."""
        newest = max(_epochs(self.c, self.name), default=0)
        if newest != self.epoch:
            raise LockLost(f"{self.name}: the champion lock was taken over ({lock_prefix(self.name)}{newest}) while "
                           f"this process held {self.model_name}; nothing more is written; register again")

    def release(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join()
        from mlflow.exceptions import MlflowException

        try:
            self.c.set_registered_model_tag(self.model_name, RELEASED, "1")
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):  # deleted by a newer holder: nothing to release
                raise


@contextlib.contextmanager
def champion_lock(c, name: str, stale_s: float = LOCK_STALE_S, wait_s: float = LOCK_WAIT_S) -> Iterator[ChampionLock]:
    """Hold NAME's champion lock for the block (see the module docstring)."""
    lock = ChampionLock(c, name, stale_s)
    lock.acquire(wait_s)
    try:
        yield lock
    finally:
        lock.release()

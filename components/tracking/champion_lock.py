"""Mutual exclusion for moving a registered model's `champion` alias, through any MLflow store.

MLflow has no conditional alias update; its one atomic test-and-set is creating a registered model
(a second create of a name fails with RESOURCE_ALREADY_EXISTS, in SQLite, PostgreSQL or through a
server). The lock of NAME is therefore a series of registered models `NAME.lock.<epoch>`, tagged
`genpipe.internal=true`:
  - the newest epoch is the lock; it is free when tagged `released`, or stale when its `heartbeat`
    tag has not changed for `stale_s` by the waiter's own clock (no clock of two machines compared);
  - taking it creates epoch n+1, so of two processes that found epoch n free only one gets it, and
    breaking a dead holder's lock is the same atomic create: no second holder can slip in;
  - epochs only grow (older ones are deleted, the newest never), so a process that stalled between
    reading n and creating n+1 finds a newer epoch when it checks, and backs off;
  - the holder refreshes its heartbeat from a thread while it works (a re-score can take minutes).
Requests are not instant (MLflow's client retries a failing server for minutes), so a holder
  - before each write that must not race, `check()`s that no newer epoch exists and that a heartbeat
    it sent less than half the stale window ago has landed (`LockLost` otherwise: nothing is written);
  - right after the write, `confirm()`s that no newer epoch exists (`LockLost` otherwise: the write
    may have raced, and the caller reports it rather than succeed).
The guarantee: no two holders write at once as long as every request of a holder and of a waiter
taking over lands within a third of the stale window of being sent (a write counted from the check
before it); a request delayed longer can race, and then the holder's `confirm()` reports it.
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

from components.tracking.runs import has_error_code

# A holder silent this long (no heartbeat landed) is presumed dead; it beats every quarter of it. 5 min: longer
# than MLflow's client retries an erroring server (7 retries, about 4 min), so a live holder's heartbeat
# outlasts a short outage, and half of it (a holder's budget for one write) is far above a normal request.
LOCK_STALE_S = 300.0
LOCK_WAIT_S = 3600.0  # a registration waits this long for another one's judging (re-scores included)
OWNER, HEARTBEAT, RELEASED = "genpipe.lock.owner", "genpipe.lock.heartbeat", "genpipe.lock.released"
INTERNAL = "genpipe.internal"  # "true" on registered models that are genpipe's bookkeeping, not models


class LockBusy(RuntimeError):
    """The lock stayed held, with a live heartbeat, for the whole wait."""


class LockLost(RuntimeError):
    """A newer epoch exists, or this holder's heartbeat stopped landing: it may be presumed dead; it stops writing."""


def lock_prefix(name: str) -> str:
    return f"{name}.lock."


def is_lock_model(registered_name: str) -> bool:
    head, sep, epoch = registered_name.rpartition(".lock.")
    return bool(sep and head and epoch.isdigit())


def _newest(epochs: dict) -> int:
    return max(epochs, default=0)  # 0: no lock model at all (never taken, or its epoch deleted under it)


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
    """Held by `champion_lock`; `check()` before and `confirm()` after each write that must not race."""

    def __init__(self, c, name: str, stale_s: float):
        self.c, self.name, self.stale_s = c, name, stale_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.epoch: int | None = None
        self._beat_sent = 0.0  # monotonic time a request that landed (create, heartbeat) was sent
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
            read_at = time.monotonic()  # silence is measured up to when the read was sent, not answered
            epochs = _epochs(self.c, self.name)
            newest = _newest(epochs)
            tags = epochs.get(newest, {})
            state = (newest, tags.get(HEARTBEAT))
            if state != seen:
                seen, seen_at = state, time.monotonic()
            free = newest == 0 or RELEASED in tags or read_at - seen_at >= self.stale_s
            if free and self._create(newest + 1):
                try:
                    if _newest(_epochs(self.c, self.name)) == self.epoch:
                        self._delete_older(epochs)
                        self._start_heartbeat()
                        return
                except BaseException:
                    self._give_up_own()  # created, then failed: leave no epoch that looks held by nobody
                    raise
                self._delete(self.model_name)  # stalled between reading and creating: a newer holder exists
            if time.monotonic() > deadline:
                raise LockBusy(f"{self.name}: another registration or promotion holds the champion lock "
                               f"({lock_prefix(self.name)}{newest}, owner {tags.get(OWNER, '?')}) after waiting "
                               f"{wait_s:g} s; try again later, or delete that registered model if its owner is gone")
            time.sleep(random.uniform(0.05, 0.25))

    def _create(self, epoch: int) -> bool:
        from mlflow.exceptions import MlflowException

        self.epoch = epoch
        sent = time.monotonic()
        try:  # tags in the create call itself: no moment where the lock exists without its owner
            self.c.create_registered_model(
                self.model_name, tags={OWNER: self.owner, HEARTBEAT: "0", INTERNAL: "true"},
                description=f"genpipe's champion lock for {self.name}; not a model")
        except MlflowException as exc:
            if not has_error_code(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
            if not self._owned():  # or the client retried a create whose answer was lost: then it is ours
                return False
        self._beat_sent = sent
        return True

    def _owned(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.c.get_registered_model(self.model_name).tags.get(OWNER) == self.owner
        except MlflowException as exc:
            if has_error_code(exc, "RESOURCE_DOES_NOT_EXIST"):  # deleted since by a newer holder
                return False
            raise

    def _give_up_own(self) -> None:
        """Release the epoch just created; if even that fails, it goes stale after `stale_s`."""
        with contextlib.suppress(Exception):  # the error that brought us here is the one to report
            self.release()

    def _delete_older(self, epochs: dict) -> None:
        for epoch in epochs:
            if epoch < self.epoch:
                self._delete(f"{lock_prefix(self.name)}{epoch}")

    def _delete(self, model_name: str) -> None:
        """Tidy away an epoch that is not the newest; a left one is harmless: the newest epoch decides."""
        from mlflow.exceptions import MlflowException

        try:
            self.c.delete_registered_model(model_name)
        except MlflowException as exc:  # PERMISSION_DENIED: another user's epoch under MLflow's basic auth
            if not has_error_code(exc, "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):
                raise

    def _start_heartbeat(self) -> None:
        from mlflow import MlflowClient

        beater = MlflowClient(tracking_uri=self.c.tracking_uri)  # its own client: the thread runs beside writes

        def beat():
            count = 0
            while not self._stop.wait(self.stale_s / 4):
                count += 1
                sent = time.monotonic()
                with contextlib.suppress(Exception):  # a missed beat shortens the lease, which check() sees
                    beater.set_registered_model_tag(self.model_name, HEARTBEAT, str(count))
                    self._beat_sent = sent

        self._beats = threading.Thread(target=beat, name=f"lock-heartbeat-{self.name}", daemon=True)
        self._beats.start()

    def check(self) -> None:
        """Before a write: raise LockLost unless this lock is still held, and for long enough to write.

        A waiter breaks the lock only after `stale_s` without a heartbeat landing: a write that lands
        within `stale_s` of the last heartbeat sent (and landed) is safe; this leaves it half of that."""
        beat_sent = self._beat_sent  # of a beat answered before the read below sees no newer epoch
        self._raise_if_taken_over("this process held")
        silent = time.monotonic() - beat_sent
        if silent > self.stale_s / 2:
            raise LockLost(f"{self.name}: no heartbeat of {self.model_name} has landed for {silent:.3g} s (the lock "
                           f"is presumed dead after {self.stale_s:g} s): the tracking server is not answering in "
                           f"time; nothing more is written; register again once it does")

    def confirm(self) -> None:
        """After a write: raise LockLost when another process took the lock before the write landed."""
        self._raise_if_taken_over("this process wrote under")

    def _raise_if_taken_over(self, doing: str) -> None:
        newest = _newest(_epochs(self.c, self.name))
        if newest != self.epoch:
            raise LockLost(f"{self.name}: the champion lock was taken over ({lock_prefix(self.name)}{newest}) while "
                           f"{doing} {self.model_name} (its requests were delayed past the {self.stale_s:g} s stale "
                           f"window); its last write may have raced another registration's: check "
                           f"`genpipe history {self.name}` and register again")

    def release(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join()
        from mlflow.exceptions import MlflowException

        try:
            self.c.set_registered_model_tag(self.model_name, RELEASED, "1")
        except MlflowException as exc:
            if not has_error_code(exc, "RESOURCE_DOES_NOT_EXIST"):  # deleted by a newer holder: nothing to release
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

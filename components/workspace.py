"""One retrain at a time per workspace, and the leftovers of killed runs swept at the next start.

The lock is an flock on a file under the state folder, so it ends with its process: a killed
retrain never leaves a lock behind that someone has to delete by hand.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from components.state import state_dir

LOCK_NAME = "retrain.lock"
POLL_SECONDS = 0.2

_held: dict[Path, list[int]] = {}  # lock path -> [fd, depth]: re-entrant within one process


class LockBusy(RuntimeError):
    """Another process holds the workspace lock; the message names the lock file and its PID."""


def lock_path() -> Path:
    return state_dir() / LOCK_NAME


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return f"PID {text}" if text.isdigit() else "PID unknown"


@contextlib.contextmanager
def retrain_lock(wait_seconds: float = 0) -> Iterator[Path]:
    """Hold the workspace's retrain lock; wait up to `wait_seconds` for it, then raise LockBusy.

    Re-entrant within a process, so the CLI and the flow it calls can both take it.
    """
    path = lock_path()
    if path in _held:
        _held[path][1] += 1
        try:
            yield path
        finally:
            _held[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's PID stays readable
    try:
        deadline, announced = time.monotonic() + wait_seconds, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"another retrain holds the workspace lock {path} ({_holder(fd)}); waited "
                        f"{wait_seconds:g} s. Let it finish, or pass --wait SECONDS to wait longer."
                    ) from None
                if not announced:
                    print(f"waiting up to {wait_seconds:g} s for the workspace lock {path} ({_holder(fd)})",
                          flush=True)
                    announced = True
                time.sleep(POLL_SECONDS)  # flock has no timeout: poll until the deadline
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[path] = [fd, 1]
        try:
            yield path
        finally:
            del _held[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the file releases the flock


def is_temp_of(name: str, target: str) -> bool:
    """Whether `name` is one of the temp names genpipe's writers make beside `target`: `.{target}.tmp`
    (params.yaml, grids), `.{target}.tmp-*` (staged folders, packed datasets, atomic file writes) and
    `.{target}.old-*` (a previous version moved aside by a swap). Nothing else, so an editor's swap
    file (`.params.yaml.swp`) or a user's `.last.pt.notes` is never swept."""
    base = f".{target}."
    return name == f"{base}tmp" or name.startswith((f"{base}tmp-", f"{base}old-"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file whole or not at all, through `.{name}.tmp` (a name is_temp_of knows)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sweep_stale(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the temp siblings that a killed run left next to each path; returns what went.

    Only genpipe's own temp names count (see is_temp_of). A `.{name}.old-*/data` folder holds the
    previous version that a swap moved aside; it is put back when the kill came before the new
    version was in place.
    Call only where no other writer of these paths can run (under the retrain lock or DVC's).
    """
    removed = []
    for target in map(Path, paths):
        if not target.parent.is_dir():
            continue
        for stale in sorted(p for p in target.parent.iterdir() if is_temp_of(p.name, target.name)):
            kept = stale / "data"
            if stale.name.startswith(f".{target.name}.old-") and kept.is_dir() and not target.exists():
                os.replace(kept, target)
                print(f"restored {target} from {stale}, left by an interrupted run")
            _remove(stale)
            removed.append(stale)
    return removed


def sweep_checkpoints() -> list[Path]:
    """Remove half-written checkpoint temp files (`.last.pt.tmp-*`, components.training.checkpoint)
    under the state folder."""
    removed = []
    for stale in sorted((state_dir() / "checkpoints").glob("*/.last.pt.tmp-*")):
        _remove(stale)
        removed.append(stale)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

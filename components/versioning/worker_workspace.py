"""A worker's own workspace for one model: a git checkout of the project at the commit the retrain
run started from, with that run's params.yaml and dvc.lock, and its DVC remote (name and URL only:
endpoint and credentials are each machine's own, in its environment or its global DVC config).

The workspace stays between runs, so DVC's cache and the model's checkpoint survive a failed run
and the next one resumes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from components.config import PARAMS_FILE
from components.versioning.dvc_pipeline import LOCK_FILE
from components.workspace import write_text_atomic


class WorkspaceError(RuntimeError):
    """The code or configuration a worker needs could not be put in place; the message says which."""


def git(*args: str, cwd: str | Path | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def head_commit(root: str | Path) -> str:
    """The commit workers check out; refused while tracked code differs from it, since workers would
    run other code than this checkout. params.yaml and dvc.lock travel with the job instead."""
    try:
        commit = git("rev-parse", "--verify", "HEAD^{commit}", cwd=root)
    except WorkspaceError:
        raise WorkspaceError(f"{root}: no git commit yet; workers check out a commit, so commit the project first") from None
    changed = [path for path in changed_files(root) if path not in (PARAMS_FILE, LOCK_FILE)]
    if changed:
        raise WorkspaceError(f"{root}: uncommitted changes to {', '.join(changed)}; workers check out commit "
                             f"{commit[:12]} and would run other code: commit or stash them first")
    return commit


def changed_files(root: str | Path) -> list[str]:
    """Tracked files that differ from HEAD, staged or not, and files git would add (untracked, not ignored)."""
    out = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    entries = out.split("\0")
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        if entry:
            paths.append(entry[3:])
            i += entry[0] in "RC"  # a rename or copy: the next entry is its old path
        i += 1
    return paths


def prepare(workspace: Path, source: str, commit: str, params_text: str, lock_text: str | None,
            remote: dict[str, str] | None) -> Path:
    """Clone (first time) or update the workspace to `commit` of `source`, then write the run's
    params.yaml, dvc.lock and DVC remote (None: as configured). Untracked leftovers go; ignored outputs
    and .dvc/cache stay."""
    if not (workspace / ".git").is_dir():
        workspace.parent.mkdir(parents=True, exist_ok=True)
        staging = workspace.with_name(f".{workspace.name}.tmp-clone")
        shutil.rmtree(staging, ignore_errors=True)  # a clone interrupted before the rename below
        git("clone", "--quiet", "--no-checkout", source, str(staging))
        os.replace(staging, workspace)
    else:
        git("remote", "set-url", "origin", source, cwd=workspace)
        git("fetch", "--quiet", "origin", cwd=workspace)
    if not _has_commit(workspace, commit):  # on no branch (a detached HEAD): ask for it by name
        try:
            git("fetch", "--quiet", "origin", commit, cwd=workspace)
        except WorkspaceError:
            pass  # reported below as not in the source
    try:
        git("checkout", "--quiet", "--force", "--detach", commit, cwd=workspace)
    except WorkspaceError as exc:
        raise WorkspaceError(f"commit {commit[:12]} is not in {source}: push it where workers clone from ({exc})") from None
    git("clean", "-fdq", cwd=workspace)
    write_text_atomic(workspace / PARAMS_FILE, params_text)
    if lock_text is None:
        (workspace / LOCK_FILE).unlink(missing_ok=True)
    else:
        write_text_atomic(workspace / LOCK_FILE, lock_text)
    if remote is not None:
        write_text_atomic(workspace / ".dvc" / "config.local", _remote_config(remote))
    return workspace


def persistent_copy(clone: Path, workspace: Path) -> Path:
    """Where a deployment's run from a git source works. Prefect's worker clones the source afresh for
    every run and throws the clone away; the commit, source and params come from that clone, while
    dvc.lock, DVC's cache and the outputs stay in `workspace` from one run to the next, so unchanged
    stages are skipped as in a checkout."""
    lock = workspace / LOCK_FILE
    return prepare(workspace, git("remote", "get-url", "origin", cwd=clone), git("rev-parse", "HEAD", cwd=clone),
                   (clone / PARAMS_FILE).read_text(), lock.read_text() if lock.exists() else None, remote=None)


def _has_commit(workspace: Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=workspace,
                          capture_output=True).returncode == 0


def _remote_config(remote: dict[str, str]) -> str:
    name = remote["name"]
    lines = ["[core]", f"    remote = {name}", f"['remote \"{name}\"']"]
    lines += [f"    {key} = {value}" for key, value in remote.items() if key != "name"]
    return "\n".join(lines) + "\n"

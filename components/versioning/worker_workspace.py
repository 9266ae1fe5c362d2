"""A worker's own workspace for one model: a git checkout of the project at the commit the retrain
run started from, with that run's params.yaml and dvc.lock, and its DVC remote (without
credentials: each machine keeps its own, in the environment or its own --local config).

The workspace stays between runs, so DVC's cache and the model's checkpoint survive a failed run
and the next one resumes.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from components.versioning.dvc_pipeline import LOCK_FILE

PARAMS_FILE = "params.yaml"


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
    changed = git("diff", "--name-only", "HEAD", cwd=root).splitlines()  # tracked files, staged or not
    changed = [path for path in changed if path not in (PARAMS_FILE, LOCK_FILE)]
    if changed:
        raise WorkspaceError(f"{root}: uncommitted changes to {', '.join(changed)}; workers check out commit "
                             f"{commit[:12]} and would run other code: commit or stash them first")
    return commit


def prepare(workspace: Path, source: str, commit: str, params_text: str, lock_text: str | None,
            remote: dict[str, str]) -> Path:
    """Clone (first time) or update the workspace to `commit` of `source`, then write the run's
    params.yaml, dvc.lock and DVC remote. Untracked leftovers go; ignored outputs and .dvc/cache stay."""
    if not (workspace / ".git").is_dir():
        workspace.parent.mkdir(parents=True, exist_ok=True)
        staging = workspace.with_name(f".{workspace.name}.tmp-clone")
        if staging.exists():
            git("clean", "-ffdxq", cwd=staging)  # a clone interrupted before the rename below
        else:
            git("clone", "--quiet", "--no-checkout", source, str(staging))
        os.replace(staging, workspace)
    else:
        git("remote", "set-url", "origin", source, cwd=workspace)
        git("fetch", "--quiet", "origin", cwd=workspace)
    try:
        git("checkout", "--quiet", "--force", "--detach", commit, cwd=workspace)
    except WorkspaceError as exc:
        raise WorkspaceError(f"commit {commit[:12]} is not in {source}: push it where workers clone from ({exc})") from None
    git("clean", "-fdq", cwd=workspace)
    _write(workspace / PARAMS_FILE, params_text)
    if lock_text is None:
        (workspace / LOCK_FILE).unlink(missing_ok=True)
    else:
        _write(workspace / LOCK_FILE, lock_text)
    _write(workspace / ".dvc" / "config.local", _remote_config(remote))
    return workspace


def _remote_config(remote: dict[str, str]) -> str:
    name = remote["name"]
    lines = ["[core]", f"    remote = {name}", f"['remote \"{name}\"']"]
    lines += [f"    {key} = {value}" for key, value in remote.items() if key != "name"]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

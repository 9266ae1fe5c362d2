"""Thin helpers over DVC's Python API. dvc.yaml is the DAG; these read it, never restate it."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from components.workspace import write_text_atomic

LOCK_FILE = "dvc.lock"
EMBEDDED_REMOTE = "local"  # .dvc/config's default remote: a folder under the state folder
ENV_REMOTE = "genpipe"  # the remote GENPIPE_DVC_REMOTE names


def open_repo(root: str | Path = "."):
    """The DVC repo at root. GENPIPE_DVC_REMOTE (a URL) becomes its default remote: configuration a
    fresh clone sees, as a deployment's run from a git source is. Otherwise the embedded remote (`local`,
    `.genpipe/dvc-remote` in .dvc/config) moves to $GENPIPE_HOME/dvc-remote, following the state folder."""
    import os

    from dvc.repo import Repo

    from components.state import state_dir

    url = os.environ.get("GENPIPE_DVC_REMOTE", "").strip()
    override = {"core": {"remote": ENV_REMOTE}, "remote": {ENV_REMOTE: {"url": url}}} if url else None
    repo = Repo(str(root), config=override)
    repo.scm_context.quiet = True  # no "git add dvc.lock" hints in every task's log
    embedded = repo.config["remote"].get(EMBEDDED_REMOTE)
    if embedded and Path(embedded["url"]).resolve() == (Path(repo.root_dir) / ".genpipe" / "dvc-remote").resolve():
        embedded["url"] = str(state_dir() / "dvc-remote")
    return repo


def remote_settings(repo) -> dict[str, str]:
    """The default remote's name and URL, for a worker to use the same remote. Nothing else travels:
    the endpoint, region and credentials are the worker's own (AWS_ENDPOINT_URL, AWS_* or its own
    --local config), since a host name that works here may not inside a container or cluster."""
    name = repo.config["core"].get("remote")
    if not name:
        raise RuntimeError("no default DVC remote: add one with `dvc remote add -d --local NAME s3://bucket/path`")
    return {"name": name, "url": str(repo.config["remote"][name]["url"])}


def stage_order(repo) -> list[str]:
    """Every pipeline stage's address (e.g. 'train@vae'), each after the stages it depends on."""
    return list(stage_needs(repo))


def stage_needs(repo) -> dict[str, list[str]]:
    """Each stage's address (in run order) → the addresses of the stages whose outputs it reads."""
    import networkx as nx

    graph = repo.index.graph
    return {stage.addressing: sorted(dep.addressing for dep in graph.successors(stage) if dep.cmd)
            for stage in reversed(list(nx.topological_sort(graph))) if stage.cmd}


def model_stages(needs: dict[str, list[str]], model: str) -> list[str]:
    """A model's own stages (`train@vae`, `evaluate@vae`, ...) in run order, from stage_needs()."""
    return [a for a in needs if a.partition("@")[2] == model]


def inputs_of(needs: dict[str, list[str]], stages: list[str]) -> list[str]:
    """The stages whose outputs `stages` read, other than themselves (ingest, classifier, another model's train)."""
    return sorted({n for a in stages for n in needs[a]} - set(stages))


def reproduce_stage(repo, addressing: str, pull: bool = False) -> bool:
    """Run one stage if DVC sees a change in its deps, params or outs; True when it ran. pull: an
    identical run in the remote's run cache is restored (its outputs fetched) instead of run again.

    DVC deletes a stage's outs before running it; if the command fails, the outs of the last
    good run are checked out of the cache again (uncached metric files from a copy taken here),
    so a failed stage leaves the workspace as it was.
    """
    stage = next(s for s in repo.index.stages if s.addressing == addressing)
    uncached = {Path(o.fs_path): Path(o.fs_path).read_bytes()
                for o in stage.outs if not o.use_cache and Path(o.fs_path).is_file()}
    try:
        return bool(repo.reproduce(addressing, single_item=True, pull=pull))
    except Exception:
        try:
            repo.checkout(targets=[addressing], force=True)
        except Exception as restore_error:  # nothing committed yet: nothing to restore
            print(f"could not restore the previous outputs of {addressing}: {restore_error}")
        for path, content in uncached.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        raise


def output_paths(repo) -> list[Path]:
    """Every stage's declared outputs (cached outs and metric files)."""
    return [Path(out.fs_path) for stage in repo.index.stages if stage.cmd for out in stage.outs]


@contextmanager
def workspace_locked(repo) -> Iterator[None]:
    """Hold DVC's own workspace lock (the one `dvc repro` takes) for a block."""
    from dvc.repo import lock_repo

    with lock_repo(repo):
        yield


def remote_url(repo) -> str:
    """The default remote's URL, any password in it masked, or '' without a remote."""
    from components.state import redact_uri

    name = repo.config["core"].get("remote")
    return redact_uri(str(repo.config["remote"][name]["url"])) if name else ""


def push(repo, targets: list[str] | None = None, run_cache: bool = False) -> int:
    """Push cached outputs (of the target stages, or all) to the default remote; returns the number of
    files sent. run_cache: DVC's run cache too, so another workspace can restore an identical run."""
    return repo.push(targets=targets, run_cache=run_cache)


def pull(repo, targets: list[str], allow_missing: bool = False) -> None:
    """Fetch the target stages' outputs from the default remote and check them out; allow_missing:
    outputs the remote does not have are no error."""
    repo.pull(targets=targets, allow_missing=allow_missing)


def is_current(repo, addressing: str) -> bool:
    """Whether the stage's outputs are in place and match dvc.lock for today's deps and params."""
    return not repo.status(targets=[addressing])


def lock_entries(root: str | Path, addressings: list[str]) -> dict[str, dict]:
    """The stages' entries of dvc.lock, as DVC wrote them."""
    lock = yaml.safe_load((Path(root) / LOCK_FILE).read_text())
    return {a: lock["stages"][a] for a in addressings}


def lock_text(repo) -> str | None:
    path = Path(repo.root_dir) / LOCK_FILE
    return path.read_text() if path.exists() else None


def restore_lock_text(repo, text: str | None) -> None:
    """Put dvc.lock back as lock_text() read it (None: there was none)."""
    path = Path(repo.root_dir) / LOCK_FILE
    with workspace_locked(repo):
        if text is None:
            path.unlink(missing_ok=True)
        else:
            write_text_atomic(path, text)


def merge_lock_entries(repo, entries: dict[str, dict]) -> None:
    """Put stage entries that another workspace produced into this workspace's dvc.lock, atomically,
    under DVC's workspace lock; the other stages' entries stay as they are."""
    from dvc.utils.serialize import dumps_yaml

    path = Path(repo.root_dir) / LOCK_FILE
    with workspace_locked(repo):
        lock = yaml.safe_load(path.read_text()) if path.exists() else {"schema": "2.0", "stages": {}}
        lock["stages"].update(entries)
        write_text_atomic(path, dumps_yaml(lock))


def stage_paths(repo, addressing: str) -> dict[str, Path]:
    """Paths of a stage's outputs keyed by role: 'out' for cached outs, 'metrics' for metric files."""
    stage = next(s for s in repo.index.stages if s.addressing == addressing)
    paths: dict[str, Path] = {}
    for out in stage.outs:
        role = "metrics" if out.metric else "out"
        paths.setdefault(role, Path(out.fs_path))
    return paths


def locked_md5(root: str | Path, addressing: str, path: str | Path) -> str:
    """The hash dvc.lock records for one output of a stage (a folder's hash ends in '.dir')."""
    lock = yaml.safe_load((Path(root) / LOCK_FILE).read_text())
    rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    for out in lock["stages"][addressing]["outs"]:
        if out["path"] == rel:
            return out["md5"]
    raise KeyError(f"{LOCK_FILE}: no output {rel} for stage {addressing}; run the pipeline first")

"""What killed runs leave behind is swept at the next start; `make clean` keeps the DVC remote."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import apply_overrides, read_params_raw, write_params_raw
from components.workspace import retrain_lock, sweep_checkpoints, sweep_stale
from fashion import needs_fashion_mnist

REPO = Path(__file__).resolve().parents[1]


def test_sweep_removes_temp_siblings_and_keeps_everything_else(tmp_path):
    out = tmp_path / "models" / "vae"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"good")
    leftovers = [tmp_path / "models" / ".vae.tmp-k1", tmp_path / "models" / ".vae.old-k2", tmp_path / ".params.yaml.tmp"]
    for folder in leftovers[:2]:
        (folder / "data").mkdir(parents=True)
    leftovers[2].write_text("half")
    others = [tmp_path / "models" / "vae2", tmp_path / "models" / ".vae2.tmp-x", tmp_path / "models" / ".vaex"]
    for path in others:
        path.mkdir()

    removed = sweep_stale([out, tmp_path / "params.yaml", tmp_path / "missing" / "x"])

    assert sorted(removed) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in others)
    assert (out / "model.safetensors").read_bytes() == b"good", "a finished output is never touched"


def test_sweep_removes_only_genpipes_own_temp_names(tmp_path, monkeypatch):
    # An editor's live swap file beside params.yaml and a user's notes beside a checkpoint look like
    # `.{name}.*` but are no temp file of genpipe's: sweeping them would lose the user's work.
    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / ".genpipe"))
    folder = tmp_path / ".genpipe" / "checkpoints" / "fashion-mnist-vae"
    folder.mkdir(parents=True)
    kept = [tmp_path / ".params.yaml.swp", tmp_path / ".params.yaml.swx", tmp_path / ".params.yaml.tmpl",
            folder / ".last.pt.notes", folder / "last.pt", folder / "last.pt.corrupt-20240101T000000.000000Z"]
    for path in kept:
        path.write_text("mine")
    temp = [tmp_path / ".params.yaml.tmp", tmp_path / ".metrics.json.tmp-a1b2", folder / ".last.pt.tmp-x9y8"]
    for path in temp:
        path.write_text("half")

    removed = sweep_stale([tmp_path / "params.yaml", tmp_path / "metrics.json"]) + sweep_checkpoints()

    assert sorted(removed) == sorted(temp)
    assert all(p.read_text() == "mine" for p in kept)


def test_sweep_puts_back_an_output_moved_aside_by_a_run_killed_before_the_new_one_was_in(tmp_path):
    aside = tmp_path / ".dataset.old-k1" / "data"
    aside.mkdir(parents=True)
    (aside / "manifest.json").write_text("{}")
    (tmp_path / ".dataset.tmp-k2").mkdir()

    sweep_stale([tmp_path / "dataset"])

    assert (tmp_path / "dataset" / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


# Runs a stage command and SIGKILLs it at the moment a staged folder is about to replace `--out`
# (the previous output is already moved aside): the worst place for a kill.
KILLED_AT_SWAP = """
import os, pathlib, signal, sys
real_replace = os.replace
def replace(src, dst):
    if ".tmp-" in pathlib.Path(src).name and pathlib.Path(dst).name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
from flows.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@needs_fashion_mnist
def test_a_stage_command_sweeps_what_its_killed_run_left(tmp_path):
    raw = apply_overrides(read_params_raw(REPO / "params.yaml"),
                          ["data.limit_per_split=64", "classifier.epochs=1", "classifier.batch_size=32"])
    write_params_raw(raw, tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENPIPE_HOME": str(tmp_path / ".genpipe"), "GENPIPE_DEVICE": "cpu"}
    classifier = ["classifier", "--data", "artifacts/dataset", "--out", "artifacts/classifier",
                  "--metrics", "artifacts/metrics/classifier.json"]

    def run(*args: str, prefix: tuple[str, ...] = ("-m", "flows.cli")) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *prefix, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    for args in (["ingest", "--out", "artifacts/dataset", "--metrics", "artifacts/metrics/ingest.json"], classifier):
        assert run(*args).returncode == 0
    weights = (tmp_path / "artifacts" / "classifier" / "classifier.safetensors").read_bytes()

    killed = run("classifier", *classifier, prefix=("-c", KILLED_AT_SWAP))
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "artifacts").glob(".classifier.*"))
    assert left == [".classifier.old", ".classifier.tmp"] and not (tmp_path / "artifacts" / "classifier").exists()

    # The next start of the stage command sweeps before anything else (here it then fails on its input).
    again = run(*classifier[:2], "artifacts/no-such-dataset", *classifier[3:])
    assert again.returncode == 2 and "no packed dataset" in again.stderr, again.stderr[-2000:]
    assert not list((tmp_path / "artifacts").glob(".classifier.*"))
    assert (tmp_path / "artifacts" / "classifier" / "classifier.safetensors").read_bytes() == weights


def test_make_clean_keeps_the_dvc_remote_and_waits_for_no_one(tmp_path, monkeypatch):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    remote = tmp_path / ".genpipe" / "dvc-remote" / "files" / "md5" / "ab" / "cdef"
    remote.parent.mkdir(parents=True)
    remote.write_bytes(b"pushed data")
    state = [tmp_path / ".genpipe" / "mlflow" / "mlflow.db", tmp_path / ".genpipe" / "checkpoints" / "m" / "last.pt",
             tmp_path / "artifacts" / "dataset" / "manifest.json", tmp_path / "dvc.lock"]
    for path in state:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")

    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / ".genpipe"))
    with retrain_lock():  # a retrain is running: clean refuses and removes nothing
        busy = subprocess.run(["make", "-s", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert busy.returncode != 0 and "a retrain is running" in busy.stdout + busy.stderr
    assert all(p.exists() for p in state)

    done = subprocess.run(["make", "-s", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert remote.read_bytes() == b"pushed data"
    assert not any(p.exists() for p in state)
    assert sorted(p.name for p in (tmp_path / ".genpipe").iterdir()) == ["dvc-remote"]


# Stands in for `rm` (make clean's find -exec rm and rm): notes every call made while the workspace
# lock is free, i.e. while a retrain could start and write into what is being removed.
RM_SHIM = """#!/bin/sh
if ! [ -e .genpipe/retrain.lock ] || flock -n .genpipe/retrain.lock true; then
  echo "unlocked: $*" >> "$RM_LOG"
fi
exec {rm} "$@"
"""


def test_make_clean_removes_everything_while_holding_the_lock(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for path in [tmp_path / ".genpipe" / "mlflow" / "mlflow.db", tmp_path / ".genpipe" / "retrain.lock",
                 tmp_path / ".genpipe" / "dvc-remote" / "x", tmp_path / "artifacts" / "dataset" / "manifest.json",
                 tmp_path / "dvc.lock"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "rm").write_text(RM_SHIM.format(rm=shutil.which("rm")))
    (shims / "rm").chmod(0o755)
    log = tmp_path / "rm.log"
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "RM_LOG": str(log)}

    done = subprocess.run(["make", "-s", "clean"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / ".genpipe").iterdir()) == ["dvc-remote"]
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "dvc.lock").exists()
    assert not log.exists(), f"removed without holding .genpipe/retrain.lock:\n{log.read_text()}"

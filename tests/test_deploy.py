"""params.yaml's deploy section and what workers are handed: errors name the key, a dirty checkout is
refused only for code, lock entries merge into dvc.lock without touching the others."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, read_params_raw
from components.params import parse_params
from components.versioning.worker_workspace import WorkspaceError, head_commit, prepare

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def deploy_with(**changes):
    raw = read_params_raw(PARAMS)
    raw["deploy"].update(changes)
    return parse_params(raw).deploy


def test_shipped_deploy_section_trains_in_process():
    cfg = deploy_with()
    assert cfg.training_pool is None and cfg.source == "."


@pytest.mark.parametrize("key, value, message", [
    ("timezone", "Mars/Olympus", "deploy.timezone: unknown time zone"),
    ("cron", "every monday", "deploy.cron: must match"),
    ("model_timeout_s", 0, "deploy.model_timeout_s: must be > 0"),
    ("training_pool", "", "deploy.training_pool"),
])
def test_bad_deploy_values_name_their_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        deploy_with(**{key: value})


def test_a_cron_prefect_cannot_parse_is_refused_naming_the_key():
    from flows.deploy import schedule

    with pytest.raises(ConfigError, match=r"deploy\.cron: .*'61 3 \* \* 1'"):
        schedule(deploy_with(cron="61 3 * * 1"))
    assert schedule(deploy_with(timezone="Europe/Berlin")).timezone == "Europe/Berlin"


def test_deploy_without_a_prefect_server_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    for name in ["params.yaml", "dvc.yaml"]:
        (tmp_path / name).write_bytes((PARAMS.parent / name).read_bytes())
    result = subprocess.run([str(Path(sys.executable).parent / "genpipe"), "deploy"], cwd=tmp_path, text=True,
                            capture_output=True, env={**env, "GENPIPE_HOME": str(tmp_path / ".genpipe")}, timeout=120)
    assert result.returncode == 2 and "set PREFECT_API_URL" in result.stderr, result.stderr


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    (root / "components").mkdir(parents=True)
    (root / "components" / "code.py").write_text("x = 1\n")
    (root / "params.yaml").write_text("a: 1\n")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root


def test_workers_get_the_commit_while_only_params_and_lock_differ(project):
    (project / "params.yaml").write_text("a: 2\n")
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {x: {}}\n")
    assert head_commit(project) == git(project, "rev-parse", "HEAD")
    (project / "components" / "new_module.py").write_text("y = 1\n")  # untracked: workers would lack it
    with pytest.raises(WorkspaceError, match="uncommitted changes to components/new_module.py; workers check out"):
        head_commit(project)
    (project / "components" / "new_module.py").unlink()
    (project / "components" / "code.py").write_text("x = 2\n")
    with pytest.raises(WorkspaceError, match="uncommitted changes to components/code.py; workers check out"):
        head_commit(project)


def test_a_worker_workspace_follows_the_commit_and_takes_the_runs_files(project, tmp_path):
    first = git(project, "rev-parse", "HEAD")
    workspace = tmp_path / "worker" / "workspaces" / "vae"
    remote = {"name": "storage", "url": "s3://bucket/dvc"}
    prepare(workspace, str(project), first, "a: 5\n", "schema: '2.0'\nstages: {}\n", remote)
    (workspace / "stray.txt").write_text("left by a killed run")
    (project / "components" / "code.py").write_text("x = 3\n")
    git(project, "commit", "-qam", "second")
    second = git(project, "rev-parse", "HEAD")

    prepare(workspace, str(project), second, "a: 6\n", None, remote)
    assert git(workspace, "rev-parse", "HEAD") == second
    assert (workspace / "components" / "code.py").read_text() == "x = 3\n"
    assert (workspace / "params.yaml").read_text() == "a: 6\n"
    assert not (workspace / "dvc.lock").exists() and not (workspace / "stray.txt").exists()
    assert 'url = s3://bucket/dvc' in (workspace / ".dvc" / "config.local").read_text()
    with pytest.raises(WorkspaceError, match="is not in"):
        prepare(workspace, str(project), "0" * 40, "a: 6\n", None, remote)


def test_a_run_from_a_fresh_clone_keeps_its_dvc_state_in_one_lasting_workspace(project, tmp_path):
    """Prefect clones a git source afresh for every run of the retrain deployment; the run works in
    a lasting workspace at the clone's commit, whose dvc.lock (and outputs) outlive the clone."""
    from components.versioning.worker_workspace import persistent_copy

    lasting = tmp_path / "home" / "workspaces" / "retrain"
    first_clone = tmp_path / "clone-1"
    git(tmp_path, "clone", "-q", str(project), str(first_clone))
    persistent_copy(first_clone, lasting)
    (lasting / "dvc.lock").write_text("schema: '2.0'\nstages: {ingest: {cmd: run-1}}\n")  # what the run wrote
    (project / "params.yaml").write_text("a: 7\n")
    git(project, "commit", "-qam", "params changed")
    second_clone = tmp_path / "clone-2"
    git(tmp_path, "clone", "-q", str(project), str(second_clone))

    persistent_copy(second_clone, lasting)
    assert git(lasting, "rev-parse", "HEAD") == git(project, "rev-parse", "HEAD")
    assert (lasting / "params.yaml").read_text() == "a: 7\n"
    assert "run-1" in (lasting / "dvc.lock").read_text()


def test_genpipe_dvc_remote_is_the_default_remote(tmp_path, monkeypatch):
    from components.versioning.dvc_pipeline import open_repo, remote_settings

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.setenv("GENPIPE_DVC_REMOTE", "s3://team-bucket/dvc")
    assert remote_settings(open_repo(tmp_path)) == {"name": "genpipe", "url": "s3://team-bucket/dvc"}


def test_merged_lock_entries_replace_only_their_stages(tmp_path):
    from components.versioning.dvc_pipeline import merge_lock_entries, open_repo

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    lock = {"schema": "2.0", "stages": {"ingest": {"cmd": "a"}, "train@vae": {"cmd": "old"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    merge_lock_entries(open_repo(tmp_path), {"train@vae": {"cmd": "new"}, "evaluate@vae": {"cmd": "e"}})
    merged = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert merged["stages"] == {"ingest": {"cmd": "a"}, "train@vae": {"cmd": "new"}, "evaluate@vae": {"cmd": "e"}}


@pytest.mark.slow
def test_serve_runs_the_schedule_in_one_process(tmp_path):
    """`genpipe serve` registers the retrain schedule (deploy.cron, deploy.timezone) and polls for its
    runs itself: no work pool, no worker."""
    import signal
    import time

    from servers import clean_env, prefect_server

    project = tmp_path / "project"
    project.mkdir()
    for name in ["params.yaml", "dvc.yaml"]:
        (project / name).write_bytes((PARAMS.parent / name).read_bytes())
    with prefect_server(tmp_path) as api:
        env = clean_env(PREFECT_API_URL=api, GENPIPE_HOME=str(project / ".genpipe"),
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        serve = subprocess.Popen([str(Path(sys.executable).parent / "genpipe"), "serve"], cwd=project, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            from prefect.client.orchestration import get_client
            from prefect.exceptions import ObjectNotFound
            from prefect.settings import PREFECT_API_URL, temporary_settings

            deadline, deployment = time.monotonic() + 120, None
            with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                while deployment is None and time.monotonic() < deadline and serve.poll() is None:
                    try:
                        deployment = client.read_deployment_by_name("retrain/retrain")
                    except ObjectNotFound:
                        time.sleep(0.5)
            assert deployment is not None, serve.stdout.read() if serve.poll() is not None else "no deployment"
            assert deployment.work_pool_name is None  # served by this process, not by a pool's worker
            [schedule] = deployment.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * 1", "UTC")
        finally:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)


def test_a_models_stages_and_their_inputs_come_from_the_dag():
    from components.versioning.dvc_pipeline import inputs_of, model_stages

    needs = {"ingest": [], "classifier": ["ingest"], "train@ae": ["classifier", "ingest"],
             "evaluate@ae": ["classifier", "ingest", "train@ae"], "train@ldm": ["ingest", "train@ae"],
             "evaluate@ldm": ["classifier", "ingest", "train@ldm"]}
    assert model_stages(needs, "ldm") == ["train@ldm", "evaluate@ldm"]
    assert inputs_of(needs, model_stages(needs, "ldm")) == ["classifier", "ingest", "train@ae"]

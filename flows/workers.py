"""The `train-model` flow: one model's stages (train@NAME, evaluate@NAME, or train_latent@NAME and
evaluate_latent@NAME: what dvc.yaml gives it) on a
worker, in the worker's own workspace at the retrain run's commit. Inputs come from the DVC remote,
outputs go back to it, and the stages' dvc.lock entries are handed back as this flow run's `dvc-lock-NAME` artifact, which
the retrain run merges into its own dvc.lock."""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.policies import IO_RETRIES, training_slot
from flows.runtime import prepare_process

HANDBACK_FENCE = "```yaml"
def handback_key(model: str) -> str:
    return f"dvc-lock-{model.replace('_', '-')}"  # artifact keys: lowercase letters, digits, dashes


@task(cache_policy=NONE, **IO_RETRIES)
def check_out(model: str, job: dict) -> Path:
    """The worker's workspace for this model at the run's commit, with its params, lock and remote."""
    from components.state import state_dir
    from components.versioning.worker_workspace import prepare

    workspace = prepare(state_dir() / "workspaces" / model, job["source"], job["commit"], job["params_yaml"],
                        job["dvc_lock"], job["remote"])
    get_run_logger().info("workspace %s at commit %s", workspace, job["commit"][:12])
    return workspace


@task(cache_policy=NONE, **IO_RETRIES)
def pull_inputs(workspace: Path, inputs: list[str], stages: list[str]) -> None:
    """The outputs of the stages the model's stages read, and the model's own as the retrain's dvc.lock
    names them, where the remote has them: an unchanged train@ is then not redone on a fresh worker."""
    from components.versioning import dvc_pipeline as dvc

    dvc.pull(dvc.open_repo(workspace), inputs)
    dvc.pull(dvc.open_repo(workspace), stages, allow_missing=True)


@task(cache_policy=NONE, task_run_name="{addressing}")  # no retries: training resumes from its checkpoint instead
def reproduce(workspace: Path, addressing: str) -> bool:
    from components.versioning import dvc_pipeline as dvc

    # pull: a run identical to one another worker pushed (say, while this one waited for the model's
    # slot) is restored from the remote's run cache instead of trained again
    ran = dvc.reproduce_stage(dvc.open_repo(workspace), addressing, pull=True)
    get_run_logger().info("%s: %s", addressing, "ran" if ran else "unchanged, skipped")
    return ran


@task(cache_policy=NONE, **IO_RETRIES)
def push_outputs(workspace: Path, stages: list[str]) -> int:
    from components.versioning import dvc_pipeline as dvc

    return dvc.push(dvc.open_repo(workspace), stages, run_cache=True)


@flow(name="train-model", log_prints=True)
def train_model(model: str, job: dict) -> dict:
    """Train and evaluate one model at the retrain run's commit; returns and hands back its lock entries.

    job: source (git URL or folder to clone), commit, params_yaml, dvc_lock (texts of the retrain
    run's files) and remote (its default DVC remote, without credentials)."""
    import yaml

    from components.config import registered_name
    from components.versioning import dvc_pipeline as dvc

    prepare_process()
    registered = registered_name(yaml.safe_load(job["params_yaml"])["data"]["name"], model)
    with training_slot(registered):
        workspace = check_out(model, job)
        os.chdir(workspace)  # DVC names stages relative to the working directory; this run's own process
        os.environ["PYTHONPATH"] = str(workspace)  # stage commands import the checked-out code
        needs = dvc.stage_needs(dvc.open_repo(workspace))  # dvc.yaml says which stages are the model's
        stages = dvc.model_stages(needs, model)
        pull_inputs(workspace, dvc.inputs_of(needs, stages), stages)
        for addressing in stages:
            reproduce(workspace, addressing)
        pushed = push_outputs(workspace, stages)
        entries = dvc.lock_entries(workspace, stages)
    get_run_logger().info("%s: %d file(s) pushed; handing back the dvc.lock entries of %s",
                          model, pushed, ", ".join(stages))
    publish_handback(model, entries)
    return entries


def publish_handback(model: str, entries: dict) -> None:
    """The stages' lock entries as a markdown artifact of this flow run: readable in the UI, and
    read back by the retrain run (artifacts live on the Prefect server, which both can reach)."""
    import yaml
    from prefect.artifacts import create_markdown_artifact

    text = yaml.safe_dump(entries, sort_keys=False)
    create_markdown_artifact(key=handback_key(model), description=f"dvc.lock entries of {model}'s stages",
                             markdown=f"dvc.lock entries of `{model}`, merged by the retrain run:\n\n"
                                      f"{HANDBACK_FENCE}\n{text}```\n")


def read_handback(markdown: str) -> dict:
    import yaml

    start = markdown.index(HANDBACK_FENCE) + len(HANDBACK_FENCE)
    return yaml.safe_load(markdown[start:markdown.rindex("```")])

"""`genpipe deploy` and `genpipe serve`: the retrain flow on params.yaml's `deploy` schedule.

deploy: Prefect deployments on work pools (idempotent: a second call updates them in place), for a
Prefect server and its workers. serve: the same schedule run by this one long-lived process.
"""
from __future__ import annotations

from pathlib import Path

from components.config import ConfigError, DeployConfig

RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain"
TRAIN_MODEL_ENTRYPOINT = "flows/workers.py:train_model"
DEPLOYMENT_NAMES = {"retrain": "retrain", "train-model": "train-model"}  # flow name -> deployment name


def schedule(cfg: DeployConfig):
    """The Prefect schedule of deploy.cron in deploy.timezone, checked by Prefect's own parser."""
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron

    try:
        CronSchedule(cron=cfg.cron, timezone=cfg.timezone)
    except ValidationError as exc:
        raise ConfigError(f"deploy.cron: {exc.errors()[0]['msg']}, got {cfg.cron!r}") from None
    return Cron(cfg.cron, timezone=cfg.timezone)


def one_at_a_time():
    """A second retrain of the deployment waits in the queue until the running one ends."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deploy(cfg: DeployConfig, root: Path) -> list[str]:
    """Create or update the retrain deployment (and train-model, with a training pool); returns
    one line per thing done, for the user."""
    from prefect import Flow
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ConfigError("deploy: no Prefect server; set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) so "
                          "that workers can find the deployments, or use `genpipe serve` on a single host")
    source = str(root.resolve()) if cfg.source == "." else cfg.source
    done = [ensure_pool(cfg.work_pool)]
    Flow.from_source(source=source, entrypoint=RETRAIN_ENTRYPOINT).deploy(
        name=DEPLOYMENT_NAMES["retrain"], work_pool_name=cfg.work_pool, schedules=[schedule(cfg)],
        concurrency_limit=one_at_a_time(), build=False, push=False, print_next_steps=False,
        parameters={"persistent_workspace": cfg.source != "."},  # a git source: each run starts in a fresh clone
        description="ingest → classifier → train → evaluate → register, as DVC decides")
    done.append(f"deployment retrain/retrain on pool {cfg.work_pool}: cron {cfg.cron!r} ({cfg.timezone}), "
                f"code from {source}")
    if cfg.training_pool:
        done.append(ensure_pool(cfg.training_pool))
        Flow.from_source(source=source, entrypoint=TRAIN_MODEL_ENTRYPOINT).deploy(
            name=DEPLOYMENT_NAMES["train-model"], work_pool_name=cfg.training_pool, build=False, push=False,
            print_next_steps=False, description="one model's train@NAME + evaluate@NAME in a worker's workspace")
        done.append(f"deployment train-model/train-model on pool {cfg.training_pool}: started by retrain, one run per model")
    done.append(registry_webhook())
    return done


def registry_webhook() -> str:
    """With GENPIPE_WEBHOOK_URL and an MLflow tracking server: the server's own registry webhook for
    `model_version_alias.created` to the same receiver, signed with the same secret. genpipe's messages
    (decision, metrics, failures) still go there too; MLflow's cover every alias move, by hand too."""
    import os

    from components import notify
    from components.tracking.webhooks import ALIAS_CREATED, ALIAS_WEBHOOK, ensure_alias_webhook

    try:
        webhook = notify.webhook_from_env()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if webhook is None:
        return "notifications: Prefect events only (set GENPIPE_WEBHOOK_URL for HTTP messages)"
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return f"notifications: genpipe's messages to {notify.host_of(webhook.url)}; no MLflow registry webhook " \
               f"(MLFLOW_TRACKING_URI is not a tracking server)"
    from mlflow.exceptions import MlflowException

    from components.tracking.runs import client

    try:
        ensure_alias_webhook(client(), webhook.url, webhook.secret)
    except MlflowException as exc:
        return f"notifications: genpipe's messages to {notify.host_of(webhook.url)}; the MLflow server refused " \
               f"its registry webhook ({exc.message})"
    return f"notifications: genpipe's messages and MLflow's registry webhook {ALIAS_WEBHOOK} ({ALIAS_CREATED}) " \
           f"to {notify.host_of(webhook.url)}"


def ensure_pool(name: str) -> str:
    """A missing pool is created as a `process` pool; an existing one (e.g. a Kubernetes GPU pool made
    with infra/k8s/gpu-job-template.json) is used as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
            return f"work pool {name} ({pool.type}): exists"
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:
                return f"work pool {name}: exists"
            return f"work pool {name} (process): created; start a worker with `prefect worker start --pool {name}`"


def serve(cfg: DeployConfig) -> None:
    """Run the retrain flow on the schedule in this process until it is stopped (Ctrl-C). With a
    training pool configured, this process also serves train-model, so models still train in
    parallel, each in its own workspace, with no separate worker."""
    import prefect

    from flows.retrain import retrain
    from flows.workers import train_model

    deployments = [retrain.to_deployment(name=DEPLOYMENT_NAMES["retrain"], schedules=[schedule(cfg)],
                                         concurrency_limit=one_at_a_time())]
    if cfg.training_pool:
        deployments.append(train_model.to_deployment(name=DEPLOYMENT_NAMES["train-model"]))
    prefect.serve(*deployments)

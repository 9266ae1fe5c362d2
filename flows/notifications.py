"""Tell people what a retrain did: a Prefect event per new champion, kept challenger or failed run, and
the same payload POSTed to GENPIPE_WEBHOOK_URL when it is set (components/notify.py builds and signs).

Notifying never fails a run: every problem here is a warning.
"""
from __future__ import annotations

import logging
from typing import Sequence

from components import notify
from components.tracking.registry import Registration

log = logging.getLogger(__name__)


def _logger():
    """The flow run's logger inside a run (its warnings show in the Prefect UI), this module's outside."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def announce(result_or_registrations, failures: dict[str, str] | None = None,
             flow_run_url: str | None = None) -> list[dict]:
    """Emit and post one message per new champion or kept challenger ("unchanged" ones say nothing new)
    and one for the failures. Takes a RetrainResult (failures default to its own) or a list of
    Registration. flow_run_url defaults to this flow run's page when a Prefect UI URL is configured.
    Returns the payloads announced."""
    registrations: Sequence[Registration] = getattr(result_or_registrations, "registrations",
                                                    result_or_registrations) or []
    if failures is None:
        failures = getattr(result_or_registrations, "failures", {})
    flow_run_url = flow_run_url or _flow_run_url()
    try:
        webhook = notify.webhook_from_env()
    except ValueError as exc:  # a bad setting must not fail a run that trained and registered
        _logger().warning("no webhook sent: %s", exc)
        webhook = None
    tracking_uri = _tracking_uri()
    payloads = []
    for registration in registrations:
        if registration.decision not in notify.EVENT_OF_DECISION:
            continue
        links = notify.links(tracking_uri, registration.name, registration.version, flow_run_url)
        payload = notify.registration_message(registration, _version_metrics(registration), links)
        resource = {"prefect.resource.id": f"genpipe.model.{registration.name}",
                    "prefect.resource.name": registration.name, "genpipe.model.version": str(registration.version)}
        payloads.append(_publish(payload, resource, webhook))
    if failures:
        payload = notify.failure_message(failures, {"prefect": flow_run_url} if flow_run_url else {})
        resource = {"prefect.resource.id": "genpipe.retrain", "prefect.resource.name": "retrain",
                    "genpipe.failed": ", ".join(failures)}
        payloads.append(_publish(payload, resource, webhook))
    return payloads


def _publish(payload: dict, resource: dict[str, str], webhook: notify.Webhook | None) -> dict:
    from prefect.events import emit_event

    try:
        emit_event(event=payload["event"], resource=resource, payload=payload)
    except Exception as exc:  # EventTooLarge is the one emit_event raises; any other it logs itself
        _logger().warning("Prefect event %s not emitted: %s", payload["event"], exc)
    if webhook is not None:
        notify.post_webhook(webhook.url, payload, webhook.secret)
    return payload


def _version_metrics(registration: Registration) -> dict[str, float]:
    """The evaluation metrics registered on the version (its `metric.*` tags); {} when unreadable."""
    from components.tracking.runs import client

    try:
        tags = client().get_model_version(registration.name, str(registration.version)).tags
    except Exception as exc:  # the message still goes out, without metrics
        _logger().warning("metrics of %s v%s not read from MLflow: %s", registration.name, registration.version,
                    notify.redact_text(str(exc))[:300])
        return {}
    metrics = {}
    for key, value in tags.items():
        if key.startswith("metric."):
            try:
                metrics[key.removeprefix("metric.")] = float(value)
            except ValueError:
                continue  # not a number: nothing a receiver could compare
    return metrics


def _tracking_uri() -> str:
    from components.state import mlflow_tracking_uri

    return mlflow_tracking_uri()


def _flow_run_url() -> str | None:
    """This flow run's UI page; None outside a flow run or without a UI (the ephemeral API has none)."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run.id) if flow_run.id else None

"""MLflow's own registry webhooks: the tracking server itself POSTs `model_version_alias.created`
(signed like components/notify.py) whenever an alias is set, by genpipe or by hand.

Only an MLflow tracking server (`mlflow server`) on a SQL backend delivers them; the server decides
what it may call: MLFLOW_WEBHOOK_ALLOWED_SCHEMES (default https only), MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS
(needed for in-cluster or loopback receivers), and MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY (a Fernet key
the secrets are stored under: without it each server process draws its own, so a restart or a second
worker cannot read the secret back). MLFLOW_WEBHOOK_CACHE_TTL (60 s) delays a changed URL.
"""
from __future__ import annotations

ALIAS_WEBHOOK = "genpipe-model-alias"  # the one webhook genpipe owns: found again by this name
ALIAS_CREATED = "model_version_alias.created"


def ensure_alias_webhook(client, url: str, secret: str | None):
    """Make the server POST `model_version_alias.created` to `url`: create the webhook, or bring the one
    made before (same name) to this url, secret and event, active. Returns MLflow's Webhook."""
    from mlflow.entities.webhook import WebhookStatus

    if not client.tracking_uri.startswith(("http://", "https://")):
        raise ValueError(f"MLflow registry webhooks are sent by a tracking server; MLFLOW_TRACKING_URI is a "
                         f"{client.tracking_uri.partition(':')[0]!r} store. Run `mlflow server` on a SQL "
                         f"backend and point MLFLOW_TRACKING_URI at it, or rely on genpipe's own webhook "
                         f"(GENPIPE_WEBHOOK_URL)")
    ours = sorted((w for w in _all_webhooks(client) if w.name == ALIAS_WEBHOOK), key=lambda w: w.creation_timestamp)
    if not ours:
        return client.create_webhook(name=ALIAS_WEBHOOK, url=url, events=[ALIAS_CREATED], secret=secret,
                                     description="genpipe: a model version got an alias (champion, challenger)")
    for extra in ours[1:]:  # two deploys raced: keep the oldest
        client.delete_webhook(extra.webhook_id)
    # the secret cannot be read back to compare, so it is always written: the end state is the same
    return client.update_webhook(ours[0].webhook_id, url=url, events=[ALIAS_CREATED], secret=secret or "",
                                 status=WebhookStatus.ACTIVE)


def _all_webhooks(client) -> list:
    found, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found

"""Notification payloads and their signed webhook delivery (no Prefect here: flows/notifications.py emits).

One payload shape for every message:
    {"event", "model", "version", "decision", "reason", "metrics", "links", "time"}
with event one of genpipe.model.champion, genpipe.model.challenger, genpipe.retrain.failed.

Signatures follow MLflow's registry webhooks (mlflow/webhooks/delivery.py, after Standard Webhooks,
https://www.standardwebhooks.com): headers X-Genpipe-Delivery-Id, X-Genpipe-Timestamp and
X-Genpipe-Signature = "v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")).
So one receiver checks MLflow's `X-MLflow-*` deliveries and genpipe's with `verify_signature`.

The webhook URL and secret come from the environment only (GENPIPE_WEBHOOK_URL,
GENPIPE_WEBHOOK_SECRET): webhook URLs often embed a token, so neither is ever logged or stored.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

CHAMPION_EVENT = "genpipe.model.champion"
CHALLENGER_EVENT = "genpipe.model.challenger"
FAILED_EVENT = "genpipe.retrain.failed"
EVENT_OF_DECISION = {  # Registration.decision -> event; "unchanged" is absent: nothing new to say
    "champion": CHAMPION_EVENT,  # first version of a model
    "promoted": CHAMPION_EVENT,  # beat the champion
    "kept": CHALLENGER_EVENT,  # registered, champion stays
}
URL_VAR, SECRET_VAR = "GENPIPE_WEBHOOK_URL", "GENPIPE_WEBHOOK_SECRET"
HEADER_PREFIX = "X-Genpipe"  # MLflow's deliveries carry the same three headers under X-MLflow
SIGNATURE_VERSION = "v1"
REQUEST_TIMEOUT_S = 10
RETRY_STATUS = {429}  # besides 5xx: "too many requests" is the one 4xx that asks to be retried
TEXT_LIMIT = 1000  # characters kept of one error text: a payload must stay well inside an event's size limit


@dataclass(frozen=True)
class Webhook:
    url: str  # the path often holds a token: repr (below) shows the host only
    secret: str | None

    @property
    def host(self) -> str:
        return host_of(self.url)

    def __repr__(self) -> str:
        return f"Webhook(host={self.host!r}, signed={self.secret is not None})"


def webhook_from_env() -> Webhook | None:
    """The webhook GENPIPE_WEBHOOK_URL names (signed when GENPIPE_WEBHOOK_SECRET is set), or None."""
    url = os.environ.get(URL_VAR, "").strip()
    secret = os.environ.get(SECRET_VAR) or None
    if not url:
        if secret:
            raise ValueError(f"{SECRET_VAR} is set but {URL_VAR} is not: set {URL_VAR} to the receiver's "
                             f"http(s) URL, or unset {SECRET_VAR}")
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # the URL itself is not echoed: it may carry a token
        raise ValueError(f"{URL_VAR} must be an http:// or https:// URL with a host (scheme found: "
                         f"{parts.scheme or 'none'!r}); set it to the receiver's URL or unset it")
    return Webhook(url, secret)


def host_of(url: str) -> str:
    """host[:port] of a URL, without credentials, path or query: what may be logged of a webhook URL."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:  # a port that is not a number
        return "?"
    host = f"[{host}]" if ":" in host else host  # IPv6
    return f"{host}:{port}" if port else host


def links(tracking_uri: str, name: str, version: str, flow_run_url: str | None = None) -> dict[str, str]:
    """The MLflow model-version page (only for an http(s) tracking server: a sqlite file has no page; user
    and password dropped) and the Prefect flow-run page when known."""
    found = {}
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        base = urlunsplit(parts._replace(netloc=host_of(tracking_uri), query="", fragment="")).rstrip("/")
        found["mlflow"] = f"{base}/#/models/{quote(name, safe='')}/versions/{quote(str(version), safe='')}"
    if flow_run_url:
        found["prefect"] = flow_run_url
    return found


def champion_message(registration, metrics: dict, links: dict) -> dict:
    """A new champion: the first version of a model, or one that beat the champion."""
    return _registration_message(registration, metrics, links, CHAMPION_EVENT)


def challenger_message(registration, metrics: dict, links: dict) -> dict:
    """A registered challenger that did not beat the champion, kept beside it."""
    return _registration_message(registration, metrics, links, CHALLENGER_EVENT)


def registration_message(registration, metrics: dict, links: dict) -> dict | None:
    """The message a registration's decision calls for; None for "unchanged" (nothing new)."""
    event = EVENT_OF_DECISION.get(registration.decision)
    return None if event is None else _registration_message(registration, metrics, links, event)


def _registration_message(registration, metrics: dict, links: dict, event: str) -> dict:
    if EVENT_OF_DECISION.get(registration.decision) != event:
        fits = sorted(d for d, e in EVENT_OF_DECISION.items() if e == event)
        raise ValueError(f"{event}: registration {registration.name} v{registration.version} has decision "
                         f"{registration.decision!r}; this message is for decision {' or '.join(fits)}")
    return _message(event, registration.name, str(registration.version), registration.decision,
                    redact_text(registration.reason), metrics, links)


def failure_message(failures: dict[str, str], links: dict, models: Sequence[str] | None = None) -> dict:
    """A failed run: `failures` maps what failed (`train@vae`, `register@vae`, `ingest`) to its error.
    `model` lists the failed models (or shared stages); the reason holds every error, passwords redacted."""
    if not failures:
        raise ValueError("failure_message: `failures` is empty; there is no failed run to announce")
    failed = models or sorted({where.partition("@")[2] or where for where in failures})
    reason = "\n".join(f"{where}: {redact_text(error)[:TEXT_LIMIT]}" for where, error in failures.items())
    return _message(FAILED_EVENT, ", ".join(failed), None, "failed", reason, {}, links)


def _message(event: str, model: str, version: str | None, decision: str, reason: str, metrics: dict,
             links: dict) -> dict:
    return {
        "event": event,
        "model": model,
        "version": version,
        "decision": decision,
        "reason": reason,
        "metrics": {k: _json_number(v) for k, v in sorted(metrics.items())},
        "links": dict(links),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _json_number(value) -> float | None:
    """Strict JSON has no NaN or Infinity: a non-finite metric is sent as null."""
    value = float(value)
    return value if math.isfinite(value) else None


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/:@]+)(:[^\s@]*)?@")


def redact_text(text: str) -> str:
    """Every `scheme://user:password@` in a text (an error naming a database URI) as `scheme://user:***@`,
    and a token alone (`https://TOKEN@host`) as `https://***@host`."""
    return _USERINFO.sub(lambda m: f"{m[1]}{m[2]}:***@" if m[3] else f"{m[1]}***@", text)


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's webhook signature: "v1," + base64 HMAC-SHA256 of "{delivery_id}.{timestamp}.{body}"."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_signature(secret: str, delivery_id: str, timestamp: str, body: str, signature: str) -> bool:
    """For receivers (and tests): does `signature` sign this body? Works for MLflow's deliveries too."""
    return hmac.compare_digest(sign(secret, delivery_id, timestamp, body), signature)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib turns a redirected POST into a GET without the body: that would look delivered. Refuse."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def post_webhook(url: str, payload: dict, secret: str | None = None, attempts: int = 4,
                 backoff_s: Sequence[float] = (1, 2, 4)) -> bool:
    """POST the payload as JSON; True once the receiver answers 2xx. Retries connection errors, 5xx and
    429 after backoff_s[i] seconds (the last value repeats), never other 4xx. Never raises: a failure is
    one warning naming the host only (the URL's path may be a token)."""
    what = payload.get("event", "payload")
    try:
        body = json.dumps(payload, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        log.warning("webhook %s not sent: the payload is not strict JSON (%s)", what, exc)
        return False
    delivery_id = str(uuid.uuid4())  # the same on every attempt, so a receiver can drop duplicates
    host = host_of(url)
    problem = "no attempt made"
    for attempt in range(1, max(1, attempts) + 1):
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "genpipe-notify",
                   f"{HEADER_PREFIX}-Delivery-Id": delivery_id, f"{HEADER_PREFIX}-Timestamp": timestamp}
        if secret:
            headers[f"{HEADER_PREFIX}-Signature"] = sign(secret, delivery_id, timestamp, body)
        request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
        try:
            with _opener.open(request, timeout=REQUEST_TIMEOUT_S) as response:
                response.read()
            return True
        except urllib.error.HTTPError as exc:  # before URLError: it is one
            problem = f"HTTP {exc.code}"
            if exc.code < 500 and exc.code not in RETRY_STATUS:
                break
        except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, DNS, timeout
            problem = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        except Exception as exc:  # a malformed URL (say): its message may quote the URL, so name the type only
            problem = type(exc).__name__
            break
        if attempt < attempts:
            time.sleep(backoff_s[min(attempt - 1, len(backoff_s) - 1)] if backoff_s else 0)
    log.warning("webhook to %s not delivered after %d attempt(s): %s (%s)", host, attempt, problem, what)
    return False

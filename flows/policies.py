"""How flows guard shared things: Prefect global concurrency limits (limit 1, created when missing) that
keep two runs from training or registering the same model at once, across workspaces, workers and
manual or scheduled runs; and the retries of I/O (DVC push/pull, git, MLflow), never of training."""
from __future__ import annotations

import contextlib
from typing import Iterator

TRAIN_SLOT_WAIT_S = 6 * 3600  # another run training the same model: wait this long for it
REGISTER_SLOT_WAIT_S = 1800  # another run registering the same model: wait this long for it


def registration_limit_name(registered_name: str) -> str:
    return f"genpipe-register-{registered_name}"


def training_limit_name(registered_name: str) -> str:
    return f"genpipe-train-{registered_name}"


def training_slot(registered_name: str):
    return model_slot(training_limit_name(registered_name), TRAIN_SLOT_WAIT_S, f"training {registered_name}")


def registration_slot(registered_name: str):
    return model_slot(registration_limit_name(registered_name), REGISTER_SLOT_WAIT_S, f"registering {registered_name}")


@contextlib.contextmanager
def model_slot(limit: str, wait_s: float, doing: str) -> Iterator[None]:
    """Hold the one slot of the global concurrency limit `limit` for a block, waiting up to wait_s.

    Only with a Prefect server: the embedded ephemeral API serves one workspace, which the
    workspace lock already serialises."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    try:
        with concurrency(limit, occupy=1, timeout_seconds=wait_s, strict=True):
            yield
    except TimeoutError:
        raise TimeoutError(f"Prefect concurrency limit {limit!r}: another run kept {doing} for {wait_s:.0f} s") from None


def io_retry_delays() -> list[float]:
    """Seconds between the retries of a DVC push/pull, git or MLflow call: GENPIPE_IO_RETRY_DELAYS
    ("2,10,30" by default: three retries within about 40 s of an outage)."""
    import os

    text = os.environ.get("GENPIPE_IO_RETRY_DELAYS", "2,10,30")
    try:
        delays = [float(v) for v in text.split(",")]
    except ValueError:
        delays = []
    if not delays or min(delays) < 0:
        raise ValueError(f"GENPIPE_IO_RETRY_DELAYS: expected comma-separated seconds >= 0 like 2,10,30, got {text!r}")
    return delays


_DELAYS = io_retry_delays()  # read once, when the flows are imported: a task's retries are fixed at definition
IO_RETRIES = {"retries": len(_DELAYS), "retry_delay_seconds": _DELAYS}

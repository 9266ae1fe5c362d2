"""Prefect global concurrency limits (limit 1, created when missing) that keep two runs from working on
the same model at once: across workspaces, workers and manual or scheduled runs."""
from __future__ import annotations

import contextlib
from typing import Iterator

TRAIN_SLOT_WAIT_S = 6 * 3600  # another run training the same model: wait this long for it
REGISTER_SLOT_WAIT_S = 1800  # another run registering the same model: wait this long for it


def registration_limit_name(registered_name: str) -> str:
    return f"genpipe-register-{registered_name}"


def training_limit_name(registered_name: str) -> str:
    return f"genpipe-train-{registered_name}"


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

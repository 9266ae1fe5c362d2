"""Training runs in MLflow, with metrics batched so per-step logging stays cheap over HTTP.

The tracking server is a witness, not a dependency of the training: while it is unreachable,
metrics wait in a bounded buffer and are sent when it answers again; a training that succeeded
is never failed by the run bookkeeping around it.
"""
from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections import deque
from typing import Iterator

from components.state import mlflow_artifact_root, mlflow_tracking_uri

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch request
MAX_PENDING = 200_000  # metrics kept through an outage (~100 bytes each); the oldest go first
MAX_BACKOFF_S = 300.0
FINISH_TIMEOUT_S = 120.0


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_tracking_uri())


def ensure_experiment(name: str) -> str:
    c = client()
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = mlflow_artifact_root()
    return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def has_error_code(exc: BaseException, *codes: str) -> bool:
    """Whether an MLflow error carries one of these error codes (RESOURCE_DOES_NOT_EXIST, …)."""
    return getattr(exc, "error_code", None) in codes


def is_transient(exc: BaseException) -> bool:
    """An error that retrying later may cure: no connection, a timeout, 5xx, 429."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):  # the REST client wraps connection errors as INTERNAL_ERROR (500)
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, OSError)  # requests' ConnectionError and Timeout are OSErrors


def _tracking_error(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, (MlflowException, OSError))


class MetricLogger:
    """Buffers metrics and sends them with log_batch every `flush_seconds`; through an outage it
    keeps them (at most `max_pending`) and retries with a growing interval."""

    def __init__(self, run_id: str, flush_seconds: float = 5.0, max_pending: int = MAX_PENDING):
        from mlflow.entities import Metric

        self._metric, self.run_id, self.flush_seconds = Metric, run_id, flush_seconds
        self._pending: deque = deque(maxlen=max_pending)
        self._dropped = 0
        self._failures = 0
        self.last_error: BaseException | None = None
        self._next_flush = time.monotonic() + flush_seconds

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __call__(self, values: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        for k, v in values.items():
            if len(self._pending) == self._pending.maxlen:
                self._dropped += 1  # the deque drops the oldest on append
            self._pending.append(self._metric(k, float(v), now_ms, step))
        if time.monotonic() >= self._next_flush:
            self.flush()

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left pending. Never raises for the server's
        sake: an outage keeps the metrics for the next flush, a refusal (4xx) drops them."""
        c = client()
        while self._pending:
            batch = list(itertools.islice(self._pending, MAX_BATCH))
            try:
                c.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                if not _tracking_error(exc):
                    raise
                if is_transient(exc):
                    self._outage(exc)
                    return False
                warnings.warn(f"MLflow refused {len(batch)} metrics of run {self.run_id}; dropped them: {exc}")
            for _ in batch:
                self._pending.popleft()
        if self._failures:
            lost = f"; {self._dropped} older ones were dropped, the buffer being full" if self._dropped else ""
            print(f"MLflow reachable again: buffered metrics of run {self.run_id} sent{lost}")
        self._failures, self._dropped, self.last_error = 0, 0, None
        self._next_flush = time.monotonic() + self.flush_seconds
        return True

    def _outage(self, exc: BaseException) -> None:
        if not self._failures:
            warnings.warn(f"MLflow unreachable ({exc}); training goes on, metrics are buffered and retried")
        self._failures += 1
        self.last_error = exc
        backoff = min(self.flush_seconds * 2 ** self._failures, MAX_BACKOFF_S)
        self._next_flush = time.monotonic() + backoff


@contextlib.contextmanager
def training_run(experiment: str, run_name: str, params: dict, tags: dict, flush_seconds: float = 5.0,
                 finish_timeout: float = FINISH_TIMEOUT_S) -> Iterator[MetricLogger]:
    """An MLflow run that ends FINISHED on success and FAILED on error, metrics flushed either way.

    Ending it retries through an outage for up to `finish_timeout` seconds, then warns: the
    training's own outcome (its result or its exception) is what the caller gets.
    """
    def start() -> str:
        c = client()
        run_id = c.create_run(ensure_experiment(experiment), run_name=run_name, tags=tags).info.run_id
        c.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        return run_id

    logger = MetricLogger(_retrying(start, "start the training run", finish_timeout), flush_seconds)
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    finally:
        _finish(logger, status, finish_timeout)


def _retrying(call, what: str, timeout: float):
    """call() retried through a transient MLflow outage for up to `timeout` seconds."""
    deadline, delay = time.monotonic() + timeout, 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if not (_tracking_error(exc) and is_transient(exc)) or time.monotonic() + delay > deadline:
                raise
            warnings.warn(f"MLflow unreachable ({exc}); retrying to {what} in {delay:g} s")
        time.sleep(delay)  # backoff between attempts to reach the server
        delay = min(delay * 2, 30.0)


def _finish(logger: MetricLogger, status: str, timeout: float) -> None:
    deadline, delay = time.monotonic() + timeout, 0.5
    while True:
        try:
            if logger.flush():
                client().set_terminated(logger.run_id, status=status)
                return
            error = logger.last_error
        except Exception as exc:
            if not _tracking_error(exc):
                raise
            if not is_transient(exc):
                warnings.warn(f"MLflow refused to end run {logger.run_id} as {status}: {exc}")
                return
            error = exc
        if time.monotonic() + delay > deadline:
            warnings.warn(f"MLflow still unreachable after {timeout:g} s ({error}): run {logger.run_id} stays "
                          f"RUNNING in MLflow with {logger.pending} metrics unsent; the training "
                          f"{'succeeded' if status == 'FINISHED' else 'failed'}")
            return
        time.sleep(delay)  # backoff between attempts to reach the server
        delay = min(delay * 2, 30.0)


def _param(key: str, value) -> object:
    from mlflow.entities import Param

    return Param(key, str(value))

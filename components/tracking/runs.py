"""Training runs in MLflow, with metrics batched so per-step logging stays cheap over HTTP."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from components.state import mlflow_artifact_root, mlflow_tracking_uri


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


class MetricLogger:
    """Buffers metrics and sends them with log_batch every `flush_seconds`."""

    def __init__(self, run_id: str, flush_seconds: float = 5.0):
        from mlflow.entities import Metric

        self._metric, self.run_id, self.flush_seconds = Metric, run_id, flush_seconds
        self._pending: list = []
        self._last_flush = time.monotonic()

    def __call__(self, values: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        self._pending += [self._metric(k, float(v), now_ms, step) for k, v in values.items()]
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            client().log_batch(self.run_id, metrics=self._pending)
            self._pending = []
        self._last_flush = time.monotonic()


@contextlib.contextmanager
def training_run(experiment: str, run_name: str, params: dict, tags: dict) -> Iterator[MetricLogger]:
    """An MLflow run that ends FINISHED on success and FAILED on error, metrics flushed either way."""
    c = client()
    run = c.create_run(ensure_experiment(experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    c.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
    logger = MetricLogger(run_id)
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    finally:
        logger.flush()
        c.set_terminated(run_id, status=status)


def _param(key: str, value) -> object:
    from mlflow.entities import Param

    return Param(key, str(value))

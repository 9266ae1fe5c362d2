"""Where runtime state lives. Embedded defaults keep everything under one folder (GENPIPE_HOME,
default ./.genpipe) that can be deleted to start over; servers are chosen by the usual variables
(PREFECT_API_URL, MLFLOW_TRACKING_URI, the DVC remote) and override the defaults."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def state_dir() -> Path:
    return Path(os.environ.get("GENPIPE_HOME", ".genpipe")).resolve()


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow' / 'mlflow.db'}"


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by *** (`postgresql://user:***@host/db`), for printing."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def mlflow_artifact_root() -> str | None:
    """Local artefact root for a database-backed store; None when a tracking server decides."""
    if mlflow_tracking_uri().startswith(("http:", "https:", "databricks")):
        return None
    return (state_dir() / "mlflow" / "artifacts").as_uri()


def checkpoint_path(model_name: str) -> Path:
    return state_dir() / "checkpoints" / model_name / "last.pt"


def configure_environment() -> None:
    """Fill in embedded defaults for the tools' own variables; explicit settings win.
    Called by the CLI before Prefect/MLflow are imported (never at import time)."""
    home = state_dir()
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", mlflow_tracking_uri())
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ["GENPIPE_HOME"] = str(home)  # stage subprocesses see the same state folder


def device() -> torch.device:
    """GENPIPE_DEVICE (cpu, cuda, cuda:1, …) or the first GPU when there is one."""
    import torch  # not at import: the CLI reads state paths before it knows it needs torch

    wanted = os.environ.get("GENPIPE_DEVICE", "auto")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)

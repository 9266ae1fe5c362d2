"""What every genpipe flow run does for itself: set up its process (a worker starts a flow run without
the CLI), and describe errors in one line with no credential in it."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def prepare_process() -> None:
    """The CLI's set-up, for a flow run started by a worker: state folder and the tools' defaults, and
    `genpipe` on PATH for the stage commands DVC runs."""
    from components.state import configure_environment

    configure_environment()
    # An unreachable MLflow fails a call in seconds, and the flow's own retries (GENPIPE_IO_RETRY_DELAYS)
    # wait out the outage, instead of MLflow's 7 retries backing off for minutes inside one attempt.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def describe(exc: BaseException | None) -> str:
    """An error and its causes on one line (DVC's ReproductionError carries the command's in __cause__),
    any `user:password@` or token in a URL masked: this text reaches logs, artifacts and webhooks."""
    from components.notify import redact_text

    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return redact_text(" <- ".join(parts))

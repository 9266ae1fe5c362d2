"""Samples of a registered model, drawn with the code it was registered with.

A champion registered by older code is loaded in a fresh interpreter, where MLflow puts the
model's own code snapshot (its code_paths) first on sys.path, so today's components never mix
with it. Only the samples come back; today's evaluator scores them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Runs in the child. Each stage is reported before it starts, so the parent knows what failed:
# a failed download is I/O (worth a retry), a failed load or sampling is the model's own problem.
_CHILD = r"""
import json, sys, traceback
uri, count, seed, out, status, dst = sys.argv[1:7]
def report(**info):
    with open(status, "w") as f:
        json.dump(info, f)
report(stage="download")
import mlflow.artifacts, mlflow.pyfunc
local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
report(stage="load")
try:
    model = mlflow.pyfunc.load_model(local)
    import components
    from components.evaluation.grid import sample_uint8
    report(stage="sample", code=components.__file__)
    images = sample_uint8(model.unwrap_python_model().model, int(count), int(seed))
except BaseException as exc:
    report(stage="failed", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=3))
    sys.exit(3)
import numpy as np
np.save(out, images.numpy())
report(stage="done", code=components.__file__)
"""


class RegisteredModelUnloadable(RuntimeError):
    """The registered model's artefacts arrived but its own code cannot load or sample them."""


def registered_samples(model_uri: str, count: int, seed: int, timeout_s: float = 1800) -> tuple[np.ndarray, str]:
    """`count` uint8 samples (N×C×H×W) of a registered model at `seed`, and the path of the
    components package that drew them (inside the model's downloaded code snapshot)."""
    with tempfile.TemporaryDirectory(prefix="genpipe-champion-") as tmp:
        out, status = Path(tmp) / "samples.npy", Path(tmp) / "status.json"
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, model_uri, str(count), str(seed), str(out), str(status), tmp],
            cwd=tmp, capture_output=True, text=True, timeout=timeout_s)
        info = json.loads(status.read_text()) if status.is_file() else {"stage": "start"}
        if proc.returncode == 0 and info["stage"] == "done":
            return np.load(out, allow_pickle=False), info["code"]
        if info["stage"] == "failed":
            raise RegisteredModelUnloadable(f"{model_uri}: {info['error']}")
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{model_uri}: sampling process failed during {info['stage']} "
                           f"(exit {proc.returncode}): {tail[0]}")

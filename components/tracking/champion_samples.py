"""Images of a registered model (samples, reconstructions or translations), made with the code it
was registered with.

A champion registered by older code is loaded in a fresh interpreter, where MLflow puts the
model's own code snapshot (its code_paths) first on sys.path, so today's components never mix
with it. The reference images (or, for a translate model, today's degraded inputs and masks) go to
it as .npy files; only its images come back, and today's evaluator scores them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.state import mlflow_tracking_uri

if TYPE_CHECKING:
    from components.evaluation.restoration import Restorations

# Runs in the child; each stage is reported before it starts. The model's own failures (its code
# does not import, its weights do not fit, its samples are NaN) are "failed"; trouble of the
# machine or the network (memory, files, a killed child) is left to the parent as worth a retry.
_CHILD = r"""
import json, sys, traceback
uri, mode, reference_path, mask_path, seed, out, status, dst = sys.argv[1:9]
def report(**info):
    with open(status, "w") as f:
        json.dump(info, f)
def describe(exc):
    return f"{type(exc).__name__}: {exc}".replace(dst, "<model>")
report(stage="download")
import mlflow.artifacts, mlflow.pyfunc
try:
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
except Exception as exc:
    report(stage="download failed", error=describe(exc), error_code=getattr(exc, "error_code", None))
    sys.exit(4)
report(stage="load")
import numpy as np
reference = np.load(reference_path, allow_pickle=False)
try:
    model = mlflow.pyfunc.load_model(local)
    import components, torch
    python_model = model.unwrap_python_model()
    report(stage="sample", code=components.__file__)
    if mode == "translate":  # today's inputs, through the model's own pyfunc: as a request would send them
        kind = getattr(python_model, "kind", "generate")
        if kind != "translate":
            raise TypeError(f"a {kind} model does not translate images")
        mask = np.load(mask_path, allow_pickle=False) if mask_path != "-" else None
        chunks = []
        for start in range(0, reference.shape[0], 500):
            request = {"images": reference[start:start + 500]}
            if mask is not None:
                request["mask"] = mask[start:start + 500]
            chunks.append(np.asarray(model.predict(request)))
        images = torch.from_numpy(np.concatenate(chunks))
    else:
        try:
            from components.evaluation.grid import evaluation_images
        except ImportError:  # code from before task kinds: every family in it is a sampler
            from components.evaluation.grid import sample_uint8
            images = sample_uint8(python_model.model, reference.shape[0], int(seed))
        else:
            images = evaluation_images(python_model.model, python_model.kind, torch.from_numpy(reference), int(seed))
except (MemoryError, OSError):
    raise
except Exception as exc:
    report(stage="failed", error=describe(exc))
    sys.exit(3)
np.save(out, images.numpy())
report(stage="done", code=components.__file__)
"""

# A download refused for good: the version's artefacts are gone or not ours to read.
_PERMANENT_DOWNLOAD_ERRORS = {"RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"}


class RegisteredModelUnloadable(RuntimeError):
    """The registered model cannot be loaded or sampled by its own code, or its artefacts are gone."""


def registered_images(model_uri: str, reference_u8: np.ndarray, seed: int,
                      timeout_s: float = 1800) -> tuple[np.ndarray, str]:
    """The uint8 images (N×C×H×W) a registered model makes for scoring against `reference_u8`
    (held-out real images, uint8 N×C×H×W) by its task kind: a sampler's samples at `seed`, as many
    as the reference holds; a reconstructor's reconstructions of the reference images (a translator
    is sent today's inputs by registered_translations instead). Also the path of the components
    package that made them (inside the model's downloaded code snapshot).

    Raises RegisteredModelUnloadable for the model's own failures, RuntimeError for the rest.
    """
    return _run_child(model_uri, "images", reference_u8, None, seed, timeout_s)


def registered_translations(model_uri: str, restorations: Restorations, timeout_s: float = 1800) -> Restorations:
    """`restorations` with a registered translate model's in MODEL's place: its pyfunc's answers to
    requests of the same 8-bit inputs (and masks). Another kind of model, inputs its code refuses or
    outputs of another shape raise RegisteredModelUnloadable; the machine's troubles RuntimeError."""
    import torch

    mask = None if restorations.mask is None else restorations.mask.numpy()
    images, _ = _run_child(model_uri, "translate", restorations.inputs.numpy(), mask, 0, timeout_s)
    try:
        return restorations.with_model_outputs(torch.from_numpy(images))
    except ValueError as exc:  # another output size or channel count: not the same task
        raise RegisteredModelUnloadable(f"{model_uri}: {exc}") from None


def _run_child(model_uri: str, mode: str, images_u8: np.ndarray, mask_u8: np.ndarray | None, seed: int,
               timeout_s: float) -> tuple[np.ndarray, str]:
    with tempfile.TemporaryDirectory(prefix="genpipe-champion-") as tmp:
        out, status, reference = Path(tmp) / "images.npy", Path(tmp) / "status.json", Path(tmp) / "reference.npy"
        np.save(reference, np.ascontiguousarray(images_u8, dtype=np.uint8))
        mask = "-"
        if mask_u8 is not None:
            mask = str(Path(tmp) / "mask.npy")
            np.save(mask, np.ascontiguousarray(mask_u8, dtype=np.uint8))
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, model_uri, mode, str(reference), mask, str(seed), str(out), str(status),
                 tmp], cwd=tmp, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_tracking_uri()},
                capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{model_uri}: its process took over {timeout_s:g} s ({mode})") from None
        info = json.loads(status.read_text()) if status.is_file() else {"stage": "start"}
        if proc.returncode == 0 and info["stage"] == "done":
            return np.load(out, allow_pickle=False), info["code"]
        if info["stage"] == "failed" or info.get("error_code") in _PERMANENT_DOWNLOAD_ERRORS:
            raise RegisteredModelUnloadable(f"{model_uri}: {info['error']}")
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{model_uri}: sampling process failed during {info['stage']} "
                           f"(exit {proc.returncode}): {info.get('error') or tail[0]}")

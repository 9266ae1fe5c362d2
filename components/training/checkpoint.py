"""Atomic, safely loadable checkpoints and weight files."""
from __future__ import annotations

import json
import os
import random
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    # Data reaches the disk before the rename and the rename before we return: after a power cut
    # the path holds either the old file or the complete new one, never a renamed empty file.
    # The temp name `.{name}.tmp-*` is distinctive: the leftover sweep removes only that pattern
    # (components.workspace), never an editor's or a user's `.{name}.*` file beside it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def move_aside(path: Path) -> Path:
    """Rename an unusable file to <name>.corrupt-<UTC time>, kept for a post-mortem."""
    aside = path.with_name(f"{path.name}.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}")
    os.replace(path, aside)
    return aside


def save_weights(model: torch.nn.Module, path: Path) -> None:
    save_state(model.state_dict(), path)


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors (dense, on the CPU: channels_last strides are not kept)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    _atomic(path, lambda tmp: save_file(state, tmp))


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    model.load_state_dict(load_file(str(path)))
    return model


def write_json(data: Any, path: Path) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def global_rng_state(device: torch.device) -> dict[str, Any]:
    """The process-wide random states (torch's CPU and, training on a GPU, its CUDA generator;
    numpy's; Python's), in types torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "global": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_global_rng_state(state: dict[str, Any], device: torch.device) -> None:
    numpy, python = state["numpy"], state["python"]
    np_state = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                numpy["cached_gaussian"])
    py_state = (python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss_next"])
    torch.set_rng_state(state["global"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(np_state)
    random.setstate(py_state)

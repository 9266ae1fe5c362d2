"""The registered model: an MLflow pyfunc that returns generated images.

Weights travel as an artefact (safetensors + a JSON spec) and are rebuilt through the family
registry in load_context, so nothing pickled from training is ever loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

MAX_COUNT = 4096


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from components.tracking.model_files import load_trained_model

        self.model = load_trained_model(Path(context.artifacts["model_dir"]))
        self.spec = json.loads((Path(context.artifacts["model_dir"]) / "model.json").read_text())

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        """Request {"count": N, "seed": S, "labels": [...] (conditional models only)}
        → uint8 array N×C×H×W. A one-row DataFrame with those columns works too."""
        import torch

        from components.evaluation.grid import sample_uint8

        count, seed, labels = parse_request(model_input)
        if labels is not None and not self.model.conditional:
            raise ValueError(f"this {self.spec['family']} model is unconditional: drop 'labels' from the request")
        label_tensor = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        return sample_uint8(self.model, count, seed, label_tensor).numpy()


def parse_request(request: Any) -> tuple[int, int, list[int] | None]:
    if hasattr(request, "to_dict"):  # pandas DataFrame: take the first row
        records = request.to_dict(orient="records")
        request = records[0] if records else {}
    if not isinstance(request, dict):
        raise ValueError(f"request must be a mapping like {{'count': 16, 'seed': 0}}, got {type(request).__name__}")
    unknown = set(request) - {"count", "seed", "labels"}
    if unknown:
        raise ValueError(f"unknown request field(s) {sorted(unknown)}; valid: count, seed, labels")
    count, seed = request.get("count", 16), request.get("seed", 0)
    if not _is_int(count) or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count: must be an integer in 1..{MAX_COUNT}, got {count!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    labels = request.get("labels")
    if labels is not None:
        if isinstance(labels, (str, bytes)) or not all(_is_int(v) for v in labels):
            raise ValueError(f"labels: must be a list of integer class ids, got {labels!r}")
        labels = [int(v) for v in labels]
        if len(labels) != count:
            raise ValueError(f"labels: need one per image ({count}), got {len(labels)}")
    return int(count), int(seed), labels


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

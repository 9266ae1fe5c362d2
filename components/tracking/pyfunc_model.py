"""The registered model: an MLflow pyfunc that answers requests according to its family's task kind.

Weights travel as an artefact (safetensors + a JSON spec) and are rebuilt through the family
registry in load_context, so nothing pickled from training is ever loaded.

Requests (a mapping, a one-row DataFrame with these columns, and/or MLflow params; see
components/tracking/requests.py):
  generate:    {"count": N, "seed": S, + the family's conditions: "labels": [one class id per image],
                "prompt": "one text for all images" or [one text per image], + the family's sampler
                options: "steps", "guidance" (a diffusion model)} → uint8 N×C×H×W;
               a family that completes images also takes {"images": uint8 N×C×H×W, "rows_given": R,
                "count": K, "seed": S} → uint8 (N·K)×C×H×W, K completions of each image in turn,
                their top R rows the image's own
  reconstruct: {"images": uint8 N×C×H×W, "output": "reconstruction" | "latent"}
               → uint8 N×C×H×W reconstructions, or float32 N×latent_dim codes
  translate:   {"images": uint8 N×(the family's input shape), + "mask": uint8 N×1×H×W of 0/1, 1 where
                to fill in, for families that take one} → uint8 N×C×H×W
and "format": "png" or "png_grid" answers images as base64 PNGs instead of uint8 arrays.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from components.tracking.requests import SAMPLER_OPTION_PARSERS as SAMPLER_OPTIONS, RequestSchema, parse_request


class InvalidRequest(MlflowException, ValueError):
    """A request the model cannot answer: MLflow's scoring server returns it as HTTP 400 with this
    message (an invalid-parameter error), and Python callers catch it as a ValueError."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from components.tracking.model_files import load_trained_model

        model_dir = Path(context.artifacts["model_dir"])
        self.model = load_trained_model(model_dir)
        self.spec = json.loads((model_dir / "model.json").read_text())
        self.schema = RequestSchema.of(self.spec)
        self.kind = self.schema.kind  # read by the CLI and the champion re-scorer

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        """Answer a request (see the module docstring) as its model's task kind does."""
        try:
            request = parse_request(model_input, self.schema, params)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return RESPONSES[request["format"]](TASKS[self.kind](self.model, request))


def _generate(model, request: dict) -> np.ndarray:
    import torch

    from components.evaluation.grid import complete_uint8, sample_uint8

    if "rows_given" in request:
        return complete_uint8(model, torch.from_numpy(request["images"]), request["rows_given"], request["count"],
                              request["seed"]).numpy()
    labels = request.get("labels")
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    options = {name: request[name] for name in SAMPLER_OPTIONS if name in request}  # steps, guidance
    return sample_uint8(model, request["count"], request["seed"], labels, prompts=request.get("prompt"),
                        **options).numpy()


def _reconstruct(model, request: dict) -> np.ndarray:
    import torch

    from components.evaluation.grid import encode_latents, reconstruct_uint8

    images = torch.from_numpy(request["images"])
    if request["output"] == "latent":
        return encode_latents(model, images).numpy()
    return reconstruct_uint8(model, images).numpy()


def _translate(model, request: dict) -> np.ndarray:
    import torch

    from components.evaluation.grid import translate_uint8

    mask = request.get("mask")
    return translate_uint8(model, torch.from_numpy(request["images"]),
                           None if mask is None else torch.from_numpy(mask)).numpy()


TASKS: dict[str, Callable[[Any, dict], np.ndarray]] = {"generate": _generate, "reconstruct": _reconstruct,
                                                       "translate": _translate}


def _base64_png(images: np.ndarray) -> str:
    from components.evaluation.grid import png_bytes

    return base64.b64encode(png_bytes(images)).decode("ascii")


# What a response holds by the request's format: the uint8 array, one PNG per image, or one grid of them all.
RESPONSES: dict[str, Callable[[np.ndarray], Any]] = {
    "uint8": lambda images: images,
    "png": lambda images: [_base64_png(image[None]) for image in images],
    "png_grid": lambda images: [_base64_png(images)]}

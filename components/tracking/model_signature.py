"""How to call a registered model, stored with it: an MLflow signature, an input example and a
description, all from its request schema, so the MLflow UI and `mlflow models serve` show them.

The signature declares params only (the scalar request fields, default None = not sent). It
declares no input schema on purpose: MLflow would then drop request fields it does not know and
cast values (2.5 → 2) before the model sees them, so a misspelt field would be ignored instead of
refused. The model checks its inputs itself (components/tracking/requests.py).
"""
from __future__ import annotations

import json

import numpy as np

from components.tracking.requests import FIELDS, RequestSchema


def signature(schema: RequestSchema):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import DataType, ParamSchema, ParamSpec

    params = [ParamSpec(name, DataType[FIELDS[name].param_type], default=None)
              for name in schema.fields if FIELDS[name].param_type is not None]
    return ModelSignature(inputs=None, params=ParamSchema(params))


def input_example(schema: RequestSchema) -> dict:
    """A small request this model answers; its conditions name real classes of its data."""
    return EXAMPLES[schema.kind](schema)


def _generate_example(schema: RequestSchema) -> dict:
    example = {"count": 4, "seed": 0}
    if "labels" in schema.conditions:
        example["labels"] = [i % len(schema.classes) for i in range(4)]
    elif "prompt" in schema.conditions:
        example["prompt"] = schema.classes[-1].lower()
    return example


def _two_images(shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 2×C×H×W: a dark image with a light square in its middle, and its negative."""
    _, height, width = shape
    image = np.full(shape, 20, dtype=np.uint8)
    image[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 235
    return np.stack([image, 255 - image])


def _reconstruct_example(schema: RequestSchema) -> dict:
    return {"images": _two_images(schema.sent_shape)}


def _translate_example(schema: RequestSchema) -> dict:
    example = {"images": _two_images(schema.sent_shape)}  # at the family's input shape (low resolution, for SR)
    if schema.takes_mask:  # fill in the middle square of each
        _, height, width = schema.sent_shape
        mask = np.zeros((2, 1, height, width), dtype=np.uint8)
        mask[..., height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
        example["mask"] = mask
    return example


EXAMPLES = {"generate": _generate_example, "reconstruct": _reconstruct_example, "translate": _translate_example}


def description(schema: RequestSchema) -> str:
    """Markdown for the registry version's page: the request fields, with a call of each shape."""
    example = input_example(schema)
    shown = {k: (f"<uint8 N×{'×'.join(map(str, v.shape[1:]))}>" if isinstance(v, np.ndarray) else v)
             for k, v in example.items()}
    scalars = [name for name in schema.fields if FIELDS[name].param_type is not None]
    sent = "×".join(map(str, schema.sent_shape))
    images = (f"images {schema.image_shape}" if sent == schema.image_shape
              else f"takes images {sent} and returns images {schema.image_shape}")
    lines = [f"A genpipe **{schema.family}** model ({schema.kind}); {images}.", "", "Request fields:", ""]
    lines += [f"- `{name}`: {FIELDS[name].doc}" for name in schema.fields]
    if "labels" in schema.conditions or "prompt" in schema.conditions:
        lines += ["", f"Classes: {schema.describe_classes()}."]
    lines += ["", "Send them to `mlflow models serve` as `{\"inputs\": " + json.dumps(shown, ensure_ascii=False) + "}`, "
              "as `dataframe_records` / `dataframe_split` (one row), or the scalar fields "
              f"({', '.join(scalars)}) as `params` (MLflow drops params of other names, with a warning in "
              "the server's log). Python: `mlflow.pyfunc.load_model(uri).predict(request)`.",
              "A bad request answers HTTP 400 naming the field."]
    return "\n".join(lines)


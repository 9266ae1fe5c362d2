"""The registered model: an MLflow pyfunc that answers requests according to its family's task kind.

Weights travel as an artefact (safetensors + a JSON spec) and are rebuilt through the family
registry in load_context, so nothing pickled from training is ever loaded.

Requests (a dict, or a one-row DataFrame with these columns):
  generate:    {"count": N, "seed": S, + the family's conditions: "labels": [one class id per image],
                "prompt": "one text for all images" or [one text per image]} → uint8 N×C×H×W
  reconstruct: {"images": uint8 N×C×H×W, "output": "reconstruction" | "latent"}
               → uint8 N×C×H×W reconstructions, or float32 N×latent_dim codes
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow.pyfunc
import numpy as np

MAX_COUNT = 4096
OUTPUTS = ("reconstruction", "latent")
# What a model of each kind does, for errors telling a caller they sent the other kind's request.
KIND_DOES = {"generate": "it generates images",
             "reconstruct": "it reconstructs the images it is sent, it does not sample"}


@dataclass(frozen=True)
class RequestSchema:
    """What a request to one registered model may hold, from its family's declaration and its data."""

    family: str
    kind: str
    conditions: tuple[str, ...]
    channels: int
    image_size: int
    classes: tuple[str, ...]

    @classmethod
    def of(cls, spec: dict, image_size: int) -> "RequestSchema":
        """The schema of a trained model from its model.json spec (family, channels, classes)."""
        from components.models import FAMILIES, class_names

        family = FAMILIES.get(spec["family"])
        unknown = sorted(set(family.conditions) - set(CONDITION_PARSERS))
        if unknown:
            raise ValueError(f"family {spec['family']!r} declares request condition(s) {unknown} that the "
                             f"registered model cannot parse; known: {', '.join(CONDITION_PARSERS)}")
        classes = class_names(spec["num_classes"], spec.get("classes"))
        return cls(family=spec["family"], kind=family.kind, conditions=tuple(family.conditions),
                   channels=int(spec["channels"]), image_size=int(image_size), classes=tuple(classes))

    @property
    def fields(self) -> tuple[str, ...]:
        return (*KIND_FIELDS[self.kind], *self.conditions)

    def describe_classes(self) -> str:
        return ", ".join(f"{i} {name}" for i, name in enumerate(self.classes))


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from components.tracking.model_files import load_trained_model

        model_dir = Path(context.artifacts["model_dir"])
        self.model = load_trained_model(model_dir)
        self.spec = json.loads((model_dir / "model.json").read_text())
        self.schema = RequestSchema.of(self.spec, self.model.image_size)
        self.kind = self.schema.kind  # read by the CLI and the champion re-scorer

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        """Answer a request (see the module docstring) as its model's task kind does."""
        request = parse_request(model_input, self.schema)
        return TASKS[self.kind](self.model, request)


def _generate(model, request: dict) -> np.ndarray:
    import torch

    from components.evaluation.grid import sample_uint8

    labels = request.get("labels")
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return sample_uint8(model, request["count"], request["seed"], labels, prompts=request.get("prompt")).numpy()


def _reconstruct(model, request: dict) -> np.ndarray:
    import torch

    from components.evaluation.grid import encode_latents, reconstruct_uint8

    images = torch.from_numpy(request["images"])
    if request["output"] == "latent":
        return encode_latents(model, images).numpy()
    return reconstruct_uint8(model, images).numpy()


TASKS: dict[str, Callable[[Any, dict], np.ndarray]] = {"generate": _generate, "reconstruct": _reconstruct}


# --- request parsing -------------------------------------------------------------------------------

def parse_request(request: Any, schema: RequestSchema) -> dict:
    """The request's fields, checked against `schema` and normalised (defaults filled, scalars
    unwrapped, one prompt per image); a ValueError naming the field says what is wrong."""
    fields = _as_mapping(request)
    _check_field_names(fields, schema)
    return KIND_PARSERS[schema.kind](fields, schema)


def _as_mapping(request: Any) -> dict:
    if hasattr(request, "to_dict"):  # pandas DataFrame: one row is one request
        records = request.to_dict(orient="records")
        if len(records) > 1:
            raise ValueError(f"request: a DataFrame request must have one row, got {len(records)}; "
                             f"send one request per call")
        request = records[0] if records else {}
    if not isinstance(request, dict):
        raise ValueError(f"request must be a mapping like {{'count': 16, 'seed': 0}}, got {type(request).__name__}")
    return request


def _check_field_names(fields: dict, schema: RequestSchema) -> None:
    for name in CONDITION_PARSERS:
        if name in fields and name not in schema.conditions:
            takes = (f"it takes only {', '.join(schema.conditions)}" if schema.conditions
                     else "it is unconditional")
            raise ValueError(f"{name}: this {schema.family} model does not take {name!r} ({takes}); "
                             f"drop {name!r} from the request")
    unknown = sorted(set(fields) - set(schema.fields))
    if unknown:
        raise ValueError(f"unknown request field(s) {unknown} for this {schema.family} model "
                         f"({KIND_DOES[schema.kind]}); valid: {', '.join(schema.fields)}")


def _parse_generate(fields: dict, schema: RequestSchema) -> dict:
    if "labels" in fields and "prompt" in fields:
        raise ValueError("labels, prompt: send one of them, not both")
    conditions = {name: _as_list(fields[name]) for name in schema.conditions if name in fields}
    # Without a count, a list of labels or prompts says how many images are wanted.
    given = next((len(v) for v in conditions.values() if isinstance(v, list)), 16)
    count, seed = _scalar(fields.get("count", given)), _scalar(fields.get("seed", 0))
    if not _is_int(count) or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count: must be an integer in 1..{MAX_COUNT}, got {count!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    parsed = {"count": int(count), "seed": int(seed)}
    for name, value in conditions.items():
        parsed[name] = CONDITION_PARSERS[name](value, int(count), schema)
    return parsed


def _parse_labels(labels: Any, count: int, schema: RequestSchema) -> list[int]:
    if not isinstance(labels, list) or not all(_is_int(v) for v in labels):
        raise ValueError(f"labels: must be a list of integer class ids, one per image, got {labels!r}")
    if len(labels) != count:
        raise ValueError(f"labels: need one class id per image ({count}), got {len(labels)}")
    bad = sorted({int(v) for v in labels if not 0 <= v < len(schema.classes)})
    if bad:
        raise ValueError(f"labels: class ids must be in 0..{len(schema.classes) - 1} "
                         f"({schema.describe_classes()}), got {bad}")
    return [int(v) for v in labels]


def _parse_prompt(prompt: Any, count: int, schema: RequestSchema) -> list[str]:
    """One prompt per image; the model itself says which words it understands."""
    if isinstance(prompt, list) and len(prompt) == 1:  # a JSON client's way to send one prompt for all
        prompt = prompt[0]
    prompts = [prompt] * count if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt: must be one string for all images or a list of one string per image, "
                         f"got {prompt!r}")
    if len(prompts) != count:
        raise ValueError(f"prompt: need one string for all images or one per image ({count}), got {len(prompts)}")
    if not all(p.strip() for p in prompts):
        raise ValueError("prompt: must not be empty; name a class, e.g. 'ankle boot'")
    return prompts


def _parse_reconstruct(fields: dict, schema: RequestSchema) -> dict:
    if "images" not in fields:
        raise ValueError(f"images: missing; send uint8 images N×{schema.channels}×{schema.image_size}×"
                         f"{schema.image_size} to this {schema.family} model")
    output = _scalar(fields.get("output", "reconstruction"))
    if output not in OUTPUTS:
        raise ValueError(f"output: must be one of {', '.join(OUTPUTS)}, got {output!r}")
    return {"images": _parse_images(fields["images"], schema), "output": output}


def _parse_images(images: Any, schema: RequestSchema) -> np.ndarray:
    expected = (schema.channels, schema.image_size, schema.image_size)
    array = np.asarray(images)
    if array.dtype != np.uint8:
        # JSON carries integers, not uint8: accept integer pixels that fit.
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"images: must be uint8 pixels 0..255, got dtype {array.dtype}")
        array = array.astype(np.uint8)
    if array.ndim != 4:
        raise ValueError(f"images: must be 4-d N×C×H×W, got shape {array.shape} "
                         f"(one image is 1×{schema.channels}×{schema.image_size}×{schema.image_size})")
    if tuple(array.shape[1:]) != expected:
        raise ValueError(f"images: this {schema.family} model takes N×{'×'.join(map(str, expected))} images, "
                         f"got N×{'×'.join(map(str, array.shape[1:]))}")
    if not 1 <= array.shape[0] <= MAX_COUNT:
        raise ValueError(f"images: send 1..{MAX_COUNT} images per request, got {array.shape[0]}")
    return np.ascontiguousarray(array)


KIND_FIELDS: dict[str, tuple[str, ...]] = {"generate": ("count", "seed"), "reconstruct": ("images", "output")}
KIND_PARSERS: dict[str, Callable[[dict, RequestSchema], dict]] = {
    "generate": _parse_generate, "reconstruct": _parse_reconstruct}
# Every condition a generate family may declare, with its parser (value, count, schema) → value.
CONDITION_PARSERS: dict[str, Callable[[Any, int, RequestSchema], Any]] = {"labels": _parse_labels,
                                                                         "prompt": _parse_prompt}


def _scalar(value: Any) -> Any:
    """MLflow's scoring server sends scalars as 0-d arrays, and some clients as 1-element lists."""
    if isinstance(value, np.ndarray) and value.size == 1 and value.ndim <= 1:
        return value.reshape(()).item()
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _scalar(value[0])
    return value.item() if isinstance(value, np.generic) else value


def _as_list(value: Any) -> Any:
    """Arrays and tuples as lists of Python values; a 0-d array as its value; anything else unchanged."""
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

"""Requests to a registered model: which fields each task kind takes, and their validation.

A request arrives as a mapping (Python callers; `{"inputs": {...}}` to MLflow's scoring server,
which hands scalars over as 0-d arrays), as a one-row DataFrame (`dataframe_records`,
`dataframe_split`), and/or as MLflow `params` (the scalar fields). Every shape is merged into one
mapping and checked the same way; a ValueError names the field and says what to send.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np

from components.config import MAX_GUIDANCE

MAX_COUNT = 4096
OUTPUTS = ("reconstruction", "latent")
FORMATS = ("uint8", "png", "png_grid")
# What a model of each kind does, for errors telling a caller they sent the other kind's request.
KIND_DOES = {"generate": "it generates images",
             "reconstruct": "it reconstructs the images it is sent, it does not sample",
             "translate": "it makes one new image of each image it is sent, it does not sample"}


@dataclass(frozen=True)
class Field:
    """One request field: what it means, and the MLflow type it has as a `params` entry (None: the
    field is data, sent in `inputs` or a DataFrame only)."""

    doc: str
    param_type: str | None


FIELDS: dict[str, Field] = {
    "count": Field(f"number of images, 1..{MAX_COUNT} (default: one per label or prompt, else 16); with images "
                   f"to complete, completions per image (default 1)", "long"),
    "seed": Field("random seed >= 0 (default 0); the same request draws the same images", "long"),
    "labels": Field("one class id per image", None),
    "prompt": Field("a text naming a class, for all images (or a list of one text per image)", "string"),
    "images": Field("uint8 pixels N×C×H×W (integers 0..255)", None),
    "rows_given": Field("the top rows of each sent image to keep; the rows below them are drawn given them", "long"),
    "mask": Field("uint8 N×1×H×W, one per image, of 0 and 1 only: 1 where to fill in, 0 where the image is kept "
                  "(a mask of 0 only is fine)", None),
    "output": Field("'reconstruction' (default: uint8 images) or 'latent' (float32 codes N×latent_dim)", "string"),
    "format": Field("'uint8' (default: N×C×H×W pixels), 'png' (one base64 PNG per image) or "
                    "'png_grid' (one base64 PNG of all images)", "string"),
    "steps": Field("sampler steps, 1..the model's diffusion timesteps (default: the model's sample_steps); "
                   "fewer is faster and coarser", "long"),
    "guidance": Field(f"classifier-free guidance scale, 0..{MAX_GUIDANCE:g} (default: the model's guidance): 0 "
                      "ignores the condition, 1 is the conditional model, above 1 follows it more closely", "double"),
}
KIND_FIELDS: dict[str, tuple[str, ...]] = {"generate": ("count", "seed", "format"),
                                           "reconstruct": ("images", "output", "format"),
                                           "translate": ("images", "format")}
COMPLETION_FIELDS = ("images", "rows_given")


@dataclass(frozen=True)
class RequestSchema:
    """What a request to one registered model may hold, from its family's declaration and its data."""

    family: str
    kind: str
    conditions: tuple[str, ...]
    channels: int
    image_size: int
    classes: tuple[str, ...]
    # translate: C×H×W of the images a request sends, when not the model's own image shape (a 4x
    # super-resolver takes images a quarter the size); and whether a request also sends "mask"
    input_shape: tuple[int, int, int] | None = None
    takes_mask: bool = False
    completes: bool = False  # generate: also takes "images" and "rows_given" (complete their other rows)
    sampler_options: tuple[str, ...] = ()  # generate: sampler settings a request may set ("steps", "guidance")
    timesteps: int = 0  # a diffusion model's training timesteps: the most sampler steps

    @classmethod
    def of(cls, spec: dict) -> "RequestSchema":
        """The schema of a trained model from its model.json spec (family, config, channels, classes)."""
        from components.models import FAMILIES, class_names

        family = FAMILIES.get(spec["family"])
        unknown = sorted(set(family.conditions) - set(CONDITION_PARSERS))
        if unknown:
            raise ValueError(f"family {spec['family']!r} declares request condition(s) {unknown} that the "
                             f"registered model cannot parse; known: {', '.join(CONDITION_PARSERS)}")
        unknown = sorted(set(family.sampler_options) - set(SAMPLER_OPTION_PARSERS))
        if unknown:
            raise ValueError(f"family {spec['family']!r} declares sampler option(s) {unknown} that the registered "
                             f"model cannot parse; known: {', '.join(SAMPLER_OPTION_PARSERS)}")
        classes = class_names(spec["num_classes"], spec.get("classes"))
        input_shape = None
        if family.input_shape is not None:
            input_shape = tuple(family.input_shape(family.config.model_validate(spec["config"]), int(spec["channels"])))
        return cls(family=spec["family"], kind=family.kind, conditions=tuple(family.conditions),
                   channels=int(spec["channels"]), image_size=int(spec["config"]["image_size"]),
                   classes=tuple(classes), input_shape=input_shape, takes_mask=family.takes_mask,
                   completes=family.completes, sampler_options=tuple(family.sampler_options),
                   timesteps=int(spec["config"].get("timesteps", 0)))

    @property
    def fields(self) -> tuple[str, ...]:
        return (*KIND_FIELDS[self.kind], *(("mask",) if self.takes_mask else ()),
                *(COMPLETION_FIELDS if self.completes else ()), *self.conditions, *self.sampler_options)

    @property
    def image_shape(self) -> str:
        """C×H×W of the images the model makes."""
        return f"{self.channels}×{self.image_size}×{self.image_size}"

    @property
    def sent_shape(self) -> tuple[int, int, int]:
        """C×H×W of the images a request sends."""
        return self.input_shape or (self.channels, self.image_size, self.image_size)

    @property
    def sent_note(self) -> str:
        """What a caller sending images of the wrong size should know: a model that enlarges its
        inputs takes the low-resolution images, not images of the size it returns."""
        side = self.sent_shape[-1]
        if side >= self.image_size:
            return ""
        return (f" (the low-resolution inputs, {self.image_size // side}x smaller than the "
                f"N×{self.image_shape} images it returns)")

    def describe_classes(self) -> str:
        return ", ".join(f"{i} {name}" for i, name in enumerate(self.classes))

    @cached_property
    def vocabulary(self):
        """The words a prompted model of these classes understands (the same table the model builds)."""
        from components.models.text import Vocabulary

        return Vocabulary(list(self.classes))


def parse_request(request: Any, schema: RequestSchema, params: dict | None = None) -> dict:
    """The request's fields (from `request` and MLflow `params`), checked against `schema` and
    normalised (defaults filled, scalars unwrapped, one prompt per image)."""
    fields = merge_params(_as_mapping(request), params)
    _check_field_names(fields, schema)
    parsed = KIND_PARSERS[schema.kind](fields, schema)
    parsed["format"] = _parse_format(fields, parsed)
    return parsed


def merge_params(fields: dict, params: dict | None) -> dict:
    """`fields` with the request's MLflow params added. MLflow fills every param the schema declares
    and the request left out with its default, None, so None means "not sent"."""
    merged = dict(fields)
    for name, value in (params or {}).items():
        if value is None:
            continue
        if name in merged and not _same(merged[name], value):
            raise ValueError(f"{name}: sent in both the input ({_short(_scalar(merged[name]))}) and params "
                             f"({_short(value)}); send it once")
        merged[name] = value
    return merged


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(_scalar(a)), np.asarray(_scalar(b))))
    except (TypeError, ValueError):
        return False


def _as_mapping(request: Any) -> dict:
    if hasattr(request, "to_dict"):  # pandas DataFrame: one row is one request
        request = request.to_dict(orient="records")
    if isinstance(request, list) and all(isinstance(r, dict) for r in request):  # records, or {"inputs": [{...}]}
        if len(request) != 1:
            raise ValueError(f"request: send one request (one row, one record) per call, got {len(request)}")
        request = request[0]
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
    unknown = sorted(set(fields) - set(schema.fields), key=str)
    if unknown:
        raise ValueError(f"unknown request field(s) {unknown} for this {schema.family} model "
                         f"({KIND_DOES[schema.kind]}); valid: {', '.join(schema.fields)}")


def _parse_generate(fields: dict, schema: RequestSchema) -> dict:
    if schema.completes and any(name in fields for name in COMPLETION_FIELDS):
        return _parse_completion(fields, schema)
    if "labels" in fields and "prompt" in fields:
        raise ValueError("labels, prompt: send one of them, not both")
    conditions = {name: _one_instance(_as_list(fields[name])) for name in schema.conditions if name in fields}
    # Without a count, a list of labels or prompts says how many images are wanted.
    given = next(((name, len(v)) for name, v in conditions.items() if isinstance(v, list)), None)
    count = _scalar(fields.get("count", 16 if given is None else given[1]))
    if not _is_int(count) or not 1 <= count <= MAX_COUNT:
        sent = "count" if "count" in fields or given is None else f"count (one per item of {given[0]})"
        raise ValueError(f"{sent}: must be an integer in 1..{MAX_COUNT}, got {_short(count)}")
    parsed = {"count": int(count), "seed": _parse_seed(fields)}
    for name, value in conditions.items():
        parsed[name] = CONDITION_PARSERS[name](value, int(count), schema)
    for name in schema.sampler_options:
        if name in fields:
            parsed[name] = SAMPLER_OPTION_PARSERS[name](_scalar(fields[name]), schema)
    return parsed


def _parse_steps(steps: Any, schema: RequestSchema) -> int:
    if not _is_int(steps) or not 1 <= steps <= schema.timesteps:
        raise ValueError(f"steps: must be an integer in 1..{schema.timesteps} (this model's diffusion timesteps), "
                         f"got {_short(steps)}")
    return int(steps)


def _parse_guidance(guidance: Any, schema: RequestSchema) -> float:
    number = isinstance(guidance, (int, float, np.integer, np.floating)) and not isinstance(guidance, (bool, np.bool_))
    if not number or not 0 <= guidance <= MAX_GUIDANCE:  # NaN fails the comparison too
        raise ValueError(f"guidance: must be a number in 0..{MAX_GUIDANCE:g} (0: unconditional, 1: conditional, "
                         f"more: closer to the condition), got {_short(guidance)}")
    return float(guidance)


def _parse_seed(fields: dict) -> int:
    seed = _scalar(fields.get("seed", 0))
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {_short(seed)}")
    return int(seed)


def _parse_completion(fields: dict, schema: RequestSchema) -> dict:
    """images (N of the model's shape), the top rows_given rows of each kept, `count` completions of each."""
    last = schema.image_size - 1
    for name in COMPLETION_FIELDS:
        if name not in fields:
            raise ValueError(f"{name}: missing; to complete images send both images (uint8 N×{schema.image_shape}) "
                             f"and rows_given (the top rows to keep, 1..{last}), or neither to sample new images")
    images = _parse_images(fields["images"], schema)
    rows = _scalar(fields["rows_given"])
    if not _is_int(rows) or not 1 <= rows <= last:
        raise ValueError(f"rows_given: must be an integer in 1..{last} (the top rows kept; the rows below are "
                         f"drawn), got {_short(rows)}")
    most = MAX_COUNT // len(images)
    count = _scalar(fields.get("count", 1))
    if not _is_int(count) or not 1 <= count <= most:
        raise ValueError(f"count: completions per image, an integer in 1..{most} (at most {MAX_COUNT} images per "
                         f"answer, and {len(images)} were sent), got {_short(count)}")
    return {"images": images, "rows_given": int(rows), "count": int(count), "seed": _parse_seed(fields)}


def _parse_labels(labels: Any, count: int, schema: RequestSchema) -> list[int]:
    if not isinstance(labels, list):
        raise ValueError(f"labels: must be a list of integer class ids, one per image, got {_short(labels)}")
    if len(labels) != count:  # before looking at each label: a huge list is refused at once
        raise ValueError(f"labels: need one class id per image ({count}), got {len(labels)}")
    if not all(_is_int(v) for v in labels):
        raise ValueError(f"labels: must be a list of integer class ids, one per image, got {_short(labels)}")
    bad = sorted({int(v) for v in labels if not 0 <= v < len(schema.classes)})
    if bad:
        raise ValueError(f"labels: class ids must be in 0..{len(schema.classes) - 1} "
                         f"({schema.describe_classes()}), got {_short(bad)}")
    return [int(v) for v in labels]


def _parse_prompt(prompt: Any, count: int, schema: RequestSchema) -> list[str]:
    """One prompt per image, each naming one class in words the model understands."""
    if isinstance(prompt, list) and len(prompt) == 1:  # a JSON client's way to send one prompt for all
        prompt = prompt[0]
    prompts = [prompt] * count if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list):
        raise ValueError(f"prompt: must be one string for all images or a list of one string per image, "
                         f"got {_short(prompt)}")
    if len(prompts) != count:
        raise ValueError(f"prompt: need one string for all images or one per image ({count}), got {len(prompts)}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt: must be one string for all images or a list of one string per image, "
                         f"got {_short(prompt)}")
    if not all(p.strip() for p in prompts):
        raise ValueError("prompt: must not be empty; name a class, e.g. 'ankle boot'")
    for text in dict.fromkeys(prompts):
        schema.vocabulary.class_of(text)  # ValueError "prompt: …" unless it names exactly one class
    return prompts


def _parse_reconstruct(fields: dict, schema: RequestSchema) -> dict:
    if "images" not in fields:
        raise ValueError(f"images: missing; send uint8 images N×{schema.image_shape} to this {schema.family} model")
    output = _scalar(fields.get("output", "reconstruction"))
    if not isinstance(output, str) or output not in OUTPUTS:
        raise ValueError(f"output: must be one of {', '.join(OUTPUTS)}, got {_short(output)}")
    return {"images": _parse_images(fields["images"], schema), "output": output}


def _parse_translate(fields: dict, schema: RequestSchema) -> dict:
    if "images" not in fields:
        raise ValueError(f"images: missing; send uint8 images N×{_dims(schema.sent_shape)} to this {schema.family} "
                         f"model{schema.sent_note}")
    images = _parse_images(fields["images"], schema, schema.sent_shape, schema.sent_note)
    return {"images": images, **({"mask": _parse_mask(fields, schema, len(images))} if schema.takes_mask else {})}


def _parse_mask(fields: dict, schema: RequestSchema, count: int) -> np.ndarray:
    """One 0/1 mask per image, uint8 N×1×H×W: 1 where to fill in. 0/255 is refused rather than read
    as 0/1, so a caller never has a mask of another convention silently misread."""
    expected = (1, *schema.sent_shape[1:])
    if "mask" not in fields:
        raise ValueError(f"mask: missing; send one uint8 mask N×{_dims(expected)} per image, 1 where to fill in")
    mask = _request_array(fields["mask"], "mask", expected, schema, what="mask", count=count)
    if mask.dtype.kind not in "iub" or (mask.size and (mask.min() < 0 or mask.max() > 1)):
        raise ValueError(f"mask: must be integers 0 or 1 (1 where to fill in; not 0/255), got dtype {mask.dtype}"
                         + (f" with values {mask.min()}..{mask.max()}" if mask.dtype.kind in "iuf" else ""))
    return np.ascontiguousarray(mask.astype(np.uint8, copy=False))


def _parse_images(images: Any, schema: RequestSchema, expected: tuple[int, int, int] | None = None,
                  note: str = "") -> np.ndarray:
    """The request's images: uint8 N×`expected` (default: the model's own image shape), N in 1..MAX_COUNT."""
    array = _request_array(images, "images", expected or (schema.channels, schema.image_size, schema.image_size),
                           schema, note=note)
    if array.dtype != np.uint8:
        # JSON carries integers, not uint8: accept integer pixels that fit.
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"images: must be uint8 pixels 0..255, got dtype {array.dtype}"
                             + (f" with values {array.min()}..{array.max()}" if array.dtype.kind in "iuf" else ""))
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def _request_array(value: Any, field: str, expected: tuple[int, int, int], schema: RequestSchema,
                   what: str = "image", note: str = "", count: int | None = None) -> np.ndarray:
    """A request field as an array N×`expected`, N being `count` if given, else in 1..MAX_COUNT; its
    values are the caller's to check. `note` tells a caller what the expected shape means."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nested lists
        raise ValueError(f"{field}: must be a regular N×{_dims(expected)} array; "
                         f"the nested lists have different lengths") from None
    if array.ndim == 5 and array.shape[0] == 1:  # {"instances": [{"images": ...}]}: one instance
        array = array[0]
    if array.ndim != 4:
        raise ValueError(f"{field}: must be 4-d N×C×H×W, got shape {array.shape} (one {what} is 1×{_dims(expected)})")
    if count is not None and array.shape[0] != count:
        raise ValueError(f"{field}: need one {what} per image ({count}), got {array.shape[0]}")
    if tuple(array.shape[1:]) != expected:
        raise ValueError(f"{field}: this {schema.family} model takes N×{_dims(expected)} {what}s{note}, "
                         f"got N×{_dims(array.shape[1:])}")
    if not 1 <= array.shape[0] <= MAX_COUNT:
        raise ValueError(f"{field}: send 1..{MAX_COUNT} images per request, got {array.shape[0]}")
    return array


def _dims(shape) -> str:
    return "×".join(map(str, shape))


def _parse_format(fields: dict, parsed: dict) -> str:
    fmt = _scalar(fields.get("format", "uint8"))
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {_short(fmt)}")
    if fmt != "uint8" and parsed.get("output") == "latent":
        raise ValueError(f"format: {fmt!r} encodes images; output 'latent' returns float codes, send format 'uint8'")
    return fmt


KIND_PARSERS: dict[str, Callable[[dict, RequestSchema], dict]] = {
    "generate": _parse_generate, "reconstruct": _parse_reconstruct, "translate": _parse_translate}
# Every sampler option a generate family may declare, with its parser (value, schema) → value.
SAMPLER_OPTION_PARSERS: dict[str, Callable[[Any, RequestSchema], Any]] = {"steps": _parse_steps,
                                                                          "guidance": _parse_guidance}
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


def _one_instance(value: Any) -> Any:
    """[[a, b, c]] → [a, b, c]: MLflow's `instances` format adds a leading axis of one instance."""
    return value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _short(value: Any, limit: int = 120) -> str:
    """repr of a value sent by a caller, cut short: an error must not echo a huge request back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"

"""params.yaml → typed, frozen config objects.

params.yaml is the only place hyperparameters live: the classes below have no defaults, refuse
unknown keys, and every error names the key's path and the rule it broke. This module knows no
registry (families, sources, metrics import it); components.params validates a whole file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator

from components.evaluation.gating import GatingMetric

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A bad params.yaml or override; the message lists every problem with its key path."""


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class ArchiveLimits(Frozen):
    """Bounds on what an archive source may hold; past them the rest is refused, each refusal reported."""

    max_members: int = Field(gt=0)
    max_bytes: int = Field(gt=0)  # uncompressed, all members together


class DataConfig(Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    source: str
    path: str
    image_size: int = Field(ge=8, le=512)
    channels: Literal[1, 3]
    resize: bool
    test_fraction: float = Field(gt=0, lt=1)
    limit_per_split: int | None = Field(gt=0)
    max_pixels: int = Field(gt=0)
    max_file_bytes: int = Field(gt=0)  # larger files are refused before they are read
    shard_size: int = Field(gt=0)
    follow_symlinks: bool  # false: symlinks are refused (reported); true: followed, but never out of data.path
    archive: ArchiveLimits


def heads_divide_dim(value: int, info: ValidationInfo) -> int:
    """A transformer config's `heads` validator: each head takes dim / heads channels."""
    dim = info.data.get("dim")
    if dim is not None and dim % value:
        raise ValueError(f"must divide dim ({dim}); pick a divisor of it or change dim")
    return value


class ViTConfig(Frozen):
    """The Vision Transformer evaluator (classifier.arch: vit): its sizes and its own training recipe."""

    patch: int = Field(gt=0)      # square patches of the 28×28 input; must divide 28 (4 → 7×7 tokens)
    stem: Literal["patch", "conv"]  # the embedding: one patch × patch conv, or stride-2 3×3 convs (patch 2 or 4)
    dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    heads: int = Field(gt=0)      # must divide dim
    mlp_ratio: float = Field(gt=0)
    pool: Literal["cls", "mean"]  # a class token, or the mean of the patch tokens
    epochs: int = Field(gt=0)
    lr: float = Field(gt=0)       # AdamW's peak, reached linearly over `warmup` of the steps, then cosine to 0
    weight_decay: float = Field(ge=0)
    warmup: float = Field(gt=0, lt=1)
    label_smoothing: float = Field(ge=0, lt=1)
    crop_pad: int = Field(ge=0, le=8)  # random crop of the image padded by this many pixels; 0: none
    flip: bool                    # random horizontal flips

    @field_validator("patch")
    @classmethod
    def _divides_input(cls, value: int) -> int:
        if 28 % value:  # components.evaluation.classifier.INPUT_SIZE
            raise ValueError("must divide the classifier's 28×28 input: use 1, 2, 4, 7, 14 or 28")
        return value

    @field_validator("stem")
    @classmethod
    def _conv_stem_halves_to_the_grid(cls, value: str, info: ValidationInfo) -> str:
        patch = info.data.get("patch")
        if value == "conv" and patch not in (None, 2, 4):
            raise ValueError(f"conv halves the input to the token grid, so it needs patch 2 or 4 (patch is {patch}); "
                             "change patch or use stem patch")
        return value

    _heads_divide_dim = field_validator("heads")(heads_divide_dim)


class ClassifierConfig(Frozen):
    arch: Literal["cnn", "vit"]
    epochs: int = Field(gt=0)     # epochs, lr and width are the CNN's; the ViT's are under `vit`
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    width: int = Field(gt=0)
    seed: int = Field(ge=0)
    vit: ViTConfig | None         # null only when arch is cnn, which ignores it

    @field_validator("vit")
    @classmethod
    def _vit_when_chosen(cls, value: ViTConfig | None, info: ValidationInfo) -> ViTConfig | None:
        if value is None and info.data.get("arch") == "vit":
            raise ValueError("missing: arch is vit, so add the vit section (patch, dim, depth, ...)")
        return value


class TrainConfig(Frozen):
    """Fields every model family shares; each family's module extends it."""

    family: str
    image_size: Literal[28, 64]
    epochs: int | float = Field(gt=0)  # a fraction trains that share of one epoch (a slow family on a CPU)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    seed: int = Field(ge=0)
    ema_decay: float = Field(ge=0, lt=1)  # 0 = no average: the live weights are evaluated and registered
    precision: Literal["fp32", "bf16"]    # bf16: autocast of the forward passes, fp32 master weights
    channels_last: bool
    compile: bool                         # torch.compile the model's submodules


class TrackingConfig(Frozen):
    """How often training logs and checkpoints: it never changes the weights, so DVC and the
    checkpoint's resume key leave it out (a section of its own, not part of train.<name>)."""

    log_every: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    sentinel_every: int = Field(gt=0)  # steps between mode-collapse checks of a generate-kind model's samples


class DivergenceConfig(Frozen):
    """What training does when a loss, gradient or weight turns NaN/Inf: return to the last good
    checkpoint with the learning rate times lr_factor, at most max_rollbacks times, then fail.
    It changes the weights when it fires, so the train stages list it among their params."""

    max_rollbacks: int = Field(ge=0)
    lr_factor: float = Field(gt=0, lt=1)


class BootstrapConfig(Frozen):
    """Percentile intervals of FID and KID: both sets resampled `samples` times; the interval holds 1 − alpha."""

    samples: int = Field(ge=10)
    alpha: float = Field(gt=0, lt=1)


class InceptionConfig(Frozen):
    """The standard FID/KID on the Inception-v3 of the published tables (the `inception` metric)."""

    mode: Literal["auto", "always", "never"]  # auto: `samples` where CUDA is present, else `cpu_samples`
    samples: int = Field(ge=2)  # test images, and as many samples; the published protocol is 10,000
    cpu_samples: int = Field(ge=0)  # under auto without a GPU; 0 skips the metric (and says so)

    @field_validator("cpu_samples")
    @classmethod
    def _zero_or_two(cls, value: int) -> int:
        if value == 1:
            raise ValueError("FID needs at least 2 images: use 0 (skip on a CPU) or 2 and more")
        return value


class AugmentConfig(Frozen):
    """The `augment` metric: a classifier trained on a few real images per class, with and without a
    conditional model's samples, both tested on the held-out reference."""

    real_per_class: int = Field(gt=0)
    generated_per_class: int = Field(gt=0)


MAX_GUIDANCE = 20.0  # the largest classifier-free guidance scale a model, a request or the evaluation's sweep takes


class GuidanceSweepConfig(Frozen):
    """The guidance trade-off of models sampled with classifier-free guidance (components.evaluation.guidance)."""

    scales: list[float] = Field(min_length=1)  # beside the model's own default guidance
    samples: int = Field(gt=1)  # per scale, the classes asked for in turn

    @field_validator("scales")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(not 0 <= v <= MAX_GUIDANCE for v in value):
            raise ValueError(f"each scale must be in 0..{MAX_GUIDANCE:g} (0: unconditional, 1: conditional)")
        return value


class EvaluateConfig(Frozen):
    metrics: list[str] = Field(min_length=1)
    num_samples: int = Field(gt=1)
    kid_subset_size: int = Field(gt=1)
    nearest_k: int = Field(gt=0)  # k of the k-NN balls of precision/recall and density/coverage
    bootstrap: BootstrapConfig
    grid_size: int = Field(gt=0, le=256)
    seed: int = Field(ge=0)
    inception: InceptionConfig
    augment: AugmentConfig
    guidance: GuidanceSweepConfig


# What a registered model does with a request (components/models/base.py documents each).
TaskKind = Literal["generate", "reconstruct", "translate"]


class RegistryConfig(Frozen):
    # Lower is better for fid and kid, higher for psnr, ssim and psnr_gain (translate models): the
    # direction is declared once, in components/evaluation/gating.py, and the gate follows it. One
    # metric for every model, or one per task kind: {generate: fid, reconstruct: fid, translate: psnr}.
    gating_metric: GatingMetric | dict[TaskKind, GatingMetric]
    # One margin per metric: FID is in the tens, KID in thousandths, so a FID margin is no KID margin.
    min_improvement: dict[GatingMetric, Annotated[float, Field(ge=0)]]

    # When the champion cannot be scored under today's protocol (its code no longer loads), a
    # challenger is promoted on its own score if it is no worse than this bound: at most it for a
    # lower-is-better metric (a ceiling), at least it for a higher-is-better one (a floor).
    ceiling: dict[GatingMetric, Annotated[float, Field(ge=0)]]  # psnr_gain's natural floor is 0: no worse than the baseline

    @field_validator("min_improvement", "ceiling")
    @classmethod
    def _value_for_gating_metric(cls, value: dict, info: ValidationInfo) -> dict:
        gating = info.data.get("gating_metric")
        for metric in [gating] if isinstance(gating, str) else (gating or {}).values():
            if metric not in value:
                raise ValueError(f"no value for the gating metric {metric!r}; add registry.{info.field_name}.{metric}")
        return value

    def metric_for(self, kind: str) -> str:
        """The metric that gates models of task kind `kind`."""
        if isinstance(self.gating_metric, str):
            return self.gating_metric
        if kind not in self.gating_metric:
            raise ConfigError(f"registry.gating_metric names no metric for {kind} models; add "
                              f"registry.gating_metric.{kind} (e.g. {'psnr' if kind == 'translate' else 'fid'})")
        return self.gating_metric[kind]


class DeployConfig(Frozen):
    """Where and when `retrain` runs as a Prefect deployment (`genpipe deploy` / `genpipe serve`), and
    whether each model trains as its own flow run on a work pool. Read by no stage: it moves work,
    it never changes an output."""

    cron: str = Field(pattern=r"^\S+( \S+){4,5}$")  # Prefect parses it fully when deploying
    timezone: str
    work_pool: str = Field(min_length=1)         # the pool whose workers run the retrain flow itself
    training_pool: str | None = Field(min_length=1)  # None: every model trains in the retrain run's process
    source: str = Field(min_length=1)            # where workers get the code: a git URL, or a folder ("." = here)
    model_timeout_s: int = Field(gt=0)           # a model's train + evaluate on a worker, before it counts as failed

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone; use an IANA name such as UTC or Europe/Berlin") from None
        return value


class Params(Frozen):
    data: DataConfig
    classifier: ClassifierConfig
    train: dict[str, SerializeAsAny[TrainConfig]]  # dumped with each family's own fields
    # Models trained on the latents of an autoencoder of `train` (ldm): their own stage pair in dvc.yaml,
    # train_latent@X and evaluate_latent@X, whose deps hold the autoencoder's trained model (the DAG edge)
    latent: dict[str, SerializeAsAny[TrainConfig]]
    tracking: TrackingConfig
    divergence: DivergenceConfig
    evaluate: EvaluateConfig
    registry: RegistryConfig
    deploy: DeployConfig

    def registered_name(self, model: str) -> str:
        return registered_name(self.data.name, model)

    @property
    def models(self) -> dict[str, TrainConfig]:
        """Every model, of `train` and of `latent`, by name (names are unique across the two)."""
        return {**self.train, **self.latent}

    def section_of(self, name: str) -> str:
        """The params section a model is configured in: "train" or "latent"."""
        return "latent" if name in self.latent else "train"

    def stage_of(self, group: str, name: str) -> str:
        """The address of a model's stage of a dvc.yaml group ("train", "evaluate"): `train@vae`, or
        `train_latent@ldm` for a model of the latent section (which has stage groups of its own)."""
        return f"{group}_latent@{name}" if name in self.latent else f"{group}@{name}"

    def model(self, name: str) -> TrainConfig:
        if name not in self.models:
            raise ConfigError(f"train.{name}: no such model in {PARAMS_FILE}'s train or latent section; "
                              f"configured: {sorted(self.models)}")
        return self.models[name]


def registered_name(data_name: str, model: str) -> str:
    """The registry's name of a model trained on a dataset, e.g. fashion-mnist-dcgan."""
    return f"{data_name}-{model}"


_RULES = {
    "greater_than": lambda c: f"must be > {c['gt']:g}",
    "greater_than_equal": lambda c: f"must be >= {c['ge']:g}",
    "less_than": lambda c: f"must be < {c['lt']:g}",
    "less_than_equal": lambda c: f"must be <= {c['le']:g}",
    "literal_error": lambda c: f"must be one of {c['expected']}",
    "string_pattern_mismatch": lambda c: f"must match {c['pattern']}",
}


def describe_error(err: dict, prefix: tuple = ()) -> str:
    path = ".".join(str(p) for p in (*prefix, *err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key; remove it or fix its spelling"
    if kind == "missing":
        return f"{path}: missing; add it to {PARAMS_FILE}"
    rule = _RULES[kind](err.get("ctx", {})) if kind in _RULES else err["msg"].removeprefix("Value error, ")
    return f"{path}: {rule}, got {err['input']!r}"


def _yaml():
    from ruamel.yaml import YAML  # only the CLI needs it, not a registered model loading its config class

    yaml = YAML()  # round-trip: keeps the comments of params.yaml when overrides are written back
    yaml.preserve_quotes = True
    return yaml


def read_params_raw(path: str | os.PathLike = PARAMS_FILE) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project folder that holds {PARAMS_FILE}")
    try:
        return _yaml().load(path.read_text())
    except Exception as exc:  # ruamel raises many error types; all mean the same to the user
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def apply_profile(raw: Any, profile: str | os.PathLike) -> Any:
    """Merge a profile (a partial params file, e.g. profiles/zoo.yaml adding models to `train`) into a
    raw params mapping, in place: mappings merge key by key, any other value replaces."""
    path = Path(profile)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ConfigError(f"--profile {path.stem}: no {path}; profiles here: {known or 'none'}")
    overlay = read_params_raw(path)
    if not isinstance(overlay, dict):
        raise ConfigError(f"{path}: must be a mapping of params sections, got {type(overlay).__name__}")

    def merge(node, extra, where: str) -> None:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value, f"{where}{key}.")
            elif key not in node and not where.startswith(("train.", "latent.")):
                raise ConfigError(f"{path}: {where}{key}: unknown key; a profile may add models to train and latent, "
                                  f"otherwise only change keys {PARAMS_FILE} has")
            else:
                node[key] = value

    merge(raw, overlay, "")
    return raw


def apply_overrides(raw: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw params mapping, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.dcgan.epochs=1")
        *parents, leaf = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--set {key}: unknown key {'.'.join(parents[: i + 1])}")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"--set {key}: unknown key; see {PARAMS_FILE} for the valid ones")
        from ruamel.yaml import YAML

        node[leaf] = YAML(typ="safe").load(text)
    return raw


def write_params_raw(raw: Any, path: str | os.PathLike = PARAMS_FILE) -> None:
    """Atomically rewrite params.yaml (so DVC sees the same values the run used)."""
    path = Path(path)
    buf = io.StringIO()
    _yaml().dump(raw, buf)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def config_hash(*configs: BaseModel) -> str:
    """Stable short hash of resolved configs, recorded as lineage."""
    blob = json.dumps([c.model_dump(mode="json") for c in configs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

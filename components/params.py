"""A whole params.yaml, validated: the config types (components.config) checked against the
registries of model families, data sources and metrics, each of which checks its own names.

The one module where config and the registries meet, so neither imports the other.
"""
from __future__ import annotations

import os
import re
from typing import Any

from pydantic import ValidationError

from components.config import PARAMS_FILE, ConfigError, Params, TrainConfig, describe_error, read_params_raw
from components.data.sources import SOURCES
from components.evaluation.metrics import METRICS
from components.models import FAMILIES

MODEL_NAME = r"^[a-z0-9][a-z0-9_-]*$"  # model names become shell arguments, paths and registry names


def parse_params(raw: Any) -> Params:
    """Validate a params mapping; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE}: must be a mapping of sections, got {type(raw).__name__}")
    problems: list[str] = []
    sections = {section: _model_configs(raw, section, problems) for section in MODEL_SECTIONS}
    try:
        params = Params.model_validate({**raw, **{k: v for k, v in sections.items() if v is not None}})
    except ValidationError as exc:
        problems += [describe_error(e) for e in exc.errors()]
    else:
        problems += filter(None, [SOURCES.problem("data.source", params.data.source)])
        problems += filter(None, [METRICS.problem("evaluate.metrics", m) for m in params.evaluate.metrics])
        problems += filter(None, [_gating_problem(params, name) for name in params.models])
        problems += _section_problems(params, raw)
    if problems:
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(problems))
    return params


MODEL_SECTIONS = ("train", "latent")  # the params sections of models: name → a family's config


def _model_configs(raw: dict, section: str, problems: list[str]) -> dict[str, TrainConfig] | None:
    """The section's models, each validated by its family's config class (None: not a mapping, which
    Params itself then reports)."""
    section_raw = raw.get(section)
    if not isinstance(section_raw, dict):
        return None
    configs: dict[str, TrainConfig] = {}
    for name, entry in section_raw.items():
        if not isinstance(name, str) or not re.fullmatch(MODEL_NAME, name):
            problems.append(f"{section}.{name}: model name must match {MODEL_NAME}, got {name!r}")
            continue
        family = entry.get("family") if isinstance(entry, dict) else None
        problem = FAMILIES.problem(f"{section}.{name}.family", family)
        if problem:
            problems.append(problem)
            continue
        try:
            configs[name] = FAMILIES.get(family).config.model_validate(entry)
        except ValidationError as exc:
            problems += [describe_error(e, (section, name)) for e in exc.errors()]
    return configs


def _section_problems(params: Params, raw: dict) -> list[str]:
    """A model in the section its family belongs to (built on an autoencoder: latent, else train), under a
    name no model of the other section has, its autoencoder a model of train with a latent grid and the
    same image size (one that failed its own validation is reported once, as that)."""
    problems = [f"latent.{name}: train.{name} exists too; a model name must be unique across train and latent"
                for name in params.latent if name in params.train]
    for section, models in (("train", params.train), ("latent", params.latent)):
        for name, cfg in models.items():
            builds_on = FAMILIES.get(cfg.family).parts
            if builds_on and section == "train":
                problems.append(f"train.{name}: the {cfg.family} family is trained on another model's latents "
                                f"({', '.join(builds_on)}); move it to the latent section")
            elif not builds_on and section == "latent":
                problems.append(f"latent.{name}: the {cfg.family} family is trained on images, not on another "
                                f"model; move it to the train section")
            for part in builds_on:
                if getattr(cfg, part) not in raw["train"] or getattr(cfg, part) in params.train:
                    problems += filter(None, [_autoencoder_problem(params, f"{section}.{name}", part)])
    return problems


def _autoencoder_problem(params: Params, path: str, part: str) -> str | None:
    cfg = params.model(path.partition(".")[2])
    name = getattr(cfg, part)
    if name not in params.train:
        return f"{path}.{part}: no model {name!r} in train; name one of {sorted(params.train)}"
    family = FAMILIES.get(params.train[name].family)
    if not family.spatial_latent:
        grids = [f for f in FAMILIES.names() if FAMILIES.get(f).spatial_latent]
        return (f"{path}.{part}: train.{name} is a {family.name}, which has no latent grid to train on; name a "
                f"model of family {' or '.join(grids)}")
    if params.train[name].image_size != cfg.image_size:
        return (f"{path}.image_size: {cfg.image_size}, but its {part} train.{name} makes "
                f"{params.train[name].image_size} px images; set the same image_size for both")
    return None


def _gating_problem(params: Params, name: str) -> str | None:
    """Why a model (train.<name>, latent.<name>) has no gating metric (a per-kind registry.gating_metric
    without its kind), or None: said before training, not at registration."""
    try:
        params.registry.metric_for(FAMILIES.get(params.models[name].family).kind)
    except ConfigError as exc:
        return f"{exc} ({params.section_of(name)}.{name})"
    return None


def built_on(params: Params, name: str) -> list[str]:
    """The models a model is trained on (an ldm's autoencoder); [] for a model trained on images."""
    cfg = params.model(name)
    return [getattr(cfg, part) for part in FAMILIES.get(cfg.family).parts]


def unfit_models(params: Params) -> dict[str, str]:
    """The models whose family cannot learn from the dataset (data.channels), each with why: colorize on a
    grey dataset, and a model built on an autoencoder that cannot train. The retrain flow skips them with
    that reason instead of failing them."""
    unfit = {name: why for name, cfg in params.models.items()
             if (why := FAMILIES.get(cfg.family).unfit_for(params.data.channels))}
    for name in params.latent:  # nothing to train on when its autoencoder cannot train
        unfit.update({name: f"it is trained on {base}, which is not trained: {unfit[base]}"
                      for base in built_on(params, name) if base in unfit and name not in unfit})
    return unfit


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    return parse_params(read_params_raw(path))

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
    train_raw = raw.get("train")
    train: dict[str, TrainConfig] = {}
    if isinstance(train_raw, dict):
        for name, section in train_raw.items():
            if not isinstance(name, str) or not re.fullmatch(MODEL_NAME, name):
                problems.append(f"train.{name}: model name must match {MODEL_NAME}, got {name!r}")
                continue
            family = section.get("family") if isinstance(section, dict) else None
            problem = FAMILIES.problem(f"train.{name}.family", family)
            if problem:
                problems.append(problem)
                continue
            try:
                train[name] = FAMILIES.get(family).config.model_validate(section)
            except ValidationError as exc:
                problems += [describe_error(e, ("train", name)) for e in exc.errors()]
    try:
        params = Params.model_validate({**raw, "train": train} if isinstance(train_raw, dict) else raw)
    except ValidationError as exc:
        problems += [describe_error(e) for e in exc.errors()]
    else:
        problems += filter(None, [SOURCES.problem("data.source", params.data.source)])
        problems += filter(None, [METRICS.problem("evaluate.metrics", m) for m in params.evaluate.metrics])
        problems += filter(None, [_gating_problem(params, name) for name in params.train])
    if problems:
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(problems))
    return params


def _gating_problem(params: Params, name: str) -> str | None:
    """Why train.<name> has no gating metric (a per-kind registry.gating_metric without its kind), or None:
    said before training, not at registration."""
    try:
        params.registry.metric_for(FAMILIES.get(params.train[name].family).kind)
    except ConfigError as exc:
        return f"{exc} (train.{name})"
    return None


def unfit_models(params: Params) -> dict[str, str]:
    """The models of `train` whose family cannot learn from the dataset (data.channels), each with why:
    colorize on a grey dataset. The retrain flow skips them with that reason instead of failing them."""
    return {name: why for name, cfg in params.train.items()
            if (why := FAMILIES.get(cfg.family).unfit_for(params.data.channels))}


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    return parse_params(read_params_raw(path))

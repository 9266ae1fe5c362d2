"""Register evaluated models and promote challengers with registry aliases (never stages)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from components.config import RegistryConfig
from components.tracking.runs import client, ensure_experiment

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_TAG = "model_md5"  # lineage tag, DVC hash of the model folder: one registered version per artefact
REQUIREMENTS = ["torch", "torchvision", "safetensors", "numpy", "pydantic", "pillow", "tqdm"]


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    decision: str  # "unchanged", "champion", "promoted" or "kept"
    reason: str


def _find_version(c, name: str, model_md5: str):
    for mv in c.search_model_versions(f"name='{name}'"):
        if mv.tags.get(ARTIFACT_TAG) == model_md5:
            return mv
    return None


def _champion(c, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(metric: str, new_value: float, champion_value: float | None, margin: float) -> tuple[bool, str]:
    """Whether a challenger takes `champion`: `metric` lower by more than `margin`."""
    if champion_value is None:
        return True, f"first version: no champion yet ({metric} {new_value:.4g})"
    if new_value < champion_value - margin:
        return True, f"{metric} {new_value:.4g} beats champion's {champion_value:.4g} by more than {margin}"
    return False, f"{metric} {new_value:.4g} does not beat champion's {champion_value:.4g} by {margin}"


def register_model(name: str, model_dir: Path, eval_dir: Path, lineage: dict[str, str], cfg: RegistryConfig,
                   rescore: Callable[[str], float]) -> Registration:
    """Log the model as a pyfunc in its training run, create a registry version with lineage tags,
    then move aliases. Nothing in the registry changes until the version exists completely.

    lineage["evaluator_md5"] names the classifier whose features the metrics use; a champion judged
    by another one is re-scored with `rescore(version)` before the comparison.
    """
    import mlflow

    c = client()
    mlflow.set_tracking_uri(c.tracking_uri)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    value = metrics.get(cfg.gating_metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{eval_dir / 'metrics.json'}: '{cfg.gating_metric}' (registry.gating_metric) is "
                         f"{value!r}; it must be a finite number (is it in evaluate.metrics?)")
    existing = _find_version(c, name, lineage["model_md5"])
    if existing is not None and "promotion.decision" in existing.tags:
        return Registration(name, str(existing.version), "unchanged", "this model artefact is registered already")
    mv = existing if existing is not None else _log_and_register(c, name, model_dir, eval_dir, lineage, metrics)

    champion = _champion(c, name)
    champion_value = None
    if champion is not None and str(champion.version) != str(mv.version):
        if champion.tags.get("evaluator_md5") == lineage["evaluator_md5"]:
            champion_value = float(champion.tags[f"metric.{cfg.gating_metric}"])
        else:  # other evaluator features, other FID scale: judge the champion again on today's
            champion_value = rescore(str(champion.version))
            c.set_model_version_tag(name, mv.version, "promotion.champion_rescored", str(champion_value))
    elif champion is not None:
        champion = None  # a retried registration of the champion itself
    promote, reason = decide(cfg.gating_metric, float(value), champion_value, cfg.min_improvement)
    decision = ("champion" if champion is None else "promoted") if promote else "kept"
    c.set_model_version_tag(name, mv.version, "promotion.decision", decision)
    c.set_model_version_tag(name, mv.version, "promotion.reason", reason)
    if champion is not None:
        c.set_registered_model_alias(name, CHALLENGER, mv.version)
    if promote:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
    return Registration(name, str(mv.version), decision, reason)


def _log_and_register(c, name: str, model_dir: Path, eval_dir: Path, lineage: dict[str, str], metrics: dict):
    import mlflow

    run_id = lineage.get("training_run_id")
    if not run_id or not _run_exists(c, run_id):
        run_id = c.create_run(ensure_experiment(name), run_name="registration",
                              tags={"genpipe.note": "training run not found in this tracking store"}).info.run_id
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"eval.{k}": float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(eval_dir / "grid.png"), artifact_path="eval")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # models-from-code: nothing pickled
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(Path(__file__).resolve().parents[1])],  # the components package
            pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in REQUIREMENTS],
        )
    return mlflow.register_model(info.model_uri, name, tags={
        **lineage, **{f"metric.{k}": str(v) for k, v in metrics.items()}})


def _run_exists(c, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
        return True
    except MlflowException:
        return False

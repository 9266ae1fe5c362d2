"""Register evaluated models and promote challengers with registry aliases (never stages).

One registration makes its writes in this order, so that a rerun after a crash at any point ends
in the state an uninterrupted run leaves:
  1. the version, created once per model artefact with its lineage, metrics and score protocol
     as tags in one call (found again by its `model_md5` tag: never a second version of it);
  2. `promotion.pending`: the decision, the champion version it was judged against, the evidence
     (both intervals, the protocol) and the audit record of a promotion;
  3. the aliases: `challenger`, then `champion` if promoted and only if the champion is still the
     one compared with (otherwise ChampionChanged, and a retry judges against the new one);
  4. the audit record of a promotion (components/tracking/audit.py), the evidence tags,
     `promotion.reason`, then `promotion.decision`: a version with a decision is finished;
  5. `promotion.pending` deleted.
A rerun finds a pending decision and finishes it rather than judging again.

Steps 2-5 (and a person's promote / rollback) run under the model's champion lock
(components/tracking/champion_lock.py): MLflow has no conditional alias update, so two registrations
judging at once would both compare with the same champion and the last alias write would win.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from components.config import RegistryConfig
from components.evaluation import gating
from components.evaluation.protocol import INCEPTION_PROTOCOL_FILE, PROTOCOL_FILE, protocol_key
from components.tracking import audit
from components.tracking.champion_lock import ChampionLock, champion_lock, is_lock_model
from components.tracking.runs import client, ensure_experiment, has_error_code
from components.tracking.stale_scores import mark_stale

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_TAG = "model_md5"  # lineage tag, DVC hash of the model folder: one registered version per artefact
PENDING, REASON, DECISION = "promotion.pending", "promotion.reason", "promotion.decision"
EVIDENCE = ("challenger_ci", "champion_ci", "rule", "protocol")  # promotion.<key> tags, from the plan
REQUIREMENTS = ["torch", "torchvision", "safetensors", "numpy", "pydantic", "pillow", "tqdm"]


class ChampionChanged(RuntimeError):
    """The champion moved while a challenger was judged against it; registering again judges anew."""


class ChampionUnscorable(RuntimeError):
    """The champion cannot be scored under today's protocol (its code no longer loads, say)."""


class RegistryRequestError(ValueError):
    """A promote / rollback request the user can fix (unknown model or version, nothing to roll back)."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    decision: str  # "unchanged", "champion", "promoted" or "kept"
    reason: str
    report: str | None = None  # where the new version's HTML report was logged (flows/retrain.py)


def _is_not_found(exc: Exception) -> bool:
    return has_error_code(exc, "RESOURCE_DOES_NOT_EXIST")


def _find_version(c, name: str, model_md5: str):
    versions = c.search_model_versions(f"name='{name}' and tags.{ARTIFACT_TAG}='{model_md5}'")
    return min(versions, key=lambda mv: int(mv.version)) if versions else None


def _champion(c, name: str):
    """The champion's version, or None when the model or the alias does not exist. Any other
    failure (timeout, 5xx, 403) propagates: an unreadable champion is not an absent one."""
    from mlflow.exceptions import MlflowException

    try:
        model = c.get_registered_model(name)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise
    champion = model.aliases.get(CHAMPION)
    return None if champion is None else c.get_model_version(name, str(champion))


Interval = tuple[float, float]


def decide(metric: str, new_value: float, champion_value: float | None, margin: float, *,
           new_ci: Interval | None, champion_ci: Interval | None) -> tuple[bool, str]:
    """Whether a challenger takes `champion`, better in the metric's declared direction (lower for
    FID and KID, higher for PSNR and SSIM: components/evaluation/gating.py). It must beat the
    champion by more than `margin` and, when both carry a confidence interval, beyond both: its
    interval wholly on the better side of the champion's (touching is not beyond). Without both
    intervals the margin alone decides, and the reason says so."""
    if champion_value is None:
        return True, f"first version: no champion yet ({metric} {new_value:.4g}{_show(new_ci)})"
    if not (math.isfinite(new_value) and math.isfinite(champion_value)):
        return False, (f"{metric} {new_value:.4g} vs champion's {champion_value:.4g}: not both finite numbers, "
                       f"no comparison; the champion stays")
    scores = f"{metric} {new_value:.4g}{_show(new_ci)} vs champion's {champion_value:.4g}{_show(champion_ci)}"
    by_margin = gating.beats(metric, new_value, champion_value, margin)
    margin_text = f"{'better' if by_margin else 'not better'} by more than the margin {margin:g}"
    missing = [side if ci is None else f"{side} (not a finite low <= high)"
               for side, ci in (("challenger", new_ci), ("champion", champion_ci)) if not _valid(ci)]
    if missing:
        return by_margin, f"{scores}: {margin_text}; no interval for the {' and '.join(missing)}, margin alone decides"
    apart = gating.intervals_apart(metric, new_ci, champion_ci)
    intervals_text = "intervals apart" if apart else "intervals overlap or touch"
    return by_margin and apart, f"{scores}: {intervals_text}, {margin_text}"


def _valid(ci: Interval | None) -> bool:
    return ci is not None and all(math.isfinite(v) for v in ci) and ci[0] <= ci[1]


def _show(ci: Interval | None) -> str:
    return f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci is not None else ""


def interval(values: dict, metric: str) -> Interval | None:
    """`metric`'s confidence interval from metrics.json values or `metric.*` tags; None when absent."""
    low, high = values.get(f"{metric}_ci_low"), values.get(f"{metric}_ci_high")
    if low is None or high is None:
        return None
    return float(low), float(high)


def model_kind(model_dir: Path) -> str:
    """The task kind of a trained model (its family's), which picks its gating metric."""
    from components.models import FAMILIES

    return FAMILIES.get(json.loads((Path(model_dir) / "model.json").read_text())["family"]).kind


def registered_already(name: str, model_md5: str) -> Registration | None:
    """The version of this model artefact, when it is registered and its promotion decided; else None
    (register_model then registers it, or finishes a decision a crash left pending)."""
    mv = _find_version(client(), name, model_md5)
    if mv is None or DECISION not in mv.tags or PENDING in mv.tags:
        return None
    return Registration(name, str(mv.version), "unchanged", "this model artefact is registered already")


def register_model(name: str, model_dir: Path, eval_dir: Path, lineage: dict[str, str], cfg: RegistryConfig,
                   rescore: Callable[[str, dict], float | dict]) -> Registration:
    """Log the model as a pyfunc in its training run, create its registry version, judge it against
    the champion under the same score protocol and move the aliases (see the module docstring).

    eval_dir holds the evaluation's metrics.json and the protocol they were measured under.
    `rescore(version, protocol)` measures a champion's gating metric under that protocol when none
    of its stored scores was; it raises ChampionUnscorable when the champion cannot be scored.
    """
    import mlflow

    c = client()
    mlflow.set_tracking_uri(c.tracking_uri)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    protocol_file = eval_dir / PROTOCOL_FILE
    if not protocol_file.is_file():
        raise FileNotFoundError(f"{protocol_file}: missing; evaluate the model again (genpipe evaluate)")
    protocol = json.loads(protocol_file.read_text())
    metric = cfg.metric_for(model_kind(model_dir))
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{eval_dir / 'metrics.json'}: '{metric}' (registry.gating_metric) is "
                         f"{value!r}; it must be a finite number (is it in evaluate.metrics?)")
    mv = _find_version(c, name, lineage[ARTIFACT_TAG])
    if mv is not None and DECISION in mv.tags:
        if PENDING in mv.tags:  # crashed after its decision, before the clean-up
            c.delete_model_version_tag(name, mv.version, PENDING)
        return Registration(name, str(mv.version), "unchanged", "this model artefact is registered already")
    if mv is None:
        tags = {**lineage, "protocol": json.dumps(protocol, sort_keys=True), "protocol_key": protocol_key(protocol)}
        inception_file = eval_dir / INCEPTION_PROTOCOL_FILE  # the Inception scores' protocol, or why none
        if inception_file.is_file():
            tags["inception_protocol"] = json.dumps(json.loads(inception_file.read_text()), sort_keys=True)
        mv = _log_and_register(c, name, model_dir, eval_dir, tags, metrics)
    with champion_lock(c, name) as lock:  # judged and applied while no other registration moves the champion
        mv = c.get_model_version(name, mv.version)  # as it is now, after waiting for the lock
        if DECISION in mv.tags and PENDING not in mv.tags:  # another process registered this artefact meanwhile
            return Registration(name, str(mv.version), "unchanged", "this model artefact is registered already")
        plan = json.loads(mv.tags[PENDING]) if PENDING in mv.tags else _judge(
            c, name, mv, metric, float(value), interval(metrics, metric), cfg, protocol, rescore)
        # After the champion's re-score (named in its note), before the decision tag that ends the version:
        # a rerun after a crash in between marks again.
        mark_stale(c, name, protocol, str(mv.version))
        _apply(c, name, str(mv.version), plan, lock)
    return Registration(name, str(mv.version), plan["decision"], plan["reason"])


def _judge(c, name: str, mv, metric: str, value: float, value_ci: Interval | None, cfg: RegistryConfig,
           protocol: dict, rescore: Callable[[str, dict], float | dict]) -> dict:
    """Decide against today's champion on `metric` and record the decision as pending on the version."""
    margin = cfg.min_improvement[metric]
    champion = _champion(c, name)
    if champion is not None and str(champion.version) == str(mv.version):
        champion = None  # made champion by hand before it was judged: nothing to compare with
    plan: dict = {"champion": None if champion is None else str(champion.version), "protocol": protocol_key(protocol),
                  "challenger_ci": value_ci, "champion_ci": None}
    if champion is None:
        promote, reason = decide(metric, value, None, margin, new_ci=value_ci, champion_ci=None)
    else:
        try:
            champion_value, champion_ci = _champion_score(c, name, champion, metric, protocol, rescore)
        except ChampionUnscorable as exc:  # no comparison possible: the challenger's own score decides
            promote, reason = _judge_alone(metric, value, cfg.ceiling[metric])
            reason = (f"champion v{champion.version} cannot be scored under today's protocol ({str(exc)[:300]}); "
                      f"{reason}")
        else:
            promote, reason = decide(metric, value, champion_value, margin, new_ci=value_ci, champion_ci=champion_ci)
            plan["champion_score"], plan["champion_ci"] = champion_value, champion_ci
    plan["rule"] = (f"{metric} {gating.direction(metric)} by more than registry.min_improvement {margin:g}"
                    + (" and beyond both intervals" if _valid(value_ci) and _valid(plan["champion_ci"]) else ""))
    rolled_back = _rolled_back(c, name, str(mv.version))
    if promote and rolled_back is not None:  # a person's decision stands over the gate's
        promote = False
        reason = (f"{reason}; but {rolled_back['who']} rolled v{mv.version} back at {rolled_back['at'][:19]}Z "
                  f"({rolled_back['why'][:200]}): not promoted again automatically (genpipe promote does it)")
    plan["decision"] = ("champion" if champion is None else "promoted") if promote else "kept"
    plan["reason"] = reason
    if promote:
        plan["audit"] = audit.new_record("register", plan["champion"], str(mv.version), reason)
    c.set_model_version_tag(name, mv.version, PENDING, json.dumps(plan, sort_keys=True))
    return plan


def _judge_alone(metric: str, value: float, bound: float) -> tuple[bool, str]:
    """The challenger's own score against registry.ceiling.<metric>: a ceiling for a lower-is-better
    metric, a floor for a higher-is-better one (the key keeps one name for both)."""
    promote = gating.within_bound(metric, value, bound)
    key = f"registry.ceiling.{metric} {bound:g}"
    if gating.bound_name(metric) == "ceiling":
        return promote, f"{metric} {value:.4g} {'is within' if promote else 'exceeds'} {key}"
    return promote, (f"{metric} {value:.4g} {'reaches' if promote else 'falls short of'} {key} "
                     f"(a floor: higher {metric} is better)")


def _rolled_back(c, name: str, version: str) -> dict | None:
    """The latest audit record of a person rolling `version` back from champion, if any."""
    records = [r for r in audit.trail(c.get_registered_model(name)) if r["action"] == "rollback" and r["from"] == version]
    return records[-1] if records else None


def _moved_since(c, name: str, plan: dict) -> dict | None:
    """An audit record written after the plan's own (a person's promote or rollback, say, while a crashed
    registration's plan was pending): the plan no longer describes today's registry."""
    if "audit" not in plan:
        return None
    key, record = plan["audit"]
    later = [r for k, r in ((k, json.loads(v)) for k, v in c.get_registered_model(name).tags.items()
                            if k.startswith(audit.PREFIX)) if k != key and r["at"] > record["at"]]
    return max(later, key=lambda r: r["at"]) if later else None


def _champion_score(c, name: str, champion, metric: str, protocol: dict,
                    rescore: Callable[[str, dict], float | dict]) -> tuple[float, Interval | None]:
    """The champion's `metric` and its interval under `protocol`: from its registration scores, a
    stored re-score, or a new re-score, stored on the champion with its protocol so it is measured
    once. `rescore` returns the metric's value, or the scores with their interval (`<metric>_ci_low`,
    `<metric>_ci_high`); a champion registered before intervals has none."""
    key = protocol_key(protocol)
    if champion.tags.get("protocol_key") == key and f"metric.{metric}" in champion.tags:
        tags = {k.removeprefix("metric."): v for k, v in champion.tags.items() if k.startswith("metric.")}
        return float(tags[metric]), interval(tags, metric)
    stored = {k.removeprefix(f"score.{key}."): v for k, v in champion.tags.items() if k.startswith(f"score.{key}.")}
    if metric in stored:
        return float(stored[metric]), interval(stored, metric)
    if "unscorable" in stored:  # tried before: the champion's code cannot do it
        raise ChampionUnscorable(stored["unscorable"])
    try:
        scores = rescore(str(champion.version), protocol)
        scores = dict(scores) if isinstance(scores, dict) else {metric: scores}
        if metric not in scores:  # a re-score that could not measure it
            raise ChampionUnscorable(f"re-scoring gave no {metric} (got {', '.join(sorted(scores)) or 'nothing'})")
        value = float(scores[metric])
        if not math.isfinite(value):
            raise ChampionUnscorable(f"re-scored {metric} is {value}")
    except ChampionUnscorable as exc:
        c.set_model_version_tag(name, champion.version, f"score.{key}.unscorable", str(exc)[:500])
        raise
    c.set_model_version_tag(name, champion.version, f"score.{key}.protocol", json.dumps(protocol, sort_keys=True))
    ci = interval(scores, metric)
    if ci is not None:  # before the value: a stored value is what marks the re-score done
        c.set_model_version_tag(name, champion.version, f"score.{key}.{metric}_ci_low", repr(ci[0]))
        c.set_model_version_tag(name, champion.version, f"score.{key}.{metric}_ci_high", repr(ci[1]))
    c.set_model_version_tag(name, champion.version, f"score.{key}.{metric}", repr(value))
    return value, ci


def _apply(c, name: str, version: str, plan: dict, lock: ChampionLock) -> None:
    """Move the aliases as planned, unless the champion changed since the plan was made."""
    lock.check()
    moved = _moved_since(c, name, plan)
    if moved is not None:
        c.delete_model_version_tag(name, version, PENDING)
        raise ChampionChanged(
            f"{name}: {moved['who']} moved the champion ({moved['action']} to v{moved['to']}) after v{version} was "
            f"judged; register again to judge v{version} against today's champion")
    current = _champion(c, name)
    current_version = None if current is None else str(current.version)
    if current_version not in (plan["champion"], version):
        c.delete_model_version_tag(name, version, PENDING)
        raise ChampionChanged(
            f"{name}: the champion is v{current_version} now, v{plan['champion']} when v{version} was judged "
            f"(another registration ran meanwhile); register again to judge v{version} against v{current_version}")
    if plan["champion"] is not None:
        c.set_registered_model_alias(name, CHALLENGER, version)
    if plan["decision"] != "kept" and current_version != version:
        c.set_registered_model_alias(name, CHAMPION, version)
    if "audit" in plan:  # after the move it records; the same key again when a rerun finishes the plan
        audit.write(c, name, *plan["audit"])
    lock.confirm()  # the aliases moved while the lock was held, or LockLost reports the race (after the record)
    for key in EVIDENCE:
        if key in plan:  # plans left pending by a version before intervals have none
            value = plan[key]
            c.set_model_version_tag(name, version, f"promotion.{key}", value if isinstance(value, str) else
                                    "none" if value is None else json.dumps(value))
    if "champion_score" in plan:
        c.set_model_version_tag(name, version, "promotion.champion_score", repr(plan["champion_score"]))
    c.set_model_version_tag(name, version, REASON, plan["reason"])
    c.set_model_version_tag(name, version, DECISION, plan["decision"])
    c.delete_model_version_tag(name, version, PENDING)


def promote(name: str, version: str, reason: str) -> dict:
    """A person makes `version` the champion; returns the audit record written."""
    c = client()
    _check_request(c, name, reason)  # before locking: no lock model is left for a mistyped name
    with champion_lock(c, name) as lock:
        try:
            c.get_model_version(name, version)
        except Exception as exc:
            if not has_error_code(exc, "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise RegistryRequestError(f"VERSION {version}: {name} has no version {version} "
                                       f"(versions: {_versions(c, name)})") from None
        current = _champion(c, name)
        if current is not None and str(current.version) == str(version):
            raise RegistryRequestError(f"VERSION {version}: already {name}'s champion")
        return _move_champion(c, name, lock, "promote", None if current is None else str(current.version),
                              str(version), reason)


def rollback(name: str, reason: str) -> dict:
    """The champion goes back to the one before it in the audit trail; returns the record written."""
    c = client()
    _check_request(c, name, reason)
    with champion_lock(c, name) as lock:
        model = c.get_registered_model(name)
        current = _champion(c, name)
        if current is None:
            raise RegistryRequestError(f"NAME {name}: has no champion to roll back")
        stack = audit.champion_stack(audit.trail(model))
        if stack and stack[-1] != str(current.version):
            raise RegistryRequestError(
                f"NAME {name}: its champion v{current.version} was set outside genpipe (the audit trail ends at "
                f"v{stack[-1]}); choose the version: genpipe promote {name} VERSION --reason ...")
        if len(stack) < 2:
            raise RegistryRequestError(
                f"NAME {name}: no previous champion recorded in its audit trail (genpipe history {name}); "
                f"choose the version: genpipe promote {name} VERSION --reason ...")
        target = stack[-2]
        try:
            c.get_model_version(name, target)
        except Exception as exc:
            if not _is_not_found(exc):
                raise
            raise RegistryRequestError(f"NAME {name}: the previous champion v{target} was deleted; "
                                       f"choose the version: genpipe promote {name} VERSION --reason ...") from None
        return _move_champion(c, name, lock, "rollback", str(current.version), target, reason)


def history(name: str) -> list[dict]:
    """NAME's audit records, oldest first."""
    return audit.trail(_registered(client(), name))


def _move_champion(c, name: str, lock: ChampionLock, action: str, from_version: str | None, to_version: str,
                   reason: str) -> dict:
    key, record = audit.new_record(action, from_version, to_version, reason)
    lock.check()
    c.set_registered_model_alias(name, CHAMPION, to_version)
    audit.write(c, name, key, record)
    lock.confirm()
    return record


def _check_request(c, name: str, reason: str) -> None:
    if not reason.strip():
        raise RegistryRequestError("reason: empty; say why the champion changes (it goes to the audit trail)")
    _registered(c, name)


def _registered(c, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(name)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
    models = sorted(m.name for m in c.search_registered_models() if not is_lock_model(m.name))
    raise RegistryRequestError(f"NAME {name}: no registered model of that name (registered: "
                               f"{', '.join(models) or 'none'})")


def _versions(c, name: str) -> str:
    versions = sorted(int(mv.version) for mv in c.search_model_versions(f"name='{name}'"))
    return ", ".join(map(str, versions)) or "none"


def pip_requirements() -> list[str]:
    """Exact pins PyPI can serve: a local build's version (2.14.1+cu128) pins its public part."""
    from packaging.version import Version

    return [f"{pkg}=={Version(version(pkg)).public}" for pkg in REQUIREMENTS]


def _log_and_register(c, name: str, model_dir: Path, eval_dir: Path, tags: dict[str, str], metrics: dict):
    import mlflow

    from components.tracking import model_signature
    from components.tracking.model_files import MODEL_FILES
    from components.tracking.requests import RequestSchema

    schema = RequestSchema.of(json.loads((model_dir / "model.json").read_text()))
    run_id = tags.get("training_run_id")
    if not run_id or not _run_exists(c, run_id):
        run_id = c.create_run(ensure_experiment(name), run_name="registration",
                              tags={"genpipe.note": "training run not found in this tracking store"}).info.run_id
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="genpipe-model-") as served:
        mlflow.log_metrics({f"eval.{k}": float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(eval_dir / "grid.png"), artifact_path="eval")
        if (eval_dir / "pictures").is_dir():  # latent traversals and projections
            mlflow.log_artifacts(str(eval_dir / "pictures"), artifact_path="eval/pictures")
        for file in MODEL_FILES:  # what loading needs; not the live weights or the run record beside them
            shutil.copy2(model_dir / file, Path(served) / file)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # models-from-code: nothing pickled
            artifacts={"model_dir": served},
            code_paths=[str(Path(__file__).resolve().parents[1])],  # the components package
            pip_requirements=pip_requirements(),
            signature=model_signature.signature(schema),
            input_example=model_signature.input_example(schema),
        )
    mv = mlflow.register_model(info.model_uri, name, tags={
        **tags, **{f"metric.{k}": str(v) for k, v in metrics.items()}})
    c.update_model_version(name, mv.version, description=model_signature.description(schema))
    return mv


def _run_exists(c, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
        return True
    except MlflowException as exc:
        if _is_not_found(exc):
            return False
        raise

"""A score's protocol: everything that must be equal for two scores to be compared.

Two FIDs are comparable only when they come from the same evaluator, the same reference images,
the same sample count and seed, the same metric code and the same compared image size. The
registry stores each score with its protocol and its key, and re-scores a champion whose stored
scores were measured under another protocol.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from components.config import EvaluateConfig
from components.evaluation.classifier import INPUT_SIZE

PROTOCOL_FILE = "protocol.json"  # beside an evaluation's metrics.json
INCEPTION_PROTOCOL_FILE = "inception.json"  # the Inception scores' own protocol: not part of the gate's


def score_protocol(cfg: EvaluateConfig, *, evaluator: str, dataset_version: str, image_size: int,
                   degradation: dict | None = None) -> dict:
    """`degradation`: a translate model's (TranslationModel.degradation): its PSNR/SSIM compare only
    with scores of the same task. Other kinds have none, and their protocol no such field."""
    from components.pipeline import source_hash

    protocol = {
        "evaluator": evaluator,  # content hash of the classifier whose features the metrics use
        "reference": {"dataset_version": dataset_version, "split": "test", "seed": cfg.seed},
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "kid_subset_size": cfg.kid_subset_size,
        "nearest_k": cfg.nearest_k,
        "bootstrap": cfg.bootstrap.model_dump(),  # B and alpha set the stored intervals
        "metrics_code": source_hash("evaluation"),
        "image_size": image_size,  # samples and real images are compared at this size ...
        "classifier_input": INPUT_SIZE,  # ... then resized to the classifier's input
    }
    if degradation is not None:
        protocol["degradation"] = degradation
    return protocol


def degradation_protocol(model) -> dict:
    """What a translate model's inputs are made by: its family's degradation settings and the source
    of the module that draws them (a change to how masks are drawn changes the task)."""
    import inspect

    source = Path(inspect.getsourcefile(type(model))).read_bytes()
    return {"settings": model.degradation(), "code": hashlib.sha256(source).hexdigest()[:16]}


def protocol_key(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]


def evaluate_config(protocol: dict, metrics: list[str]) -> EvaluateConfig:
    """The evaluation settings that measure `metrics` under `protocol` (to score another model): the
    domain metrics the gate can use. The Inception and augment metrics and the guidance sweep are off."""
    return EvaluateConfig(metrics=metrics, num_samples=protocol["num_samples"], seed=protocol["seed"],
                          kid_subset_size=protocol["kid_subset_size"], nearest_k=protocol["nearest_k"],
                          bootstrap=protocol["bootstrap"], grid_size=1,
                          inception={"mode": "never", "samples": 2, "cpu_samples": 0},
                          augment={"real_per_class": 1, "generated_per_class": 1},
                          guidance={"scales": [0.0], "samples": 2})


def folder_hash(folder: Path) -> str:
    """Content hash of the files in a folder (the evaluator classifier's weights and spec)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]

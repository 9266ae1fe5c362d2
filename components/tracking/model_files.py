"""A trained model on disk: model.safetensors (weights) + model.json (family, config, data)."""
from __future__ import annotations

import json
from pathlib import Path

from components.models import FAMILIES, GenerativeModel, build_model
from components.training.checkpoint import load_weights, save_weights, write_json


MODEL_FILES = ("model.safetensors", "model.json")  # what loading a trained model needs: all a registered version holds


def save_trained_model(model: GenerativeModel, spec: dict, out_dir: Path) -> None:
    save_weights(model, out_dir / "model.safetensors")
    write_json(spec, out_dir / "model.json")


def load_trained_model(model_dir: Path, device: str = "cpu") -> GenerativeModel:
    spec_path = model_dir / "model.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path}: missing; train the model first (genpipe train NAME)")
    model = model_of_spec(json.loads(spec_path.read_text()))
    return load_weights(model, model_dir / "model.safetensors").to(device).eval()


def model_of_spec(spec: dict) -> GenerativeModel:
    """The (untrained) model a model.json describes, with the parts it is built on (an ldm's autoencoder,
    whose own spec it records under `parts`), ready for its model.safetensors, which holds them all."""
    parts = {field: model_of_spec(part) for field, part in spec.get("parts", {}).items()}
    cfg = FAMILIES.get(spec["family"]).config.model_validate(spec["config"])
    return build_model(cfg, spec["channels"], spec["num_classes"], spec.get("classes"), parts=parts or None)

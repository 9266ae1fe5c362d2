"""How good do a family's samples get for how much CPU time? Trains one model configuration on the
real training split and scores its samples (EMA and live weights) as the evaluate stage does:
evaluator FID at evaluate.num_samples, classes covered. The numbers behind params.yaml's defaults.

    .venv/bin/python benchmarks/sample_quality.py --model dcgan --set epochs=3 --set ema_decay=0.999

--model names an entry of params.yaml's train section; --set overrides its fields. The evaluator is
the classifier stage's model under params.yaml's classifier section, trained once and cached in
--cache (default .genpipe/bench).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import apply_overrides, read_params_raw  # noqa: E402
from components.data.sources import SOURCES  # noqa: E402
from components.evaluation.classifier import Classifier, train_classifier  # noqa: E402
from components.evaluation.evaluate import evaluate_model  # noqa: E402
from components.models import FAMILIES, build_model  # noqa: E402
from components.params import parse_params  # noqa: E402
from components.training.checkpoint import load_weights, save_weights  # noqa: E402
from components.training.trainer import Trainer  # noqa: E402


def evaluator(params, train_images, train_labels, num_classes: int, cache: Path) -> Classifier:
    path = cache / f"classifier-{params.classifier.seed}-{params.classifier.epochs}-{params.classifier.width}.safetensors"
    model = Classifier(train_images.shape[1], num_classes, params.classifier.width)
    if path.is_file():
        return load_weights(model, path).eval()
    model = train_classifier(train_images, train_labels, num_classes, params.classifier, progress=False)
    save_weights(model, path)
    return model.eval()


def fit_timed(model, cfg, name: str, images: torch.Tensor, labels: torch.Tensor,
              log_every: int = 200) -> tuple[Trainer, float]:
    """Train `model` as the train stage does (the Trainer, preloaded images), printing its logs:
    (the trainer, which holds the live weights, and the seconds it took)."""
    trainer = Trainer(model, cfg, name=name, log_every=log_every, progress=False,
                      log_fn=lambda values, step: print(f"  step {step}: " + " ".join(
                          f"{k}={v:.4g}" for k, v in values.items()), flush=True))
    start = time.perf_counter()
    trainer.fit(images, labels)
    return trainer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an entry of params.yaml's train section")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of train.<model>, e.g. epochs=3")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache", type=Path, default=ROOT / ".genpipe" / "bench")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = read_params_raw(ROOT / "params.yaml")
    apply_overrides(raw, [f"train.{args.model}.{item}" for item in args.set])
    params = parse_params(raw)
    cfg = params.model(args.model)

    data = SOURCES.get(params.data.source)(params.data)
    train, test = data.splits["train"], data.splits["test"]
    images, labels = torch.from_numpy(train.images.copy()), torch.from_numpy(train.labels.copy())
    real = torch.from_numpy(test.images.copy())
    args.cache.mkdir(parents=True, exist_ok=True)
    classifier = evaluator(params, images, labels, len(data.classes), args.cache)

    model = build_model(cfg, images.shape[1], len(data.classes), data.classes)
    trainer, train_s = fit_timed(model, cfg, args.model, images, labels)
    kind = FAMILIES.get(cfg.family).kind
    result = {"model": args.model, "set": args.set, "train_s": round(train_s, 1), "threads": args.threads}
    for weights in ("ema", "live") if cfg.ema_decay > 0 else ("live",):
        if weights == "live":
            model.load_state_dict(trainer.live_state_dict())
        scores = evaluate_model(model, classifier, real, params.evaluate, kind=kind)
        result[weights] = {k: round(v, 4) for k, v in scores.items()}
    print(json.dumps(result))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""The evaluator classifiers side by side: trains each `classifier.arch` (cnn, vit) as the classifier
stage does (train_classifier, params.yaml's classifier section) on the real training split and
prints arch, parameters, epochs, train time and accuracy on the test split. The numbers behind
params.yaml's classifier.vit settings (the issue's goal: the ViT at >= 92 % on Fashion-MNIST).

    nice -n 5 .venv/bin/python benchmarks/classifier_accuracy.py                  # both, as params.yaml says
    .venv/bin/python benchmarks/classifier_accuracy.py --arch vit --epochs 5 --set vit.dim=96

--epochs overrides the chosen arch's epochs (classifier.epochs for the CNN, classifier.vit.epochs
for the ViT); --set overrides any field of the classifier section; --limit trains on the first N
training images (a quick look, not the measurement).
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
from components.evaluation.classifier import ARCHS, accuracy, train_classifier  # noqa: E402
from components.params import parse_params  # noqa: E402

# where each arch's epochs live in the classifier section, and how to read them
EPOCHS = {"cnn": ("epochs", lambda cfg: cfg.epochs), "vit": ("vit.epochs", lambda cfg: cfg.vit.epochs)}


def measure(arch: str, overrides: list[str], epochs: int | None, data, limit: int | None) -> dict:
    raw = read_params_raw(ROOT / "params.yaml")
    key, epochs_of = EPOCHS[arch]
    extra = [] if epochs is None else [f"{key}={epochs}"]
    apply_overrides(raw, [f"classifier.{item}" for item in [f"arch={arch}", *overrides, *extra]])
    cfg = parse_params(raw).classifier
    train, test = data.splits["train"], data.splits["test"]
    images, labels = torch.from_numpy(train.images[:limit].copy()), torch.from_numpy(train.labels[:limit].copy())
    start = time.perf_counter()
    model = train_classifier(images, labels, len(data.classes), cfg, progress=False)
    train_s = time.perf_counter() - start
    test_accuracy = accuracy(model, torch.from_numpy(test.images.copy()), torch.from_numpy(test.labels.copy()))
    return {"arch": arch, "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": epochs_of(cfg),
            "train_images": images.shape[0], "train_s": round(train_s, 1), "test_accuracy": round(test_accuracy, 4),
            "config": cfg.model_dump()}


def table(rows: list[dict]) -> str:
    lines = ["| arch | parameters | epochs | train images | train time | test accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['arch']} | {r['parameters']:,} | {r['epochs']} | {r['train_images']:,} "
              f"| {r['train_s'] / 60:.1f} min | {100 * r['test_accuracy']:.2f} % |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS))
    parser.add_argument("--epochs", type=int, help="override the arch's epochs (default: params.yaml's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the classifier section, e.g. vit.dim=96")
    parser.add_argument("--limit", type=int, help="train on the first N training images only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="append each result as one JSON line to this file")
    args = parser.parse_args()
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    torch.set_num_threads(args.threads)
    params = parse_params(read_params_raw(ROOT / "params.yaml"))
    data = SOURCES.get(params.data.source)(params.data)
    rows = []
    for arch in args.arch:
        rows.append(measure(arch, args.set, args.epochs, data, args.limit))
        print(json.dumps(rows[-1]), flush=True)
        if args.json is not None:
            with args.json.open("a") as f:
                f.write(json.dumps({**rows[-1], "threads": args.threads}) + "\n")
    print(f"\nFashion-MNIST ({params.data.path}), torch {torch.__version__}, {args.threads} threads\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""iGPT on Fashion-MNIST: trains the igpt entry of profiles/modern.yaml on the real training split and
reports what its evaluation does, beside the baseline the issue names:

- test negative log-likelihood in bits/dim (the evaluate stage's reference subset of
  evaluate.num_samples test images) against a per-pixel histogram of the training images (the
  `nll` metric: each pixel's 256 values counted, Laplace-smoothed, pixels independent);
- how fast the KV-cache sampler draws images, and the evaluator FID of --samples samples against
  as many reference images (fewer than the evaluate stage's 5000 when --samples is smaller: FID
  rises as the sample count falls, so compare FIDs of equal counts only);
- with --figure, completions of held-out images' top halves (the lecture's picture): a row per
  class, its given half, --completions completions, the original.

    .venv/bin/python benchmarks/igpt_quality.py --figure docs/images/igpt.png --set igpt.epochs=0.2

The evaluator is the classifier stage's model under params.yaml's classifier section, trained once
and cached in --cache (default .genpipe/bench), as benchmarks/sample_quality.py does.
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

from components.config import apply_overrides, apply_profile, read_params_raw  # noqa: E402
from components.data.sources import SOURCES  # noqa: E402
from components.evaluation.evaluate import reference_subset  # noqa: E402
from components.evaluation.features import extract, fid  # noqa: E402
from components.evaluation.grid import sample_uint8, save_grid  # noqa: E402
from components.evaluation.metrics import METRICS, EvalContext  # noqa: E402
from components.evaluation.pictures import completion_rows  # noqa: E402
from components.models import build_model  # noqa: E402
from components.params import parse_params  # noqa: E402
from sample_quality import evaluator, fit_timed  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="igpt", help="an entry of the profile's train section")
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "modern.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL.FIELD=VALUE",
                        help="override a field of train.<model>, e.g. igpt.epochs=0.1")
    parser.add_argument("--samples", type=int, default=1000, help="samples drawn for the speed and FID")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache", type=Path, default=ROOT / ".genpipe" / "bench")
    parser.add_argument("--figure", type=Path, help="write the completions picture here (PNG)")
    parser.add_argument("--completions", type=int, default=5)
    parser.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = read_params_raw(ROOT / "params.yaml")
    apply_profile(raw, args.profile)
    apply_overrides(raw, [f"train.{item}" for item in args.set])
    params = parse_params(raw)

    data = SOURCES.get(params.data.source)(params.data)
    train, test = data.splits["train"], data.splits["test"]
    images, labels = torch.from_numpy(train.images.copy()), torch.from_numpy(train.labels.copy())
    test_images, test_labels = torch.from_numpy(test.images.copy()), torch.from_numpy(test.labels.copy())
    real = reference_subset(test_images, params.evaluate)
    cfg = params.model(args.model)
    model = build_model(cfg, images.shape[1], len(data.classes), data.classes)
    _, train_s = fit_timed(model, cfg, args.model, images, labels, log_every=100)
    result: dict = {"set": args.set, "threads": args.threads, "train_s": round(train_s, 1),
                    "parameters": sum(p.numel() for p in model.parameters())}
    model.eval()

    with torch.no_grad():
        scores = METRICS.get("nll")(EvalContext(model=model, classifier=None, real=real.float() / 127.5 - 1,
                                                fake=real[:0].float(), kid_subset_size=1, train_u8=images))
    result.update({k: round(v, 4) for k, v in scores.items()})
    print(f"test bits/dim {scores['nll_bits_per_dim']:.4f} (histogram {scores['histogram_bits_per_dim']:.4f})", flush=True)

    start = time.perf_counter()
    samples = sample_uint8(model, args.samples, seed=params.evaluate.seed)
    result["samples_per_s"] = round(args.samples / (time.perf_counter() - start), 1)
    args.cache.mkdir(parents=True, exist_ok=True)
    classifier = evaluator(params, images, labels, len(data.classes), args.cache)
    count = min(args.samples, real.shape[0])
    result[f"fid_at_{count}"] = round(fid(extract(classifier, real[:count].float() / 127.5 - 1).features,
                                          extract(classifier, samples[:count].float() / 127.5 - 1).features), 2)
    print(json.dumps(result), flush=True)
    if args.figure is not None:
        picks = [int(torch.nonzero(test_labels == k)[0]) for k in range(len(data.classes))]
        save_grid(completion_rows(model, test_images[picks], args.completions, params.evaluate.seed), args.figure,
                  nrow=args.completions + 2)
    if args.json is not None:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

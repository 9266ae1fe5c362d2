"""Benchmark (not a test): one metric pass, FID + KID + precision/recall of N generated images
against N real ones on the evaluator classifier's features, done our way beside today's path.

    .venv/bin/python benchmarks/bench_metrics.py                       # 10k vs 10k Fashion-MNIST
    .venv/bin/python benchmarks/bench_metrics.py --n 500 --data synthetic --threads 1

Images: real = the first N Fashion-MNIST test images, "generated" = the first N training images (a
second sample of the same distribution; the cost does not depend on what the images show), read
from params.yaml's data.path; or --data synthetic: uniform noise images. The classifier is the
pipeline's architecture (params.yaml classifier.width), seeded but untrained: timing is all it is for.

Rows, each timed once after an untimed warm-up on 64 images:
- torchmetrics: separate metric calls as the evaluation made them: FrechetInceptionDistance and
  KernelInceptionDistance each fed the images (each extracts the features of both sets itself),
  and precision/recall, which torchmetrics lacks, after a third extraction of its own.
- ours, cold:   features and class probabilities of both sets extracted once, all metrics from them.
- ours, real cached: the real side's features and k-NN radii kept from an earlier evaluation (the
  live-weight score and re-scores reuse one reference); only the generated images are extracted.
Printed: seconds per row and speed-up over the torchmetrics row; FID/KID values per row agree.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.evaluation import features as F  # noqa: E402
from components.evaluation.classifier import Classifier, FeatureExtractor  # noqa: E402
from components.evaluation.manifold import knn_radii, manifold_scores  # noqa: E402
from components.images import to_model_input  # noqa: E402
from components.params import load_params  # noqa: E402

BATCH = 500


def load_images(data: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, generated) uint8 (n, 1, 28, 28)."""
    if data == "synthetic":
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g) for _ in range(2))
    from components.data.sources import fashion_mnist

    splits = fashion_mnist(load_params(ROOT / "params.yaml").data.model_copy(update={"path": data})).splits
    real, fake = (torch.from_numpy(splits[s].images[:n].copy()) for s in ("test", "train"))
    if real.shape[0] < n:
        raise SystemExit(f"--n {n}: the test split has only {real.shape[0]} images")
    return real, fake


def torchmetrics_pass(classifier, real, fake, subset_size: int, k: int) -> dict[str, float]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    extractor = FeatureExtractor(classifier)
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
    kid = KernelInceptionDistance(feature=extractor, subset_size=subset_size, subsets=F.KID_SUBSETS)
    for metric in (fid, kid):
        for images, is_real in ((real, True), (fake, False)):
            for chunk in images.split(BATCH):
                metric.update(chunk, real=is_real)
    out = {"fid": float(fid.compute()), "kid": float(kid.compute()[0])}
    real_f, fake_f = (torch.cat([extractor(c) for c in x.split(BATCH)]) for x in (real, fake))
    return {**out, **manifold_scores(real_f, fake_f, k)}


def our_pass(classifier, real, fake, subset_size: int, k: int, cached=None) -> dict[str, float]:
    real_f, radii = cached if cached is not None else real_side(classifier, real, k)
    fake_f = F.extract(classifier, fake, BATCH).features
    return {"fid": F.fid(real_f, fake_f), "kid": F.kid(real_f, fake_f, subset_size)[0],
            **manifold_scores(real_f, fake_f, k, radii)}


def real_side(classifier, real, k: int):
    real_f = F.extract(classifier, real, BATCH).features
    return real_f, knn_radii(real_f, k)


def timed(fn, seed: int):
    torch.manual_seed(seed)  # KID's subsets: every row draws the same ones
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    params = load_params(ROOT / "params.yaml")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="real and generated images each")
    parser.add_argument("--data", default=params.data.path, help="Fashion-MNIST folder, or 'synthetic'")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    subset_size, k = min(params.evaluate.kid_subset_size, args.n), params.evaluate.nearest_k

    real_u8, fake_u8 = load_images(args.data, args.n)
    real, fake = (to_model_input(x, 28, "cpu") for x in (real_u8, fake_u8))
    torch.manual_seed(0)
    classifier = Classifier(1, 10, params.classifier.width).eval()

    warm = real[:64], fake[:64]
    torchmetrics_pass(classifier, *warm, 32, k), our_pass(classifier, *warm, 32, k)
    rows = [("torchmetrics, separate calls", *timed(lambda: torchmetrics_pass(classifier, real, fake, subset_size, k), 0)),
            ("ours, features once (cold)", *timed(lambda: our_pass(classifier, real, fake, subset_size, k), 0))]
    cached = real_side(classifier, real, k)
    rows.append(("ours, real side cached", *timed(lambda: our_pass(classifier, real, fake, subset_size, k, cached), 0)))

    base = rows[0][1]
    print(f"one metric pass (FID + KID + precision/recall), {args.n} vs {args.n}, data {args.data if args.data == 'synthetic' else 'fashion-mnist'}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"| path | seconds | speed-up | fid | kid | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for name, seconds, out in rows:
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f}× | {out['fid']:.6g} | {out['kid']:.6g} | "
              f"{out['precision']:.4f} | {out['recall']:.4f} |")


if __name__ == "__main__":
    main()

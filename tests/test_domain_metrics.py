"""Domain metrics from features extracted once: FID/KID equal to torchmetrics' image path,
precision/recall/density/coverage, the Inception-Score-style score, PSNR/SSIM, ELBO and bits/dim,
bootstrap intervals, and the metric benchmark run tiny."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_configs import EVALUATE_EXTRAS, model_config
from components.config import EvaluateConfig
from components.evaluation import features as F
from components.evaluation import intervals, manifold
from components.evaluation.classifier import Classifier, FeatureExtractor
from components.evaluation.evaluate import score_samples
from components.evaluation.metrics import METRICS, PSNR_CAP_DB, EvalContext, inception_score
from components.images import to_uint8
from components.models import build_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning"),
]


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """n×1×28×28 in [-1, 1]: smooth random blobs (structure the features can see), optionally brighter."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g) * 2 - 1
    return (torch.nn.functional.interpolate(low, size=28, mode="bilinear") + shift).clamp(-1, 1)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)  # untrained but fixed: a deterministic feature map
    return Classifier(channels=1, num_classes=10, width=8).eval()


def context(classifier, real, fake, model=None, **kw) -> EvalContext:
    return EvalContext(model=model, classifier=classifier, real=real, fake=fake, kid_subset_size=100, **kw)


# FID and KID from features: the values torchmetrics' image metrics give.

def test_fid_and_kid_from_features_equal_torchmetrics_on_the_images(classifier):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = images(300, 0), images(300, 1, shift=0.2)
    extractor = FeatureExtractor(classifier)
    fid, kid = FrechetInceptionDistance(feature=extractor), KernelInceptionDistance(feature=extractor, subset_size=100,
                                                                                   subsets=F.KID_SUBSETS)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    torch.manual_seed(7)
    kid_mean, kid_std = kid.compute()

    ctx = context(classifier, real, fake)
    ours_fid = METRICS.get("fid")(ctx)["fid"]
    torch.manual_seed(7)
    ours_kid = METRICS.get("kid")(ctx)
    assert ours_fid > 0 and ours_fid == pytest.approx(float(fid.compute()), rel=1e-3)
    assert ours_kid["kid"] == pytest.approx(float(kid_mean), rel=1e-3, abs=1e-9)
    assert ours_kid["kid_std"] == pytest.approx(float(kid_std), rel=1e-3, abs=1e-9)
    torch.manual_seed(7)
    assert METRICS.get("kid")(ctx) == ours_kid  # same seed, same score
    torch.manual_seed(8)
    assert METRICS.get("kid")(ctx)["kid"] != ours_kid["kid"]


def test_an_evaluation_extracts_each_sets_features_once(classifier):
    calls = []
    hook = classifier.body.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    try:
        cfg = EvaluateConfig(metrics=["fid", "kid", "class_coverage", "inception_score", "precision_recall",
                                      "density_coverage"], num_samples=120, kid_subset_size=50, nearest_k=3,
                             bootstrap={"samples": 10, "alpha": 0.1}, grid_size=4, seed=0, **EVALUATE_EXTRAS)
        out = score_samples(to_uint8(images(120, 1)), to_uint8(images(150, 0)), classifier, cfg, 28)
    finally:
        hook.remove()
    assert sum(calls) == 240  # 120 real + 120 generated, each through the network once
    assert {"fid", "fid_ci_low", "kid_ci_high", "inception_score", "precision", "coverage"} <= set(out)


# Precision/recall (Kynkäänniemi et al.) and density/coverage (Naeem et al.) on known cases.

def gaussian(n: int, d: int, seed: int, centre: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + centre


def test_identical_sets_are_fully_precise_recalled_and_covered():
    x = gaussian(400, 8, 0)
    out = manifold.manifold_scores(x, x.clone(), k=3)
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0
    # Each real ball holds its own centre and its k neighbours: k + 1 copies of the set per k.
    assert out["density"] == pytest.approx(4 / 3, abs=0.02)


def test_two_samples_of_one_distribution_have_density_near_one():
    out = manifold.manifold_scores(gaussian(2000, 4, 0), gaussian(2000, 4, 1), k=5)
    assert 0.9 < out["density"] < 1.1  # E[density] = 1 for i.i.d. samples (Naeem et al., section 4)
    assert out["precision"] > 0.8 and out["recall"] > 0.8 and out["coverage"] > 0.9


def test_far_apart_sets_score_zero():
    out = manifold.manifold_scores(gaussian(300, 8, 0), gaussian(300, 8, 1, centre=100.0), k=3)
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_subset_of_the_modes_keeps_precision_and_loses_recall():
    modes = torch.arange(4).repeat_interleave(100).float()[:, None] * 50  # four far-apart clusters
    real = gaussian(400, 8, 0) + modes
    fake = real[:200].clone()  # the first two modes only
    out = manifold.manifold_scores(real, fake, k=3)
    assert out["precision"] == 1.0
    assert out["recall"] == 0.5 and out["coverage"] == 0.5


def test_chunked_manifold_scores_equal_the_whole_matrix(monkeypatch):
    real, fake = gaussian(150, 6, 0), gaussian(130, 6, 1, centre=0.3)
    k = 3
    d_rr, d_ff, d_fr = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(fake, real)
    r_real, r_fake = d_rr.kthvalue(k + 1, dim=1).values, d_ff.kthvalue(k + 1, dim=1).values
    inside = d_fr <= r_real  # (fake, real)
    expected = {"precision": inside.any(1).float().mean(), "recall": (d_fr <= r_fake[:, None]).any(0).float().mean(),
                "density": inside.sum() / (k * 130), "coverage": inside.any(0).float().mean()}
    monkeypatch.setattr(manifold, "CHUNK", 32)  # several chunks of each matrix
    out = manifold.manifold_scores(real, fake, k)
    assert out == pytest.approx({key: float(v) for key, v in expected.items()}, abs=1e-6)


def test_nearest_k_beyond_the_set_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="evaluate.nearest_k = 5 needs more than 5 generated images"):
        manifold.manifold_scores(gaussian(10, 2, 0), gaussian(5, 2, 1), k=5)


# The Inception-Score-style score from class probabilities.

def test_inception_score_known_values():
    assert inception_score(torch.full((50, 10), 0.1)) == pytest.approx(1.0)
    assert inception_score(torch.eye(10).repeat(5, 1)) == pytest.approx(10.0)  # one-hot, evenly over 10
    assert inception_score(torch.eye(10)[:4].repeat(3, 1)) == pytest.approx(4.0)
    assert inception_score(torch.eye(10)[torch.zeros(20, dtype=torch.long)]) == pytest.approx(1.0)  # collapse


# PSNR/SSIM of reconstructions.

class ShiftedReconstructor(torch.nn.Module):
    """Reconstructs every image `offset` brighter (in [-1, 1] units): a known error."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(offset))

    def reconstruct(self, x):
        return x + self.offset


def test_psnr_and_ssim_on_known_reconstructions(classifier):
    real = images(40, 0).clamp(-0.8, 0.8)  # room for the shifted copy inside [-1, 1]
    perfect = context(classifier, real, real, model=ShiftedReconstructor(0.0))
    assert METRICS.get("psnr")(perfect) == {"psnr": PSNR_CAP_DB}  # +inf capped: a finite, comparable number
    assert METRICS.get("ssim")(perfect)["ssim"] == pytest.approx(1.0, abs=1e-5)
    shifted = context(classifier, real, real, model=ShiftedReconstructor(0.2))  # 0.1 in [0, 1] units
    assert METRICS.get("psnr")(shifted)["psnr"] == pytest.approx(20.0, abs=1e-3)  # −10·log10(0.1²)
    assert 0 < METRICS.get("ssim")(shifted)["ssim"] < 1
    gan = context(classifier, real, real, model=build_model(model_config("dcgan"), 1, num_classes=10))
    assert METRICS.get("psnr")(gan) == {} and METRICS.get("ssim")(gan) == {}


# ELBO and bits/dim.

def test_bits_per_dim_of_a_vae_predicting_one_half_everywhere_is_one(classifier):
    """Encoder weights 0: q(z|x) = N(0, I), KL 0; decoder weights 0: logits 0, Bernoulli(½) costs
    ln 2 nats per pixel whatever the pixel: −ELBO = D·ln 2, one bit per dimension."""
    vae = build_model(model_config("vae"), 1, num_classes=10).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
    out = METRICS.get("elbo")(context(classifier, images(30, 0), images(30, 0), model=vae))
    assert out["bits_per_dim"] == pytest.approx(1.0, rel=1e-5)
    assert out["elbo"] == pytest.approx(-784 * math.log(2), rel=1e-5)


def test_elbo_only_for_models_that_declare_a_likelihood(classifier):
    real = images(20, 0)
    torch.manual_seed(0)
    vae = build_model(model_config("vae"), 1, num_classes=10).eval()
    first = METRICS.get("elbo")(context(classifier, real, real, model=vae, seed=3))
    assert first["elbo"] < 0 and first["bits_per_dim"] > 0
    assert METRICS.get("elbo")(context(classifier, real, real, model=vae, seed=3)) == first  # seeded draws
    cvae = build_model(model_config("cvae"), 1, num_classes=10).eval()
    assert METRICS.get("elbo")(context(classifier, real, real, model=cvae)) == {}  # no labels, no ELBO
    labelled = METRICS.get("elbo")(context(classifier, real, real, model=cvae, real_labels=torch.arange(20) % 10))
    assert labelled["bits_per_dim"] > 0
    for family in ("ae", "dcgan"):
        model = build_model(model_config(family), 1, num_classes=10).eval()
        assert METRICS.get("elbo")(context(classifier, real, real, model=model)) == {}
    assert METRICS.get("elbo")(context(classifier, real, real)) == {}  # stored samples: no model


# Bootstrap intervals.

def test_replicates_with_unit_counts_are_the_point_estimates():
    real, fake = gaussian(200, 6, 0).relu(), gaussian(150, 6, 1, centre=0.2).relu()
    ones_r, ones_f = torch.ones(1, 200, dtype=torch.float64), torch.ones(1, 150, dtype=torch.float64)
    assert float(intervals.fid_replicates(real, fake, ones_r, ones_f)[0]) == pytest.approx(F.fid(real, fake), rel=1e-9)
    # With every image once, the KID replicate is the unbiased MMD² of the whole sets.
    k = lambda a, b: (a.double() @ b.double().T / 6 + 1) ** 3  # noqa: E731
    k_rr, k_ff = k(real, real), k(fake, fake)
    unbiased = ((k_rr.sum() - k_rr.trace()) / (200 * 199) + (k_ff.sum() - k_ff.trace()) / (150 * 149)
                - 2 * k(real, fake).mean())
    assert float(intervals.kid_replicates(real, fake, ones_r, ones_f)[0]) == pytest.approx(float(unbiased), rel=1e-9)


def test_fid_replicate_of_counts_equals_fid_of_the_resampled_set():
    real, fake = gaussian(120, 5, 0), gaussian(100, 5, 1, centre=0.5)
    g = torch.Generator().manual_seed(3)
    pick_r, pick_f = torch.randint(120, (120,), generator=g), torch.randint(100, (100,), generator=g)
    counts_r = torch.bincount(pick_r, minlength=120).double()[None]
    counts_f = torch.bincount(pick_f, minlength=100).double()[None]
    replicate = float(intervals.fid_replicates(real, fake, counts_r, counts_f)[0])
    assert replicate == pytest.approx(F.fid(real[pick_r], fake[pick_f]), rel=1e-9)


def test_intervals_hold_the_estimate_narrow_with_n_and_are_seeded():
    def interval(metric, n, seed=0, shift=0.5):
        return intervals.bootstrap_interval(metric, gaussian(n, 8, 0).relu(), gaussian(n, 8, 1, shift).relu(),
                                            samples=100, alpha=0.1, seed=seed)

    for metric, point in (("fid", F.fid), ("kid", lambda r, f: F.kid(r, f, 1000, subsets=1)[0])):
        low, high = interval(metric, 800)
        torch.manual_seed(0)
        estimate = point(gaussian(800, 8, 0).relu(), gaussian(800, 8, 1, 0.5).relu())
        assert low < estimate < high, (metric, low, estimate, high)
        wide_low, wide_high = interval(metric, 200)
        assert high - low < 0.75 * (wide_high - wide_low), metric  # ~1/√n: half the width at 4× n
        assert interval(metric, 800) == (low, high)
        assert interval(metric, 800, seed=1) != (low, high)
    same_low, same_high = interval("kid", 800, shift=0.0)  # two samples of one distribution
    assert same_low < 0 < same_high


def test_the_fid_interval_holds_the_estimate_of_two_samples_of_one_distribution():
    """Where FID is mostly small-sample bias, resampling inflates it: the plain percentile interval
    lay wholly above the estimate; the bias-corrected one holds it."""
    real, fake = gaussian(2000, 16, 0), gaussian(2000, 16, 1)
    estimate = F.fid(real, fake)
    low, high = intervals.bootstrap_interval("fid", real, fake, samples=100, alpha=0.1, seed=0)
    assert low < estimate < high, (low, estimate, high)
    generator = torch.Generator().manual_seed(0)
    counts = intervals.resample_counts(2000, 100, generator), intervals.resample_counts(2000, 100, generator)
    plain_low, _ = intervals.percentile_interval(intervals.fid_replicates(real, fake, *counts), 0.1)
    assert plain_low > estimate  # what the correction is for


def test_score_samples_reports_the_intervals_seeded(classifier):
    cfg = EvaluateConfig(metrics=["fid", "kid"], num_samples=100, kid_subset_size=50, nearest_k=3,
                         bootstrap={"samples": 20, "alpha": 0.1}, grid_size=4, seed=5, **EVALUATE_EXTRAS)
    real, fake = to_uint8(images(100, 0)), to_uint8(images(100, 1, shift=0.6))
    out = score_samples(fake, real, classifier, cfg, 28)
    # Far apart sets: FID well above its small-sample bias, which resampling inflates (see intervals.py).
    assert out["fid_ci_low"] < out["fid"] < out["fid_ci_high"]
    assert out["kid_ci_low"] < out["kid_ci_high"]
    assert score_samples(fake, real, classifier, cfg, 28) == out


def test_bootstrap_settings_are_validated_and_in_the_protocol():
    from pydantic import ValidationError

    from components.evaluation.protocol import evaluate_config, score_protocol

    settings = dict(metrics=["fid"], num_samples=10, kid_subset_size=5, nearest_k=3, grid_size=4, seed=0,
                    **EVALUATE_EXTRAS)
    with pytest.raises(ValidationError, match="bootstrap.alpha"):
        EvaluateConfig(**settings, bootstrap={"samples": 100, "alpha": 1.5})
    cfg = EvaluateConfig(**settings, bootstrap={"samples": 100, "alpha": 0.05})
    protocol = score_protocol(cfg, evaluator="e", dataset_version="d", image_size=28)
    assert protocol["bootstrap"] == {"samples": 100, "alpha": 0.05} and protocol["nearest_k"] == 3
    assert evaluate_config(protocol, ["fid"]).bootstrap == cfg.bootstrap


def test_bench_metrics_runs_tiny():
    done = subprocess.run([sys.executable, "benchmarks/bench_metrics.py", "--n", "150", "--data", "synthetic",
                           "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| torchmetrics") or line.startswith("| ours")]
    assert len(rows) == 3
    values = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert all(float(v[1]) > 0 for v in values)
    assert len({v[3] for v in values}) == 1 and len({v[5] for v in values}) == 1  # same FID and precision each way

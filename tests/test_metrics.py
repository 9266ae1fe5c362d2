"""FID/KID on a fixed feature extractor, the metric registry, sample grids and seeded sampling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from model_configs import EVALUATE_EXTRAS, model_config
from components.config import EvaluateConfig
from components.evaluation.classifier import FEATURES, Classifier, FeatureExtractor
from components.evaluation.evaluate import evaluate_model
from components.evaluation.grid import sample_uint8, save_grid
from components.images import to_uint8
from components.evaluation import features as F
from components.evaluation.metrics import METRICS, EvalContext
from components.models import FAMILIES, build_model

NOISE_LEVELS = (0.1, 0.3, 0.6)
SETTINGS = {"nearest_k": 3, "bootstrap": {"samples": 20, "alpha": 0.1}, **EVALUATE_EXTRAS}  # small B: tests stay fast
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning"),
]


# FID and KID of two image sets under an arbitrary feature extractor (images in [-1, 1] → (N, d)):
# the maths of features.py, checked on cases with known answers.
@torch.no_grad()
def _features(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(extractor.parameters()).device
    return torch.cat([extractor(chunk.to(device)) for chunk in images.split(batch_size)])


def frechet_distance(real, fake, extractor, batch_size: int = 500) -> float:
    return F.fid(_features(extractor, real, batch_size), _features(extractor, fake, batch_size))


def kernel_distance(real, fake, extractor, subset_size: int, batch_size: int = 500) -> tuple[float, float]:
    return F.kid(_features(extractor, real, batch_size), _features(extractor, fake, batch_size), subset_size)




def structured_set(n: int = 400, size: int = 28, seed: int = 0) -> torch.Tensor:
    """n×1×size×size floats in [-1, 1]: plane waves of random frequency and phase (not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, size)
    freq = torch.rand(n, 1, 1, 1, generator=g) * 3 + 0.5
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    img = torch.sin(freq * coords.view(1, 1, 1, size) * math.pi + phase) * torch.cos(freq * coords.view(1, 1, size, 1) * 2)
    return img.clamp(-1, 1)


def noisy(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + std * torch.randn(images.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)  # untrained but fixed: a deterministic feature map is all FID/KID need here
    return Classifier(channels=1, num_classes=10, width=8).eval()


@pytest.fixture(scope="module")
def extractor(classifier) -> FeatureExtractor:
    return FeatureExtractor(classifier)


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return structured_set()


@pytest.fixture(scope="module")
def feature_scale(extractor, real) -> float:
    """Trace of the real features' covariance: FID's natural unit (it is a squared feature distance)."""
    return float(extractor(real).double().var(dim=0).sum())


def test_extractor_gives_fixed_size_features_at_any_resolution(extractor):
    small, large = structured_set(4, 28), structured_set(4, 64)
    assert extractor(small).shape == (4, FEATURES) == (4, extractor.num_features)
    assert extractor(large).shape == (4, FEATURES)


def test_fid_of_a_set_with_itself_is_zero(extractor, real, feature_scale):
    # Exact arithmetic gives 0; torchmetrics works in float64, so what remains is rounding (~1e-12 of the
    # scale). 1e-6 of the feature variance is generous for rounding yet ~4 orders of magnitude below
    # the FID of even the mildest noise level below.
    fid = frechet_distance(real, real, extractor)
    assert abs(fid) < 1e-6 * feature_scale, (fid, feature_scale)


def test_fid_grows_with_noise(extractor, real, feature_scale):
    fids = [frechet_distance(real, noisy(real, std), extractor) for std in NOISE_LEVELS]
    assert fids[0] > 1e-3 * feature_scale, fids
    assert fids == sorted(fids) and len(set(fids)) == 3, fids


def test_fid_does_not_depend_on_feeding_batch_size(extractor, real):
    fake = noisy(real, 0.3)
    assert frechet_distance(real, fake, extractor, batch_size=64) == pytest.approx(
        frechet_distance(real, fake, extractor, batch_size=500), rel=1e-4)


def test_kid_self_near_zero_and_noise_larger(extractor, real):
    torch.manual_seed(0)  # KID draws random subsets from the global RNG
    self_mean, self_std = kernel_distance(real, real, extractor, subset_size=100)
    torch.manual_seed(0)
    noisy_mean, noisy_std = kernel_distance(real, noisy(real, 0.6), extractor, subset_size=100)
    assert self_std >= 0 and noisy_std >= 0
    assert noisy_mean > 0
    assert abs(self_mean) < 0.05 * noisy_mean, (self_mean, noisy_mean)
    assert noisy_mean > self_mean + 3 * noisy_std


def test_kid_subset_size_is_clamped_to_the_data(extractor, real):
    torch.manual_seed(0)
    mean, std = kernel_distance(real[:50], noisy(real[:30], 0.3), extractor, subset_size=10_000)
    assert math.isfinite(mean) and math.isfinite(std)


def tiny_model(family: str, channels: int = 1, image_size: int = 28):
    small = {"vae": {"latent_dim": 4, "width": 4, "beta": 1.0},
             "dcgan": {"latent_dim": 4, "ngf": 4, "ndf": 4, "beta1": 0.5}}[family]
    cfg = model_config(family, image_size=image_size, **small)
    torch.manual_seed(0)
    return build_model(cfg, channels, num_classes=10).eval()


def test_class_coverage_counts_classes(classifier, real):
    ctx = EvalContext(model=tiny_model("vae"), classifier=classifier, real=real, fake=noisy(real, 0.3),
                      kid_subset_size=100)
    out = METRICS.get("class_coverage")(ctx)
    assert set(out) == {"classes_covered", "sample_confidence"}
    assert isinstance(out["classes_covered"], int) and 0 <= out["classes_covered"] <= 10
    assert 0.1 <= out["sample_confidence"] <= 1.0

    collapsed = EvalContext(model=ctx.model, classifier=classifier, real=real, fake=real[:1].repeat(50, 1, 1, 1),
                            kid_subset_size=100)
    assert METRICS.get("class_coverage")(collapsed)["classes_covered"] == 1  # mode collapse: one class


def test_recon_mse_only_for_models_that_reconstruct(classifier, real):
    vae = EvalContext(model=tiny_model("vae"), classifier=classifier, real=real[:20], fake=real[:20],
                      kid_subset_size=10)
    out = METRICS.get("recon_mse")(vae)
    assert set(out) == {"recon_mse"} and 0 <= out["recon_mse"] <= 1
    gan = EvalContext(model=tiny_model("dcgan"), classifier=classifier, real=real[:20], fake=real[:20],
                      kid_subset_size=10)
    assert METRICS.get("recon_mse")(gan) == {}


def test_unknown_metric_lists_valid():
    with pytest.raises(ValueError, match=r"unknown metric 'is'; valid: augment, cas, class_coverage, density_coverage, elbo, fid, "
                                         r"fid_floor, inception, inception_score, kid, nll, "
                                         r"precision_recall, psnr, recon_mse, ssim"):
        METRICS.get("is")


def test_evaluate_model_reports_every_metric_and_writes_grid(classifier, tmp_path):
    real_u8 = to_uint8(structured_set(80))
    cfg = EvaluateConfig(**SETTINGS, metrics=["fid", "kid", "class_coverage", "recon_mse"], num_samples=60,
                         kid_subset_size=20, grid_size=9, seed=3)
    grid_path = tmp_path / "eval" / "grid.png"
    out = evaluate_model(tiny_model("vae"), classifier, real_u8, cfg, grid_path)
    assert set(out) == {"num_samples", "fid", "kid", "kid_std", "classes_covered", "sample_confidence", "recon_mse",
                        "fid_ci_low", "fid_ci_high", "kid_ci_low", "kid_ci_high"}
    assert out["num_samples"] == 60  # capped at cfg.num_samples
    assert all(math.isfinite(v) for v in out.values())
    with Image.open(grid_path) as im:
        assert im.size == (3 * 30 + 2, 3 * 30 + 2)  # 9 samples → 3×3 grid of 28 px + 2 px padding
    with pytest.raises(ValueError, match="at least 2 held-out images"):
        evaluate_model(tiny_model("vae"), classifier, real_u8[:1], cfg)


def test_a_reconstructing_model_is_scored_on_reconstructions_of_the_reference(classifier, tmp_path):
    from components.evaluation.evaluate import reference_subset, score_samples
    from components.evaluation.grid import reconstruct_uint8

    model = build_model(model_config("ae"), 1, num_classes=10).eval()
    real_u8 = to_uint8(structured_set(50))
    cfg = EvaluateConfig(**SETTINGS, metrics=["fid", "recon_mse"], num_samples=30, kid_subset_size=10, grid_size=8, seed=2)
    out = evaluate_model(model, classifier, real_u8, cfg, tmp_path / "grid.png", kind="reconstruct")
    reference = reference_subset(real_u8, cfg)
    recon = reconstruct_uint8(model, reference)
    assert out == score_samples(recon, real_u8, classifier, cfg, 28, model=model)
    assert set(out) == {"num_samples", "fid", "fid_ci_low", "fid_ci_high", "recon_mse"} and out["num_samples"] == 30
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (2 * 30 + 2, 4 * 30 + 2)  # 4 pairs, each real image beside its reconstruction
        pixels = np.asarray(im)
    assert np.array_equal(pixels[2:30, 2:30], reference[0, 0].numpy())
    assert np.array_equal(pixels[2:30, 32:60], recon[0, 0].numpy())
    with pytest.raises(TypeError, match="not a sampler"):  # evaluated as a sampler, it says what it is
        evaluate_model(model, classifier, real_u8, cfg, kind="generate")


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
@pytest.mark.parametrize("n, nrow, cols, rows", [(5, None, 3, 2), (4, None, 2, 2), (6, 6, 6, 1)])
def test_save_grid_png_dimensions(tmp_path, channels, mode, n, nrow, cols, rows):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, 8, 10), dtype=torch.uint8, generator=g)
    path = tmp_path / "sub" / "grid.png"
    save_grid(images, path, nrow=nrow)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == mode
        assert im.size == (cols * (10 + 2) + 2, rows * (8 + 2) + 2)  # (width, height)
        pixels = np.asarray(im)
    first = images[0].permute(1, 2, 0).numpy()
    assert np.array_equal(pixels[2:10, 2:12].reshape(first.shape), first)  # the first tile, unchanged
    assert (pixels[0] == 255).all()  # white padding
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_to_uint8_maps_range_and_clamps():
    out = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]))
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("family", ["vae", "dcgan"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 64)])
def test_sample_uint8_shape_and_seed(family, channels, size):
    model = tiny_model(family, channels, size)
    with torch.no_grad():  # DCGAN's N(0, 0.02) init gives near-constant images that round to equal uint8s
        for param in model.parameters():
            param.normal_(0, 0.3)
    a = sample_uint8(model, 7, seed=5, batch_size=3)
    assert a.dtype == torch.uint8 and a.shape == (7, channels, size, size)
    assert torch.equal(a, sample_uint8(model, 7, seed=5, batch_size=3))
    assert not torch.equal(a, sample_uint8(model, 7, seed=6, batch_size=3))
    assert not torch.equal(a[:3], a[3:6])  # chunks draw fresh noise
    empty = sample_uint8(model, 0, seed=5)
    assert empty.shape == (0, channels, size, size) and empty.dtype == torch.uint8


def test_sample_uint8_puts_model_in_eval_mode():
    model = tiny_model("dcgan").train()
    first = sample_uint8(model, 4, seed=1)
    assert not model.training
    assert torch.equal(first, sample_uint8(model, 4, seed=1))


class _BrokenGenerator(torch.nn.Module):
    """A model whose weights went NaN: every sample is NaN."""

    channels, image_size, conditional = 1, 28, False

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(float("nan")))

    def sample(self, n, generator=None, labels=None, prompts=None):
        return self.weight * torch.ones(n, 1, 28, 28)


def test_non_finite_samples_fail_the_evaluation_with_a_message(classifier):
    from components.evaluation.grid import NonFiniteSamples

    cfg = EvaluateConfig(**SETTINGS, metrics=["fid"], num_samples=20, kid_subset_size=10, grid_size=4, seed=0)
    with pytest.raises(NonFiniteSamples, match="NaN or infinite pixels"):
        evaluate_model(_BrokenGenerator(), classifier, to_uint8(structured_set(20)), cfg)


def test_non_finite_features_fail_the_evaluation_instead_of_crashing_it(real):
    from components.evaluation.classifier import NonFiniteFeatures
    from components.evaluation.evaluate import score_samples

    cfg = EvaluateConfig(**SETTINGS, metrics=["fid"], num_samples=40, kid_subset_size=10, grid_size=4, seed=0)
    with torch.no_grad():
        broken = Classifier(channels=1, num_classes=10, width=8).eval()
        for p in broken.parameters():
            p.fill_(float("inf"))
    with pytest.raises(NonFiniteFeatures, match="NaN or infinite"):
        score_samples(to_uint8(real[:40]), to_uint8(real[:40]), broken, cfg, 28)


def test_scoring_stored_samples_equals_evaluating_the_model(classifier):
    """The champion's re-score (samples drawn elsewhere, scored here) matches evaluating it directly."""
    from components.evaluation.evaluate import score_samples

    model = tiny_model("vae")
    real_u8 = to_uint8(structured_set(50))
    cfg = EvaluateConfig(**SETTINGS, metrics=["fid", "kid"], num_samples=30, kid_subset_size=10, grid_size=4, seed=2)
    direct = evaluate_model(model, classifier, real_u8, cfg)
    stored = score_samples(sample_uint8(model, 30, seed=2), real_u8, classifier, cfg, 28)
    assert stored == direct

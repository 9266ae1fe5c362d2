"""Checks that need a GPU: skipped on CPU-only machines, run by benchmarks/gpu_check.sh on one."""
from __future__ import annotations

import pytest
import torch

from model_configs import EVALUATE_EXTRAS, model_config, tiny_parts
from components.config import EvaluateConfig
from components.evaluation.classifier import Classifier
from components.evaluation.evaluate import evaluate_model, score_samples
from components.evaluation.grid import sample_uint8
from components.images import to_uint8
from components.models import FAMILIES, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(family: str):
    return build_model(model_config(family), 1, 10)


@pytest.mark.parametrize("family", ["vae", "dcgan"])
def test_evaluation_on_cuda_matches_the_cpu(family):
    """Model and classifier on the GPU, metric states created there too (torchmetrics moves nothing)."""
    torch.manual_seed(0)
    model, classifier = tiny(family).eval(), Classifier(1, 10, 8).eval()
    real = to_uint8(torch.rand(64, 1, 28, 28) * 2 - 1)
    cfg = EvaluateConfig(nearest_k=3, bootstrap={"samples": 20, "alpha": 0.1}, **EVALUATE_EXTRAS, metrics=["fid", "kid", "class_coverage", "recon_mse"], num_samples=60,
                         kid_subset_size=20, grid_size=4, seed=0)
    on_cpu = evaluate_model(model, classifier, real, cfg)
    on_gpu = evaluate_model(model.cuda(), classifier.cuda(), real, cfg)
    assert on_gpu.keys() == on_cpu.keys()
    for key in on_cpu:
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-2, abs=1e-3), key


def test_cpu_samples_scored_by_a_gpu_classifier():
    """The champion's re-score: samples arrive on the CPU, the evaluator runs on the GPU."""
    torch.manual_seed(0)
    model, classifier = tiny("dcgan").eval(), Classifier(1, 10, 8).eval().cuda()
    real = to_uint8(torch.rand(64, 1, 28, 28) * 2 - 1)
    cfg = EvaluateConfig(nearest_k=3, bootstrap={"samples": 20, "alpha": 0.1}, **EVALUATE_EXTRAS, metrics=["fid", "kid"], num_samples=60, kid_subset_size=20, grid_size=4, seed=0)
    out = score_samples(sample_uint8(model, 60, seed=0), real, classifier, cfg, 28)
    assert out["fid"] >= 0 and out["kid"] == out["kid"]


def train_and_evaluate(family: str, device: str) -> dict[str, float]:
    """A few bf16 steps with an EMA on `device`, then the evaluation its task kind asks for."""
    from components.training.trainer import Trainer

    cfg = model_config(family, batch_size=16, ema_decay=0.9, precision="bf16")
    model = build_model(cfg, 1, 10, parts=tiny_parts(cfg))  # an ldm on an untrained tiny kl_ae
    data = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), generator=data, dtype=torch.uint8)
    last = Trainer(model, cfg, device=device, log_every=1, progress=False).fit(images, torch.arange(64) % 10)
    assert last and all(torch.isfinite(torch.tensor(v)) for v in last.values()), last
    cfg_eval = EvaluateConfig(nearest_k=3, bootstrap={"samples": 20, "alpha": 0.1}, **EVALUATE_EXTRAS, metrics=["fid", "class_coverage"], num_samples=60, kid_subset_size=20, grid_size=4,
                              seed=0)
    return evaluate_model(model, Classifier(1, 10, 8).to(device).eval(), images, cfg_eval,
                          kind=FAMILIES.get(family).kind)


@pytest.mark.parametrize("family", FAMILIES.names())
def test_every_family_trains_in_bf16_and_evaluates_on_cuda(family):
    scores = train_and_evaluate(family, "cuda")
    assert scores["fid"] >= 0 and 1 <= scores["classes_covered"] <= 10


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_inception_features_on_cuda_match_the_cpu_and_the_published_count_is_quick():
    """The reference stage's default on a GPU: 10,000 images. Prints its images/s for the log."""
    import time

    from components.evaluation.inception import inception_features

    images = torch.randint(0, 256, (16, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    on_gpu, on_cpu = inception_features(images, "cuda"), inception_features(images, "cpu")
    assert torch.nn.functional.cosine_similarity(on_gpu, on_cpu, dim=1).min() >= 0.999
    many = images.repeat(125, 1, 1, 1)  # 2000 images
    torch.cuda.synchronize()
    start = time.perf_counter()
    inception_features(many, "cuda", batch_size=250)
    torch.cuda.synchronize()
    rate = many.shape[0] / (time.perf_counter() - start)
    print(f"Inception features on CUDA: {rate:.0f} images/s ({20000 / rate:.0f} s for the 10k + 10k protocol)")
    assert rate > 100  # the 10k-vs-10k protocol in minutes, not hours

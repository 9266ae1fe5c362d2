"""The standard FID/KID: the Inception features against torch-fidelity's own network fed the same
weights and images, the TF1 resize, the reference stage and the metric. The network runs ~9 images/s
on a 2-core CPU, so every test here uses a few dozen images."""
from __future__ import annotations

import json

import pytest
import torch

from fashion import fashion_subset
from model_configs import EVALUATE_EXTRAS, model_config
from components.config import EvaluateConfig, InceptionConfig
from components.evaluation import features as F
from components.evaluation import inception as I
from components.evaluation.classifier import Classifier
from components.evaluation.evaluate import score_samples
from components.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
torch_fidelity = pytest.importorskip("torch_fidelity")  # a test dependency (pyproject's test extra)


def torch_fidelity_inception(tmp_path) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (its architecture, resize and scaling) holding the weights genpipe
    uses. Its own weights download at run time, which fails offline: it is built empty, then given
    ours. The TorchScript lists each conv's weight, BN beta, mean and var in the order torch-fidelity
    registers its BasicConv2d modules (checked by shape here); TF's BN has no scale (γ = 1)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # its constructor's load: weights come below
            return None

    torch.save({}, tmp_path / "none.pth")
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "none.pth"))
    ours = list(torch.jit.load(str(I.weights_path())).named_parameters())
    convs = [name.removesuffix(".conv.weight") for name, _ in net.named_parameters() if name.endswith(".conv.weight")]
    assert len(ours) == 4 * len(convs) == 376
    state = net.state_dict()
    for prefix, i in zip(convs, range(0, len(ours), 4)):
        (_, weight), (_, beta), (_, mean), (_, var) = ours[i:i + 4]
        assert state[f"{prefix}.conv.weight"].shape == weight.shape, prefix
        state.update({f"{prefix}.conv.weight": weight, f"{prefix}.bn.weight": torch.ones_like(beta),
                      f"{prefix}.bn.bias": beta, f"{prefix}.bn.running_mean": mean, f"{prefix}.bn.running_var": var})
    torch.nn.Module.load_state_dict(net, {k: v.detach() for k, v in state.items()})
    return net.eval()


def test_features_agree_with_torch_fidelity_fed_the_same_weights_and_images(tmp_path):
    images, _ = fashion_subset(1)  # one real image per class, 28×28 grey
    ours = I.inception_features(images, "cpu")  # (10, 2048)
    with torch.no_grad():
        (theirs,) = torch_fidelity_inception(tmp_path)(images.expand(-1, 3, -1, -1).contiguous())
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    assert ours.shape == theirs.shape == (10, 2048)
    assert cosine.min() >= 0.999, cosine
    assert (ours - theirs).abs().max() < 1e-3 * theirs.abs().max()


def test_the_resize_is_tensorflow_1s_as_torch_fidelity_implements_it():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.rand(2, 3, 28, 20) * 255
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.allclose(I.resize_like_tf1(x, 299), theirs, atol=1e-3)
    # Not torch's half-pixel bilinear (pytorch-fid's resize): the two differ by up to a grey level's fraction.
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (half_pixel - theirs).abs().max() > 1


def test_how_many_images_each_mode_uses():
    def count(mode, cpu_samples, cuda):
        return I.sample_count(InceptionConfig(mode=mode, samples=10000, cpu_samples=cpu_samples), cuda)

    assert count("auto", 0, cuda=True)[0] == 10000
    assert count("auto", 500, cuda=False)[0] == 500
    skipped, why = count("auto", 0, cuda=False)
    assert skipped == 0 and "cpu_samples" in why and "no GPU" in why
    assert count("always", 0, cuda=False)[0] == 10000
    assert count("never", 500, cuda=True)[0] == 0
    with pytest.raises(ValueError, match="at least 2"):
        InceptionConfig(mode="auto", samples=10000, cpu_samples=1)


def noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 255 * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_inception_fid_and_kid_grow_with_the_noise_on_real_fashion_mnist():
    real, _ = fashion_subset(2, "test")  # 20 held-out images: few, as the network is slow here
    other, _ = fashion_subset(2)  # 20 training images: the floor
    reference = I.inception_features(real, "cpu")
    fids, kids = [], []
    for sigma in (0.0, 0.2, 0.5):
        fake = I.inception_features(noisy(other, sigma), "cpu")
        fids.append(F.fid(reference, fake))
        kids.append(F.kid(reference, fake, subset_size=20)[0])
    assert fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    test, _ = fashion_subset(2, "test")
    train, _ = fashion_subset(2)
    out = tmp_path_factory.mktemp("inception")
    cfg = InceptionConfig(mode="always", samples=12, cpu_samples=0)
    info = I.write_reference(test, train, cfg, seed=3, dataset_version="v1", device="cpu", out_dir=out)
    return out, test, info


def test_the_reference_stage_writes_features_protocol_and_floor(reference_dir):
    out, test, info = reference_dir
    assert info["num_samples"] == 12 and info["device"] == "cpu" and info["inception_fid_floor"] > 0
    protocol = json.loads((out / I.REFERENCE_INFO).read_text())["protocol"]
    assert protocol["extractor_sha1"] == I.WEIGHTS_SHA1 and "TensorFlow 1" in protocol["resize"]
    assert protocol["reference"] == {"dataset_version": "v1", "split": "test", "seed": 3, "count": 12}
    reference = I.read_reference(out, test, "v1")
    assert reference.features.shape == (12, 2048) and reference.images.shape == (12, 1, 28, 28)
    # The stored features are those of the stored images.
    assert torch.allclose(I.inception_features(reference.images[:3], "cpu"), reference.features[:3], atol=1e-4)
    with pytest.raises(ValueError, match="dataset version v1, the dataset is v2"):
        I.read_reference(out, test, "v2")
    with pytest.raises(FileNotFoundError, match="dvc repro inception"):
        I.read_reference(out / "missing", test, "v1")


def test_an_empty_reference_says_why(tmp_path):
    test, _ = fashion_subset(1, "test")
    cfg = InceptionConfig(mode="auto", samples=10000, cpu_samples=0)
    info = I.write_reference(test, test, cfg, seed=0, dataset_version="v1", device="cpu", out_dir=tmp_path)
    assert info["num_samples"] == 0 and "no GPU" in info["why"] and info["protocol"] is None
    assert len(I.read_reference(tmp_path, test, "v1")) == 0
    always = InceptionConfig(mode="always", samples=10000, cpu_samples=0)  # but no evaluation asks for it
    info = I.write_reference(test, test, always, seed=0, dataset_version="v1", device="cpu", out_dir=tmp_path,
                             off="off (inception is not in evaluate.metrics)")
    assert info["num_samples"] == 0 and "not in evaluate.metrics" in info["why"]


def test_the_metric_scores_a_model_against_the_reference_and_skips_without_one(reference_dir, one_thread):
    out, test, _ = reference_dir
    reference = I.read_reference(out, test, "v1")
    model = build_model(model_config("vae"), channels=1, num_classes=10)
    classifier = Classifier(1, 10, width=8)
    cfg = EvaluateConfig(metrics=["inception"], num_samples=12, kid_subset_size=6, nearest_k=3,
                         bootstrap={"samples": 10, "alpha": 0.1}, grid_size=4, seed=0, **EVALUATE_EXTRAS)
    fake = test[:12]
    scores = score_samples(fake, test, classifier, cfg, 28, model=model, inception=reference)
    assert scores["inception_fid"] > 0 and scores["inception_fid_floor"] == reference.info["inception_fid_floor"]
    assert {"inception_kid", "inception_kid_std"} <= set(scores)
    assert score_samples(fake, test, classifier, cfg, 28, model=model, inception=reference) == scores  # seeded
    assert set(score_samples(fake, test, classifier, cfg, 28, model=model)) == {"num_samples"}  # no reference

"""FID on real Fashion-MNIST with the pipeline's evaluator: it grows with a known shift of the data,
it is ~0 for the data itself, and the dataset's floor (real training images against the reference)
sits far below any visible damage; the evaluate stage reports that floor beside every FID. And the
classification accuracy score of conditional models on known cases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fashion import CLASSES, evaluator, fashion_subset
from model_configs import EVALUATE_EXTRAS, shrink_every_model
from components.config import ClassifierConfig, EvaluateConfig, apply_overrides, read_params_raw
from components.data.pack import pack_dataset
from components.data.sources import RawDataset, Split
from components.evaluation import features as F
from components.evaluation.classifier import accuracy, train_classifier
from components.evaluation.evaluate import evaluate_model, reference_indices, score_samples
from components.evaluation.metrics import floor_subset
from components.models import GenerativeModel, build_model
from components.params import parse_params
from components.tracking.model_files import save_trained_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning"),
]

SIGMAS = [0.0, 0.05, 0.1, 0.2, 0.4]  # Gaussian pixel noise, std in [0, 1] intensity units
SHIFTS = [0, 1, 2, 4]  # pixels right and down, the vacated border filled with background


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1  # [-1, 1], as the evaluation feeds the classifier


def noised(x: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # one draw, scaled: a nested family
    return (x + 2 * sigma * noise).clamp(-1, 1)  # 2σ: [0, 1] units → [-1, 1]


def shifted(x: torch.Tensor, pixels: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return nn.functional.pad(x, (pixels, 0, pixels, 0), value=-1.0)[..., :h, :w]  # (N, C, H, W), black border


@pytest.fixture(scope="module")
def judge():
    return evaluator()


@pytest.fixture(scope="module")
def reference(judge):
    """1000 test images (100 per class) and their evaluator features."""
    images, labels = fashion_subset(100, "test")
    x = to_unit(images)
    return x, labels, F.extract(judge, x).features


def distances(judge, reference, copy: torch.Tensor) -> tuple[float, float]:
    _, _, real = reference
    fake = F.extract(judge, copy).features
    torch.manual_seed(0)  # the same KID subsets for every copy
    return F.fid(real, fake), F.kid(real, fake, subset_size=500)[0]


# FID and KID grow with the shift; the unshifted copy scores ~0; the floor is below visible damage.

@pytest.mark.parametrize("damage, levels", [(noised, SIGMAS), (shifted, SHIFTS)], ids=["noise", "shift"])
def test_fid_and_kid_grow_strictly_with_the_damage(judge, reference, damage, levels):
    x, _, _ = reference
    scores = [distances(judge, reference, damage(x, level)) for level in levels]
    fids, kids = zip(*scores)
    assert fids[0] == pytest.approx(0.0, abs=1e-6)  # the set against itself: FID(test, the same test subset)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert fids[-1] > 100  # the strongest damage is far from the data (measured: σ 0.4 → 573, 4 px → 290)


def test_the_train_floor_is_above_zero_and_below_faint_noise(judge, reference):
    x, _, _ = reference
    train, _ = fashion_subset(100, "train")
    floor, _ = distances(judge, reference, to_unit(train))
    faint, _ = distances(judge, reference, noised(x, 0.1))
    other_test, _ = distances(judge, reference, to_unit(fashion_subset(200, "test")[0][1000:]))
    # Measured: floor 1.4, another 1000 test images 2.0, σ 0.1 noise 14.0. Two real samples differ by
    # their sampling noise only: the train split is as close to the test split as the test split is.
    assert 0 < floor < faint
    assert floor < 2 * other_test


# The evaluate stage's fid_floor: the same features and protocol as fid, which it leaves unchanged.

def cfg(metrics: list[str], num_samples: int) -> EvaluateConfig:
    return EvaluateConfig(metrics=metrics, num_samples=num_samples, kid_subset_size=100, nearest_k=3,
                          bootstrap={"samples": 10, "alpha": 0.1}, grid_size=4, seed=3, **EVALUATE_EXTRAS)


def test_fid_floor_is_the_fid_of_a_train_subset_and_leaves_fid_alone(judge):
    test_u8, _ = fashion_subset(40, "test")
    train_u8, _ = fashion_subset(100, "train")
    fake_u8 = fashion_subset(30, "test")[0].flip(-1)  # mirrored items: some FID
    config = cfg(["fid", "fid_floor"], num_samples=300)
    with_floor = score_samples(fake_u8, test_u8, judge, config, 28, train_u8=train_u8)
    without = score_samples(fake_u8, test_u8, judge, config, 28)

    assert "fid_floor" not in without and without["fid"] == with_floor["fid"]
    reference = F.extract(judge, to_unit(test_u8[reference_indices(400, config)]))
    train = F.extract(judge, to_unit(floor_subset(train_u8, 300, seed=3)))
    assert with_floor["fid_floor"] == pytest.approx(F.fid(train.features, reference.features), rel=1e-9)
    assert 0 < with_floor["fid_floor"] < with_floor["fid"]


def test_too_few_training_images_for_the_floor_names_the_setting(judge):
    test_u8, _ = fashion_subset(20, "test")
    with pytest.raises(ValueError, match=r"fid_floor needs 200 training images \(evaluate.num_samples\)"):
        score_samples(test_u8, test_u8, judge, cfg(["fid_floor"], 200), 28, train_u8=test_u8[:50])
    assert "fid" in score_samples(test_u8, test_u8, judge, cfg(["fid"], 200), 28, train_u8=test_u8[:50])  # unasked


# Classification accuracy score (Ravuri & Vinyals, 2019).

class RealImagesOfTheClass(GenerativeModel):
    """A conditional 'model' whose samples are real training images: of the asked class, or of the
    next one (`offset` 1, a model that mixes its classes up). Drawn at random with the generator."""

    conditional = True
    image_size, channels, latent_dim = 28, 1, 1

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, offset: int):
        super().__init__()
        self.classes, self.num_classes = CLASSES, len(CLASSES)
        self.anchor = nn.Parameter(torch.zeros(1))  # where the model lives, for check_labels
        self.pools = [images_u8[labels == k] for k in range(self.num_classes)]
        self.offset = offset

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None, prompts=None):
        classes = (self.check_labels(labels, n) + self.offset) % self.num_classes
        picks = [pool[torch.randint(len(pool), (), generator=generator)] for pool in (self.pools[k] for k in classes)]
        return to_unit(torch.stack(picks))  # (n, 1, 28, 28)


CAS_CLASSIFIER = ClassifierConfig(arch="cnn", epochs=2, batch_size=64, lr=0.003, width=16, seed=0, vit=None)


@pytest.fixture(scope="module")
def labelled_test():
    return fashion_subset(100, "test")  # 1000 images and their labels


def cas(model, judge, labelled_test, metrics=("cas",)) -> dict:
    images, labels = labelled_test
    return evaluate_model(model, judge, images, cfg(list(metrics), num_samples=1000), real_labels=labels,
                          classifier_config=CAS_CLASSIFIER)


def test_cas_of_real_images_is_a_real_trained_classifiers_accuracy(judge, labelled_test):
    train_u8, train_labels = fashion_subset(300, "train")
    score = cas(RealImagesOfTheClass(train_u8, train_labels, offset=0), judge, labelled_test)["cas"]
    # The same architecture and params trained on as many real labelled images.
    real_u8, real_labels = fashion_subset(100, "train")
    baseline = accuracy(train_classifier(real_u8, real_labels, len(CLASSES), CAS_CLASSIFIER, progress=False),
                        *labelled_test)
    assert baseline > 0.6
    assert score == pytest.approx(baseline, abs=0.05)


def test_cas_of_samples_of_the_wrong_class_is_near_zero(judge, labelled_test):
    train_u8, train_labels = fashion_subset(300, "train")
    assert cas(RealImagesOfTheClass(train_u8, train_labels, offset=1), judge, labelled_test)["cas"] < 0.05


def test_cas_leaves_the_other_metrics_as_they_were(judge, labelled_test):
    """Training CAS's classifier seeds the global RNG: KID listed after it must draw the same subsets."""
    train_u8, train_labels = fashion_subset(300, "train")
    model = RealImagesOfTheClass(train_u8, train_labels, offset=0)
    both = cas(model, judge, labelled_test, metrics=("cas", "kid"))
    alone = cas(model, judge, labelled_test, metrics=("kid",))
    assert both["kid"] == alone["kid"] and "cas" in both and "cas" not in alone


def test_cas_is_skipped_without_real_labels_or_for_unconditional_models(judge, labelled_test):
    train_u8, train_labels = fashion_subset(300, "train")
    model = RealImagesOfTheClass(train_u8, train_labels, offset=0)
    images, _ = labelled_test
    assert "cas" not in evaluate_model(model, judge, images, cfg(["cas"], 1000), classifier_config=CAS_CLASSIFIER)
    model.conditional = False
    assert "cas" not in cas(model, judge, labelled_test)


# The evaluate stage writes both to metrics.json.

def test_the_evaluate_stage_reports_the_floor_and_cas_beside_fid(tmp_path, monkeypatch):
    from components.pipeline import classifier_stage, evaluate_stage

    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / ".genpipe"))
    monkeypatch.setenv("GENPIPE_DEVICE", "cpu")
    raw = apply_overrides(read_params_raw(REPO / "params.yaml"), [
        *shrink_every_model(REPO / "params.yaml", batch_size=16, width=4),
        "classifier.epochs=1", "classifier.width=8", "evaluate.metrics=[fid, fid_floor, cas]",
        "evaluate.num_samples=100", "evaluate.kid_subset_size=50", "evaluate.bootstrap.samples=10"])
    params = parse_params(raw)
    (train, train_labels), (test, test_labels) = fashion_subset(30), fashion_subset(10, "test")
    split = lambda x, y, tag: Split(x.numpy(), y.numpy(), [f"{tag}#{i}" for i in range(len(y))])  # noqa: E731
    pack_dataset(RawDataset(classes=CLASSES, splits={"train": split(train, train_labels, "train"),
                                                     "test": split(test, test_labels, "test")}),
                 tmp_path / "dataset", params.data, {"name": "unit"})
    classifier_stage(params, tmp_path / "dataset", tmp_path / "classifier", tmp_path / "classifier.json")
    cgan = build_model(params.model("cgan"), 1, len(CLASSES), CLASSES)  # untrained: its scores need not be good
    save_trained_model(cgan, {"family": "cgan", "config": params.model("cgan").model_dump(mode="json"),
                              "channels": 1, "num_classes": len(CLASSES), "classes": CLASSES}, tmp_path / "cgan")

    evaluate_stage(params, "cgan", tmp_path / "dataset", tmp_path / "classifier", tmp_path / "cgan", tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 < metrics["fid_floor"] < metrics["fid"]
    assert 0 <= metrics["cas"] <= 1

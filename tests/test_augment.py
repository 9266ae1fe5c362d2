"""The `augment` metric (the lecture's "a VAE boosts a classifier when data is scarce"): real
Fashion-MNIST samples of the asked class lift a classifier trained on 5 real images per class,
uniform noise does not; unconditional models are skipped; missing inputs and too few real images
fail naming what to set; the same seed gives the same scores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fashion import CLASSES, fashion_subset
from model_configs import model_config
from components.config import AugmentConfig, ClassifierConfig
from components.evaluation.augment import augment_scores
from components.evaluation.classifier import Classifier
from components.evaluation.metrics import METRICS, EvalContext
from components.models import GenerativeModel, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = {"augment_acc_real", "augment_acc_mixed", "augment_gain"}
TINY_CLASSIFIER = ClassifierConfig(arch="cnn", epochs=1, batch_size=16, lr=0.003, width=4, seed=0, vit=None)
GAIN_CLASSIFIER = ClassifierConfig(arch="cnn", epochs=4, batch_size=64, lr=0.003, width=16, seed=0, vit=None)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1  # [-1, 1]


class RealImagesOfTheClass(GenerativeModel):
    """An oracle conditional 'model': its samples are real training images of the asked class,
    drawn at random with the generator from a pool the scarce subset never sees."""

    conditional = True
    image_size, channels, latent_dim = 28, 1, 1

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.classes, self.num_classes = CLASSES, len(CLASSES)
        self.anchor = nn.Parameter(torch.zeros(1))  # where the model lives, for check_labels
        self.pools = [images_u8[labels == k] for k in range(self.num_classes)]

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None, prompts=None):
        picks = [self.pools[k][torch.randint(len(self.pools[k]), (), generator=generator)]
                 for k in self.check_labels(labels, n)]
        return to_unit(torch.stack(picks))  # (n, 1, 28, 28)


class UniformNoise(GenerativeModel):
    """A conditional 'model' whose samples are uniform noise, whatever the class."""

    conditional = True
    image_size, channels, latent_dim = 28, 1, 1

    def __init__(self):
        super().__init__()
        self.classes, self.num_classes = CLASSES, len(CLASSES)
        self.anchor = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None, prompts=None):
        self.check_labels(labels, n)
        return torch.rand(n, 1, 28, 28, generator=generator) * 2 - 1  # (n, 1, 28, 28)


@pytest.fixture(scope="module")
def fashion():
    """Scarce-pick source (100 per class), a disjoint oracle pool (200 per class), the reference."""
    images, labels = fashion_subset(300, "train")  # class-interleaved: the first 1000 are 100 per class
    test_u8, test_labels = fashion_subset(100, "test")
    return {"train": (images[:1000], labels[:1000]), "pool": (images[1000:], labels[1000:]),
            "test": (to_unit(test_u8), test_labels)}


def context(model, fashion, real_per_class: int, generated_per_class: int, classifier_config=TINY_CLASSIFIER,
            seed: int = 7, **fields) -> EvalContext:
    real, real_labels = fashion["test"]
    train_u8, train_labels = fashion["train"]
    inputs = {"train_u8": train_u8, "train_labels": train_labels, "real_labels": real_labels,
              "classifier_config": classifier_config,
              "augment": AugmentConfig(real_per_class=real_per_class, generated_per_class=generated_per_class)}
    inputs.update(fields)
    return EvalContext(model=model, classifier=Classifier(1, len(CLASSES), 4), real=real, fake=real[:0],
                       kid_subset_size=2, seed=seed, **inputs)


def tiny_model(family: str):
    return build_model(model_config(family), 1, num_classes=len(CLASSES), classes=CLASSES).eval()


def test_real_samples_of_the_class_lift_a_scarce_classifier_and_noise_does_not(fashion):
    oracle = augment_scores(context(RealImagesOfTheClass(*fashion["pool"]), fashion, 5, 50, GAIN_CLASSIFIER))
    noise = augment_scores(context(UniformNoise(), fashion, 5, 50, GAIN_CLASSIFIER))
    # Both are the same real-only classifier: same pick, same steps, same seed.
    assert oracle["augment_acc_real"] == noise["augment_acc_real"]
    assert oracle["augment_gain"] == pytest.approx(oracle["augment_acc_mixed"] - oracle["augment_acc_real"])
    assert oracle["augment_acc_real"] > 0.3  # 50 real images teach something
    assert oracle["augment_gain"] > 0.04  # 0.15 at seed 7; 0.06 to 0.14 at seeds 0 to 4
    assert noise["augment_gain"] < oracle["augment_gain"] / 2


def test_the_metric_registry_runs_it_for_a_conditional_zoo_model_and_seeds_repeat(fashion):
    model = tiny_model("cvae")
    first = METRICS.get("augment")(context(model, fashion, 2, 3))
    assert set(first) == KEYS
    assert all(0 <= first[key] <= 1 for key in ("augment_acc_real", "augment_acc_mixed"))
    again = context(model, fashion, 2, 3)
    before = torch.get_rng_state()
    assert augment_scores(again) == first
    assert torch.equal(torch.get_rng_state(), before)  # the metrics after it draw what they would without it


def test_unconditional_models_and_stored_samples_are_skipped(fashion):
    assert augment_scores(context(tiny_model("vae"), fashion, 2, 3)) == {}
    assert augment_scores(context(None, fashion, 2, 3)) == {}
    # Nothing is checked for a model the metric does not apply to.
    assert augment_scores(context(tiny_model("vae"), fashion, 2, 3, augment=None, train_u8=None)) == {}


@pytest.mark.parametrize("field, named", [
    ("augment", r"augment \(the `evaluate.augment` params\)"),
    ("classifier_config", r"classifier_config \(the `classifier:` params\)"),
    ("train_u8", r"train_u8 \(the training split's images\)"),
    ("train_labels", r"train_labels \(the training split's labels\)"),
    ("real_labels", r"real_labels \(the reference images' labels\)"),
])
def test_a_missing_input_is_named_with_where_it_comes_from(fashion, field, named):
    with pytest.raises(ValueError, match=named):
        augment_scores(context(tiny_model("cvae"), fashion, 2, 3, **{field: None}))


def test_mismatched_labels_are_refused(fashion):
    train_labels = fashion["train"][1]
    with pytest.raises(ValueError, match="train_labels has 999 labels for 1000 images"):
        augment_scores(context(tiny_model("cvae"), fashion, 2, 3, train_labels=train_labels[:-1]))
    with pytest.raises(ValueError, match=r"real_labels holds class ids outside the model's 0..9"):
        augment_scores(context(tiny_model("cvae"), fashion, 2, 3, real_labels=fashion["test"][1] + 1))


def test_a_class_with_too_few_real_images_names_the_setting(fashion):
    train_u8, train_labels = fashion["train"]
    keep = (train_labels != 3) | (torch.arange(train_labels.shape[0]) < 100)  # class 3 (Dress) keeps 10
    with pytest.raises(ValueError, match=r"augment needs 11 training images of class 3 \(Dress\) "
                                         r"\(evaluate.augment.real_per_class\); the train split has 10"):
        augment_scores(context(tiny_model("cvae"), fashion, 11, 3, train_u8=train_u8[keep],
                               train_labels=train_labels[keep]))
    assert set(augment_scores(context(tiny_model("cvae"), fashion, 10, 3, train_u8=train_u8[keep],
                                      train_labels=train_labels[keep]))) == KEYS

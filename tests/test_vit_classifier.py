"""The ViT evaluator (classifier.arch: vit) beside the CNN: shapes, learning, the classifier stage's
save and load, the CNN left as it was, and params that name their bad key."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.config import ConfigError, apply_overrides, read_params_raw
from components.data.pack import pack_dataset
from components.data.sources import RawDataset, Split
from components.evaluation.classifier import (FEATURES, Classifier, FeatureExtractor, ViT, build_classifier,
                                              classifier_spec, predict, random_crop_flip, train_classifier)
from components.params import parse_params
from components.pipeline import classifier_stage, load_classifier
from fashion import CLASSES, fashion_subset

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = ["classifier.arch=vit", "classifier.batch_size=20", "classifier.vit.dim=32", "classifier.vit.depth=2",
            "classifier.vit.heads=2", "classifier.vit.epochs=6", "classifier.vit.lr=0.003"]

pytestmark = pytest.mark.usefixtures("one_thread")


def params_with(*overrides: str):
    return parse_params(apply_overrides(read_params_raw(REPO / "params.yaml"), list(overrides)))


def problems_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        params_with(*overrides)
    return str(err.value)


@pytest.mark.parametrize("dim, pool", [(32, "mean"), (FEATURES, "cls")])
def test_vit_gives_the_cnns_feature_shape_and_logits(dim, pool):
    model = ViT(channels=1, num_classes=7, patch=4, dim=dim, depth=1, heads=4, mlp_ratio=2, pool=pool, stem="patch").eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model.features(x).shape == (5, FEATURES) == Classifier(1, 7, 4).features(x).shape
    assert model(x).shape == (5, 7)
    # what FID/KID call: any size in, (N, FEATURES) out
    assert FeatureExtractor(model)(torch.rand(3, 1, 64, 64) * 2 - 1).shape == (3, FEATURES)


@pytest.mark.parametrize("patch, grid", [(4, 7), (2, 14)])
def test_conv_stem_reaches_the_patch_token_grid_with_the_same_features(patch, grid):
    model = ViT(channels=1, num_classes=10, patch=patch, dim=32, depth=1, heads=2, mlp_ratio=2, pool="mean",
                stem="conv").eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert model.embed(x).shape == (3, 32, grid, grid)
    assert any(isinstance(layer, torch.nn.BatchNorm2d) for layer in model.embed)
    assert model.features(x).shape == (3, FEATURES) and model(x).shape == (3, 10)
    assert FeatureExtractor(model)(torch.rand(2, 1, 64, 64) * 2 - 1).shape == (2, FEATURES)


def test_patch_stem_is_the_networks_first_layer_as_before():
    # its parameter names and place in the init order are what trained classifiers and their results rely on
    torch.manual_seed(3)
    model = ViT(channels=1, num_classes=10, patch=4, dim=32, depth=1, heads=2, mlp_ratio=2, pool="mean", stem="patch")
    torch.manual_seed(3)
    alone = torch.nn.Conv2d(1, 32, 4, stride=4)
    assert [name for name in model.state_dict() if name.startswith("embed.")] == ["embed.weight", "embed.bias"]
    assert torch.equal(model.embed.weight, alone.weight) and torch.equal(model.embed.bias, alone.bias)


def test_vit_loss_falls_on_a_tiny_set():
    # no augmentation or smoothing here: fitting a tiny set is what is asked
    cfg = params_with(*TINY_VIT, "classifier.vit.epochs=20", "classifier.vit.crop_pad=0", "classifier.vit.flip=false",
                      "classifier.vit.label_smoothing=0").classifier
    images, labels = fashion_subset(per_class=10)  # 100 real items
    x = images.float() / 127.5 - 1

    def loss_of(model):
        with torch.no_grad():
            return float(F.cross_entropy(model.eval()(x), labels))

    torch.manual_seed(cfg.seed)
    before = loss_of(build_classifier(classifier_spec(cfg, 1, len(CLASSES))))
    after = loss_of(train_classifier(images, labels, len(CLASSES), cfg, progress=False))
    assert before == pytest.approx(np.log(len(CLASSES)), abs=0.3)  # untrained: about uniform
    assert after < 0.6 * before, (before, after)


def test_random_crop_flip_shifts_and_mirrors_within_the_padding():
    x = torch.rand(64, 1, 28, 28)
    assert torch.equal(random_crop_flip(x, 0, False), x)
    out = random_crop_flip(x, 2, True)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    for image, source in zip(out, padded):
        crops = [source[:, dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(image, c) or torch.equal(image, c.flip(-1)) for c in crops)
    assert not torch.equal(out, x)


def tiny_dataset(folder: Path, params) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed dataset of real items (60 train, 30 test) where the classifier stage reads it."""
    train, test = fashion_subset(per_class=6), fashion_subset(per_class=3, split="test")
    splits = {name: Split(images.numpy(), labels.numpy(), [f"{name}#{i}" for i in range(len(labels))])
              for name, (images, labels) in {"train": train, "test": test}.items()}
    pack_dataset(RawDataset(classes=CLASSES, splits=splits, rejected=[]), folder, params.data, {"name": "unit"})
    return train


@pytest.mark.parametrize("arch, stem", [("vit", "patch"), ("vit", "conv"), ("cnn", "patch")])
def test_stage_save_then_load_rebuilds_the_arch_with_identical_predictions(arch, stem, tmp_path, monkeypatch):
    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / ".genpipe"))
    monkeypatch.setenv("GENPIPE_DEVICE", "cpu")
    params = params_with(*TINY_VIT[1:], f"classifier.arch={arch}", "classifier.epochs=1", "classifier.width=4",
                         f"classifier.vit.stem={stem}")
    images, labels = tiny_dataset(tmp_path / "dataset", params)
    classifier_stage(params, tmp_path / "dataset", tmp_path / "classifier", tmp_path / "metrics.json")

    spec = json.loads((tmp_path / "classifier" / "classifier.json").read_text())
    assert spec["arch"] == arch and spec["channels"] == 1 and spec["num_classes"] == len(CLASSES)
    loaded = load_classifier(tmp_path / "classifier")
    assert type(loaded) is {"vit": ViT, "cnn": Classifier}[arch]
    if arch == "vit":
        assert spec["vit"]["stem"] == stem
        assert isinstance(loaded.embed, torch.nn.Sequential) == (stem == "conv")
    with torch.random.fork_rng(devices=[]):
        trained = train_classifier(images, labels, len(CLASSES), params.classifier, progress=False)
    probe = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(predict(loaded, probe), predict(trained, probe))


def test_a_classifier_json_without_arch_loads_as_the_cnn(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("GENPIPE_DEVICE", "cpu")
    torch.manual_seed(0)
    old = Classifier(1, 10, 4).eval()
    save_file(old.state_dict(), str(tmp_path / "classifier.safetensors"))
    (tmp_path / "classifier.json").write_text(json.dumps({"channels": 1, "num_classes": 10, "width": 4,
                                                          "dataset_version": "v"}))
    loaded = load_classifier(tmp_path)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert type(loaded) is Classifier and torch.equal(loaded(x), old(x))


def test_a_vit_classifier_json_without_stem_loads_the_patch_stem(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("GENPIPE_DEVICE", "cpu")
    sizes = {"patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "pool": "mean"}  # written before stems
    torch.manual_seed(0)
    old = ViT(1, 10, **sizes, stem="patch").eval()
    save_file(old.state_dict(), str(tmp_path / "classifier.safetensors"))
    (tmp_path / "classifier.json").write_text(json.dumps({"arch": "vit", "channels": 1, "num_classes": 10,
                                                          "vit": sizes, "dataset_version": "v"}))
    loaded = load_classifier(tmp_path)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert isinstance(loaded.embed, torch.nn.Conv2d) and torch.equal(loaded(x), old(x))


def test_cnn_is_deterministic_and_ignores_the_vit_section():
    images, labels = fashion_subset(per_class=8)
    cnn = params_with("classifier.epochs=1", "classifier.width=4", "classifier.batch_size=16").classifier
    other_vit = cnn.model_copy(update={"vit": cnn.vit.model_copy(update={"dim": 16, "epochs": 1, "flip": False})})
    no_vit = cnn.model_copy(update={"vit": None})
    assert classifier_spec(cnn, 1, 10) == {"arch": "cnn", "channels": 1, "num_classes": 10, "width": 4}

    def weights(cfg):
        model = train_classifier(images, labels, len(CLASSES), cfg, progress=False)
        return type(model), model.state_dict()

    kind, first = weights(cnn)
    assert kind is Classifier
    for cfg in (cnn, other_vit, no_vit):
        again_kind, again = weights(cfg)
        assert again_kind is Classifier and again.keys() == first.keys()
        assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("overrides, expected", [
    (["classifier.arch=resnet"], "classifier.arch: must be one of 'cnn' or 'vit', got 'resnet'"),
    (["classifier.vit.heads=5"], "classifier.vit.heads: must divide dim (64)"),
    (["classifier.vit.patch=5"], "classifier.vit.patch: must divide the classifier's 28×28 input"),
    (["classifier.vit.pool=max"], "classifier.vit.pool: must be one of 'cls' or 'mean', got 'max'"),
    (["classifier.vit.stem=conv3"], "classifier.vit.stem: must be one of 'patch' or 'conv', got 'conv3'"),
    (["classifier.vit.stem=conv", "classifier.vit.patch=7"], "classifier.vit.stem: conv halves the input to the "
                                                             "token grid, so it needs patch 2 or 4 (patch is 7)"),
    (["classifier.vit.depth=0"], "classifier.vit.depth: must be > 0, got 0"),
    (["classifier.vit.warmup=1"], "classifier.vit.warmup: must be < 1, got 1"),
    (["classifier.arch=vit", "classifier.vit=null"], "classifier.vit: missing: arch is vit, so add the vit section"),
])
def test_a_bad_arch_or_vit_field_names_its_key(overrides, expected):
    assert expected in problems_of(*overrides)


def test_an_unknown_vit_key_is_refused():
    raw = read_params_raw(REPO / "params.yaml")
    raw["classifier"]["vit"]["dpeth"] = 6
    with pytest.raises(ConfigError, match=r"classifier\.vit\.dpeth: unknown key; remove it or fix its spelling"):
        parse_params(raw)

"""4x super-resolution: srresnet and srgan shapes, the documented degradation, the untrained model
being bicubic, losses going down, and srgan's evaluator (required, frozen, never saved)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from components.config import apply_overrides, apply_profile, read_params_raw
from components.evaluation.classifier import Classifier
from components.images import to_model_input
from components.models import FAMILIES, build_model
from components.models.sr import downscale, upscale_bicubic
from components.params import parse_params
from components.training.checkpoint import save_weights
from components.training.trainer import Trainer
from model_configs import model_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def images_u8(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Smooth blobs with edges (something a 4x upscaler can learn), uint8 N×1×size×size."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=g) - 0.5
    radius = 0.3 + 0.4 * torch.rand(n, 1, 1, generator=g)
    inside = ((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2).sqrt() < radius  # (n, size, size)
    stripes = (torch.sin(xx * 6 + 3 * torch.rand(n, 1, 1, generator=g)) > 0)
    return (inside * (150 + 100 * stripes)).to(torch.uint8)[:, None]


def evaluator(channels: int = 1) -> Classifier:
    """The evaluator's architecture at a tiny width, seeded weights (its features need no training here)."""
    torch.manual_seed(0)
    return Classifier(channels, 10, 4).eval()


def sr_model(family: str, size: int = 28, **overrides):
    model = build_model(model_config(family, image_size=size, **overrides), 1, 10)
    if FAMILIES.get(family).uses_evaluator:
        model.set_evaluator(evaluator())
    return model


@pytest.mark.parametrize("family", ["srresnet", "srgan"])
@pytest.mark.parametrize("size, low", [(28, 7), (64, 16)])
def test_shapes(family, size, low):
    model = sr_model(family, size).eval()
    x = to_model_input(images_u8(3, size), size, "cpu")  # (3, 1, size, size)
    inputs = model.degrade(x)
    assert inputs["images"].shape == (3, 1, low, low)
    assert FAMILIES.get(family).input_shape(model.cfg, 1) == (1, low, low)
    out = model.translate(inputs)
    assert out.shape == (3, 1, size, size) and out.min() >= -1 and out.max() <= 1
    assert model.baselines(inputs)["bicubic"].shape == (3, 1, size, size)


def test_the_degradation_is_an_antialiased_bicubic_downscale_as_pil_makes_it():
    # Mid-range greys: PIL rounds and clips to uint8 after each 1-D pass, which changes overshooting edges.
    x_u8 = (images_u8(4) // 2 + 60)
    ours = downscale(to_model_input(x_u8, 28, "cpu"), 4)  # (4, 1, 7, 7) in [-1, 1]
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(img[0].numpy()).resize((7, 7), Image.BICUBIC)))
                       for img in x_u8]).float()[:, None] / 127.5 - 1
    assert (ours - pil).abs().max() <= 1.5 / 127.5  # within PIL's rounding
    plain = torch.nn.functional.interpolate(to_model_input(x_u8, 28, "cpu"), scale_factor=0.25, mode="bicubic")
    assert (plain - pil).abs().max() > 5 / 127.5  # bicubic without antialiasing is another degradation

    # A one-pixel checkerboard averages to flat grey; bicubic without antialiasing would alias it.
    checker = ((torch.arange(28)[:, None] + torch.arange(28)) % 2).float().mul(2).sub(1)[None, None]  # ±1
    assert downscale(checker, 4).abs().max() < 0.05


def test_the_untrained_srresnet_is_bicubic_upscaling():
    model = sr_model("srresnet").eval()
    inputs = model.degrade(to_model_input(images_u8(4), 28, "cpu"))
    assert torch.equal(model.translate(inputs), upscale_bicubic(inputs["images"], 4))
    assert torch.equal(model.translate(inputs), model.baselines(inputs)["bicubic"])


def train_on_one_batch(model, steps: int) -> list[dict[str, float]]:
    """Walk the model's phases `steps` times on one fixed batch, as the trainer does; each step's logs."""
    x = to_model_input(images_u8(16), model.image_size, "cpu")
    optimizers, history = model.optimizers(), []
    model.train()
    for _ in range(steps):
        logs = {}
        for phase, out in model.training_losses(x, torch.zeros(16, dtype=torch.long)):
            optimizers[phase].zero_grad(set_to_none=True)
            out.loss.backward()
            optimizers[phase].step()
            logs.update({k: float(v.detach()) for k, v in out.logs.items()})
        history.append(logs)
    return history


@pytest.mark.parametrize("family", ["srresnet", "srgan"])
def test_the_loss_goes_down_on_a_fixed_batch(family):
    history = train_on_one_batch(sr_model(family, lr=3e-3, width=8), steps=60)
    first, last = history[0]["loss_mse"], np.mean([h["loss_mse"] for h in history[-5:]])
    assert last < 0.5 * first, (first, last)
    if family == "srgan":  # the perceptual term falls too, with the adversarial game running
        assert {"loss_d", "loss_adversarial", "loss_perceptual"} <= set(history[-1])
        assert np.mean([h["loss_perceptual"] for h in history[-5:]]) < history[0]["loss_perceptual"]


def test_srgan_warms_up_on_pixel_mse_then_plays_the_game_and_counts_through_a_state_dict():
    model = sr_model("srgan", warmup_steps=2)
    x = to_model_input(images_u8(8), 28, "cpu")
    phases = [[phase for phase, _ in model.training_losses(x, torch.zeros(8, dtype=torch.long))] for _ in range(3)]
    assert phases == [["generator"], ["generator"], ["discriminator", "generator"]]

    restored = build_model(model.cfg, 1, 10)  # a resumed run: the count comes back with the weights
    restored.load_state_dict(model.state_dict())
    assert restored.steps_done == 3


def test_srgan_without_an_evaluator_says_how_to_give_it_one():
    model = build_model(model_config("srgan"), 1, 10)
    with pytest.raises(ValueError, match=r"srgan: no evaluator classifier .*set_evaluator\(classifier\)"):
        train_on_one_batch(model, steps=1)
    with pytest.raises(ValueError, match="evaluator classifier takes 3-channel images, the model makes 1-channel"):
        model.set_evaluator(evaluator(channels=3))


def test_srgan_trains_on_a_vit_evaluators_features_too():
    from components.evaluation.classifier import ViT

    torch.manual_seed(0)
    vit = ViT(channels=1, num_classes=10, patch=4, dim=16, depth=1, heads=2, mlp_ratio=2, pool="mean").eval()
    model = build_model(model_config("srgan", perceptual_weight=1.0), 1, 10)
    model.set_evaluator(vit)
    train_on_one_batch(model, steps=1)  # the perceptual loss compares the ViT's 128-d features
    with pytest.raises(ValueError, match="evaluator classifier takes 3-channel images, the model makes 1-channel"):
        model.set_evaluator(ViT(channels=3, num_classes=10, patch=4, dim=16, depth=1, heads=2, mlp_ratio=2,
                                pool="mean"))


def test_the_evaluator_is_frozen_and_never_saved_with_the_model(tmp_path):
    classifier = evaluator()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    model = build_model(model_config("srgan", perceptual_weight=1.0, ema_decay=0.9), 1, 10)
    model.set_evaluator(classifier)
    assert not [k for k in model.state_dict() if k.startswith(("_evaluator", "evaluator"))]
    assert set(dict(model.named_children())) == {"generator", "discriminator"}

    trainer = Trainer(model, model.cfg, progress=False, checkpoint_path=tmp_path / "last.pt", checkpoint_every=1)
    trainer.fit(images_u8(16), torch.zeros(16, dtype=torch.long))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert not [k for part in ("model", "ema") for k in checkpoint[part] if "evaluator" in k or k.startswith("body")]
    assert all(torch.equal(before[k], v) for k, v in model._evaluator.state_dict().items())  # frozen
    assert all(p.requires_grad for p in classifier.parameters())  # the caller's classifier is left as it was

    save_weights(model, tmp_path / "model.safetensors")  # what the registry holds loads without an evaluator
    reloaded = build_model(model.cfg, 1, 10)
    reloaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x = model.degrade(to_model_input(images_u8(2), 28, "cpu"))
    assert torch.equal(reloaded.eval().translate(x), model.translate(x))


@pytest.fixture
def srgan_stage(tmp_path, monkeypatch):
    """params with a tiny srgan, a packed dataset, and an evaluator classifier folder."""
    import contextlib

    from components.data.pack import pack_dataset
    from components.data.sources import RawDataset, Split

    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / ".genpipe"))
    monkeypatch.setenv("GENPIPE_DEVICE", "cpu")
    raw = read_params_raw(REPO / "params.yaml")
    apply_profile(raw, REPO / "profiles" / "zoo.yaml")  # the whole zoo: srgan is in params.yaml, srresnet here
    raw = apply_overrides(raw, [
        "train.srgan.epochs=1", "train.srgan.batch_size=8", "train.srgan.width=4", "train.srgan.blocks=1",
        "train.srgan.ndf=4", "train.srgan.warmup_steps=2", "tracking.log_every=1"])
    params = parse_params(raw)
    images = images_u8(40).numpy()
    labels = (np.arange(40) % 4).astype(np.int64)
    split = lambda a, b: Split(images[a:b], labels[a:b], [f"x#{i}" for i in range(a, b)])  # noqa: E731
    pack_dataset(RawDataset(classes=list("abcd"), splits={"train": split(0, 32), "test": split(32, 40)}),
                 tmp_path / "dataset", params.data, {"name": "unit"})
    (tmp_path / "classifier").mkdir()
    save_weights(evaluator(), tmp_path / "classifier" / "classifier.safetensors")
    (tmp_path / "classifier" / "classifier.json").write_text(json.dumps({"channels": 1, "num_classes": 10,
                                                                          "width": 4}))

    class FakeLog:
        run_id = "run-1"

        def __call__(self, values, step):
            logged.append(values)

    logged: list[dict] = []

    @contextlib.contextmanager
    def training_run(experiment, run_name, params, tags, **kwargs):  # no MLflow needed here
        yield FakeLog()

    monkeypatch.setattr("components.tracking.runs.training_run", training_run)
    return params, tmp_path, logged


def test_the_train_stage_trains_srgan_with_the_evaluator_and_refuses_without_one(srgan_stage):
    from components.pipeline import train_stage
    from components.tracking.model_files import load_trained_model

    params, tmp_path, logged = srgan_stage
    out = tmp_path / "models" / "srgan"
    with pytest.raises(ValueError, match=r"train.srgan: the srgan family trains on the evaluator classifier's "
                                         r"features; pass its folder \(genpipe train srgan --classifier"):
        train_stage(params, "srgan", tmp_path / "dataset", out, tmp_path / "srgan.json")
    assert not out.exists()

    train_stage(params, "srgan", tmp_path / "dataset", out, tmp_path / "srgan.json",
                classifier_dir=tmp_path / "classifier")
    assert "loss_perceptual" in logged[-1] and "loss_perceptual" not in logged[0]  # the game after 2 warm-up steps
    model = load_trained_model(out)
    assert model.steps_done == 4 and model._evaluator is None

"""The autoencoder (plain and denoising) and the class-conditional VAE: shapes, learning, seeded
noise, label checks, the registry's declarations, and class-conditional samples judged by the
pipeline's classifier on real Fashion-MNIST."""
from __future__ import annotations

import json

import pytest
import torch

from fashion import CLASSES, evaluator, fashion_subset
from model_configs import model_config
from components.evaluation.classifier import predict
from components.evaluation.metrics import METRICS, EvalContext
from components.images import to_model_input
from components.models import FAMILIES, build_model
from components.tracking.model_files import load_trained_model, save_trained_model
from components.training.trainer import Trainer
from test_trainer import structured_images

pytestmark = pytest.mark.usefixtures("one_thread")

FOUR = ["bar", "column", "square", "diagonal"]
SIZES = pytest.mark.parametrize("size", [28, 64]), pytest.mark.parametrize("channels", [1, 3])


def sizes(fn):
    for mark in SIZES:
        fn = mark(fn)
    return fn


def make(family: str, size: int = 28, channels: int = 1, classes=FOUR, **overrides):
    return build_model(model_config(family, image_size=size, **overrides), channels, len(classes), classes)


def images_in(n: int, channels: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1




def fixed_loss(model, x, y) -> float:
    """The model's training loss on x with fixed noise, leaving its weights and buffers as they were."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        loss = next(model.training_losses(x, y, torch.Generator().manual_seed(99)))[1].loss.item()
    model.load_state_dict(state)
    model.eval()
    return loss


def small(family: str, **overrides):
    fields = {"ae": {"latent_dim": 8, "width": 8, "denoise_std": 0.0},
              "cvae": {"latent_dim": 4, "width": 8, "beta": 1.0}}[family]
    return model_config(family, **{"epochs": 4, "batch_size": 16, "lr": 3e-3, **fields, **overrides})


# --- declarations ---------------------------------------------------------------------------------

def test_families_declare_their_kind_and_conditions():
    assert FAMILIES.get("ae").kind == "reconstruct" and FAMILIES.get("ae").conditions == ()
    assert FAMILIES.get("cvae").kind == "generate" and FAMILIES.get("cvae").conditions == ("labels",)
    ae, cvae = make("ae"), make("cvae")
    assert not ae.conditional and cvae.conditional
    assert set(ae.ema_modules) == {"encoder", "decoder"} and set(cvae.ema_modules) == {"encoder", "decoder"}
    assert all(hasattr(m, name) for m in (ae, cvae) for name in m.ema_modules)
    assert not getattr(ae, "gaussian_prior", False) and cvae.gaussian_prior  # traversal only where a prior exists


@pytest.mark.parametrize("family, field, value, rule", [
    ("ae", "denoise_std", -0.1, "greater than or equal"),
    ("ae", "latent_dim", 0, "greater than"),
    ("cvae", "beta", -1.0, "greater than or equal"),
])
def test_configs_refuse_bad_values(family, field, value, rule):
    with pytest.raises(ValueError, match=f"(?s){field}.*{rule}"):
        model_config(family, **{field: value})


@pytest.mark.parametrize("family", ["ae", "cvae"])
def test_configs_have_no_defaults_and_refuse_unknown_keys(family):
    from model_configs import model_fields

    fields = model_fields(family)
    fields.pop("width")
    with pytest.raises(ValueError, match="width"):
        FAMILIES.get(family).config.model_validate(fields)
    with pytest.raises(ValueError, match="dropout"):
        FAMILIES.get(family).config.model_validate({**model_fields(family), "dropout": 0.1})


# --- shapes ---------------------------------------------------------------------------------------

@sizes
def test_ae_encode_decode_reconstruct_shapes_and_range(size, channels):
    model = make("ae", size, channels).eval()
    x = images_in(5, channels, size)
    z = model.encode(x)
    assert z.shape == (5, model.latent_dim)
    for out in (model.decode(z), model.reconstruct(x)):
        assert out.shape == (5, channels, size, size)
        assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(model.reconstruct(x), model.decode(z))


def test_ae_is_not_a_sampler():
    with pytest.raises(TypeError, match="not a sampler.*reconstruct"):
        make("ae").sample(4)


@sizes
def test_cvae_sample_encode_decode_shapes_and_range(size, channels):
    model = make("cvae", size, channels).eval()
    out = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, channels, size, size)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    mu, logvar = model.encode(images_in(3, channels, size), torch.tensor([0, 1, 3]))
    assert mu.shape == logvar.shape == (3, model.latent_dim)
    assert model.decode(mu, torch.tensor([2, 2, 2])).shape == (3, channels, size, size)


def test_cvae_labels_default_to_classes_in_turn_and_change_the_images():
    model = make("cvae").eval()
    default = model.sample(8, generator=torch.Generator().manual_seed(3))
    in_turn = model.sample(8, generator=torch.Generator().manual_seed(3), labels=torch.arange(8) % 4)
    all_zero = model.sample(8, generator=torch.Generator().manual_seed(3), labels=[0] * 8)
    assert torch.equal(default, in_turn)
    assert not torch.allclose(default[1:4], all_zero[1:4])  # same noise, other label: other image


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 1, 4]), r"labels: class ids must be in 0\.\.3 \(bar, column, square, diagonal\), got \[4\]"),
    (torch.tensor([-1, 0, 0]), r"labels: class ids must be in 0\.\.3.*got \[-1\]"),
    (torch.tensor([0, 1]), r"labels: expected 3 integer class ids.*shape \(2,\)"),
    (torch.tensor([0.0, 1.0, 2.0]), r"labels: expected 3 integer class ids.*float32"),
])
def test_cvae_bad_labels_fail_naming_the_field_and_the_valid_range(labels, message):
    with pytest.raises(ValueError, match=message):
        make("cvae").sample(3, labels=labels)


def test_cvae_refuses_prompts_pointing_to_labels():
    with pytest.raises(ValueError, match="prompts: .*class ids only; pass labels in 0..3"):
        make("cvae").sample(2, prompts=["ankle boot", "bag"])


def test_cvae_round_trips_through_the_model_files(tmp_path):
    model = make("cvae").eval()
    spec = {"family": "cvae", "config": model.cfg.model_dump(mode="json"), "channels": 1,
            "num_classes": 4, "classes": FOUR}
    save_trained_model(model, spec, tmp_path)
    loaded = load_trained_model(tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["classes"] == FOUR
    a = model.sample(4, generator=torch.Generator().manual_seed(5), labels=[3, 2, 1, 0])
    b = loaded.sample(4, generator=torch.Generator().manual_seed(5), labels=[3, 2, 1, 0])
    assert torch.equal(a, b)


def test_recon_mse_scores_the_ae_and_skips_the_cvae():
    real = images_in(6, 1, 28)
    scored = METRICS.get("recon_mse")(EvalContext(model=make("ae"), classifier=None, real=real, fake=real,
                                                  kid_subset_size=2))
    assert 0 < scored["recon_mse"] < 1
    # The cvae reconstructs only given labels, which the metric does not pass: no score, no crash.
    assert METRICS.get("recon_mse")(EvalContext(model=make("cvae"), classifier=None, real=real, fake=real,
                                                kid_subset_size=2)) == {}


# --- learning -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, overrides", [("ae", {}), ("ae", {"denoise_std": 0.3}), ("cvae", {})])
def test_training_lowers_the_loss_on_a_fixed_batch(family, overrides):
    images, labels = structured_images()
    cfg = small(family, **overrides)
    model = build_model(cfg, 1, 4, FOUR)
    x = to_model_input(images, 28, "cpu")
    before = fixed_loss(model, x, labels)
    Trainer(model, cfg, progress=False).fit(images, labels)
    after = fixed_loss(model, x, labels)
    assert after < 0.7 * before, (before, after)


def test_denoising_noise_comes_from_the_generator_only():
    model = make("ae", denoise_std=0.5).train()
    x, y = images_in(4, 1, 28), torch.zeros(4, dtype=torch.long)

    def loss(seed):
        torch.manual_seed(seed)  # the global RNG must not matter
        return next(model.training_losses(x, y, torch.Generator().manual_seed(7)))[1].loss
    assert torch.equal(loss(0), loss(1))
    other = next(model.training_losses(x, y, torch.Generator().manual_seed(8)))[1].loss
    assert not torch.equal(loss(0), other)
    plain = make("ae").train()  # denoise_std 0: no draw at all, any generator gives the same loss
    assert torch.equal(next(plain.training_losses(x, y, torch.Generator().manual_seed(7)))[1].loss,
                       next(plain.training_losses(x, y, torch.Generator().manual_seed(8)))[1].loss)


def test_denoising_training_is_reproducible():
    images, labels = structured_images()
    cfg = small("ae", denoise_std=0.4, epochs=2)
    weights = []
    for seed in (123, 456):
        model = build_model(cfg, 1, 4, FOUR)
        torch.manual_seed(seed)  # whatever the global RNG holds: the trainer's generator supplies the noise
        Trainer(model, cfg, progress=False).fit(images, labels)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    plain = build_model(small("ae", epochs=2), 1, 4, FOUR)
    Trainer(plain, plain.cfg, progress=False).fit(images, labels)
    assert any(not torch.equal(weights[0][k], v) for k, v in plain.state_dict().items() if v.is_floating_point())


def test_denoising_ae_removes_noise():
    """256 shape images, 30 epochs (~5 s): the reconstruction of a noisy input is far closer to the clean one."""
    images, labels = structured_images(256)
    cfg = small("ae", denoise_std=0.4, epochs=30)
    model = build_model(cfg, 1, 4, FOUR)
    Trainer(model, cfg, progress=False).fit(images, labels)
    clean = to_model_input(images, 28, "cpu")
    noisy = clean + 0.4 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    noise_mse = (noisy - clean).pow(2).mean()
    denoised_mse = (model.reconstruct(noisy) - clean).pow(2).mean()
    assert denoised_mse < 0.25 * noise_mse, (float(noise_mse), float(denoised_mse))


def test_cvae_samples_of_class_k_are_classified_k():
    """Setting: 300 Fashion-MNIST images per class, width 16, latent 4, β = 32, 10 epochs of batch 32
    at lr 2e-3 (~10 s on one thread). The large β keeps class information out of z in so short a
    training (at β = 1 the label is largely ignored: ~40 %), at the cost of variety; the test checks
    the conditioning, not sample quality. Measured: 84.8 % overall; sandals, whose blurred mean looks
    like a sneaker to the classifier, stay near 0 %."""
    images, labels = fashion_subset(300)
    cfg = model_config("cvae", latent_dim=4, width=16, beta=32.0, epochs=10, batch_size=32, lr=2e-3)
    model = build_model(cfg, 1, len(CLASSES), CLASSES)
    Trainer(model, cfg, progress=False).fit(images, labels)
    wanted = torch.arange(1000) % len(CLASSES)
    samples = model.sample(1000, generator=torch.Generator().manual_seed(0), labels=wanted)
    predicted = predict(evaluator(), samples).argmax(dim=1)
    per_class = [float((predicted[wanted == k] == k).float().mean()) for k in range(len(CLASSES))]
    accuracy = float((predicted == wanted).float().mean())
    assert accuracy >= 0.8, (accuracy, dict(zip(CLASSES, per_class)))
    assert sum(a >= 0.8 for a in per_class) >= 8, dict(zip(CLASSES, per_class))
    assert samples[wanted == 0].std(dim=0).mean() > 0.01  # z still matters: not one image per class

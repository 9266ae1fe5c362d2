"""Latent diffusion: the kl_ae's latent grid, the ldm built on a frozen autoencoder (parts), losses
going down on real images, deterministic DDIM, classifier-free guidance, the latent scale saved with
the weights, and request validation naming the field."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fashion import CLASSES, fashion_subset
from model_configs import model_config, model_fields
from components.models import FAMILIES, build_model
from components.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def autoencoder(size: int = 28, channels: int = 1, **overrides):
    return build_model(model_config("kl_ae", image_size=size, **overrides), channels, len(CLASSES), CLASSES)


def ldm(ae=None, size: int = 28, channels: int = 1, **overrides):
    ae = ae if ae is not None else autoencoder(size, channels)
    return build_model(model_config("ldm", image_size=size, **overrides), channels, len(CLASSES), CLASSES,
                       parts={"autoencoder": ae})


def fit(model, cfg, images, labels) -> list[float]:
    """Train with the pipeline's trainer; the logged losses, one per window of 5 steps."""
    losses: list[float] = []
    Trainer(model, cfg, log_every=5, progress=False,
            log_fn=lambda values, step: losses.append(values["loss"])).fit(images, labels)
    return losses


@pytest.fixture(scope="module")
def trained():
    """A kl_ae and an ldm on it, each trained briefly on 300 real images (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = fashion_subset(30)
        ae_cfg = model_config("kl_ae", width=8, latent_channels=2, epochs=6, batch_size=30, lr=3e-3)
        ae = build_model(ae_cfg, 1, len(CLASSES), CLASSES)
        ae_losses = fit(ae, ae_cfg, images, labels)
        cfg = model_config("ldm", width=16, epochs=8, batch_size=30, lr=3e-3, ema_decay=0.9)
        model = build_model(cfg, 1, len(CLASSES), CLASSES, parts={"autoencoder": ae.eval()})
        ldm_losses = fit(model, cfg, images, labels)
    finally:
        torch.set_num_threads(threads)
    return ae, ae_losses, model.eval(), ldm_losses


def test_families_declare_the_latent_grid_and_the_part():
    assert FAMILIES.get("kl_ae").spatial_latent and FAMILIES.get("kl_ae").kind == "reconstruct"
    family = FAMILIES.get("ldm")
    assert family.parts == ("autoencoder",) and family.kind == "generate"
    assert family.conditions == ("labels", "prompt") and not family.spatial_latent


@pytest.mark.parametrize("size, channels, side", [(28, 1, 7), (64, 3, 8)])
def test_kl_ae_encodes_to_a_grid_and_back(size, channels, side):
    ae = autoencoder(size, channels).eval()
    x = torch.rand(3, channels, size, size) * 2 - 1
    assert ae.latent_shape == (2, side, side) and ae.latent_dim == 2 * side * side
    mean, logvar = ae.posterior(x)
    assert mean.shape == logvar.shape == (3, 2, side, side)
    codes = ae.encode(x)
    assert codes.shape == (3, ae.latent_dim) and torch.equal(codes, mean.flatten(1))
    for z in (codes, mean):  # flat codes and grids decode alike
        out = ae.decode(z)
        assert out.shape == (3, channels, size, size) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(ae.reconstruct(x), ae.decode(codes))
    train_mode = ae.train().reconstruct(x)  # no batch norm or dropout: the ldm runs it frozen
    assert torch.equal(train_mode, ae.eval().reconstruct(x))
    with pytest.raises(TypeError, match="not a sampler"):
        ae.sample(2)


def test_kl_ae_loss_goes_down_on_real_images(trained):
    _, losses, _, _ = trained
    assert losses[-1] < 0.8 * losses[0], losses


def test_ldm_loss_goes_down_on_real_images(trained):
    _, _, model, losses = trained
    assert losses[0] > 0.8  # a fresh UNet predicts no noise: MSE ≈ 1 on unit-variance latents
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    assert float(model.latent_scale) > 0  # measured on the first batch


def test_ddim_is_deterministic_and_takes_any_step_count(trained):
    _, _, model, _ = trained
    a = model.sample(6, torch.Generator().manual_seed(3))
    b = model.sample(6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (6, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    z = model.noise(6, torch.Generator().manual_seed(3))
    assert z.shape == (6, model.latent_dim) and torch.equal(model.from_noise(z), a)
    for steps in (1, np.int64(7), model.cfg.timesteps):  # a request's parsed ints may be numpy's
        out = model.sample(2, torch.Generator().manual_seed(3), steps=steps)
        assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()
    assert not torch.equal(model.sample(6, torch.Generator().manual_seed(4)), a)


def test_guidance_changes_the_samples_and_prompts_match_labels(trained):
    _, _, model, _ = trained
    z = model.noise(4, torch.Generator().manual_seed(0))
    labels = torch.tensor([9, 9, 1, 1])
    unguided, guided = model.from_noise(z, labels, guidance=0.0), model.from_noise(z, labels, guidance=3.0)
    assert (unguided - guided).abs().max() > 1e-3
    # the two passes batched together at g ≈ 1 give the conditional pass alone (g = 1 runs only that one)
    grid, cond = z.view(4, *model.latent_shape), model.text_encoder(model.text_encoder.canonical_tokens[labels])
    torch.testing.assert_close(model._noise_estimate(grid, 5, cond, 1.0 + 1e-9),
                               model._noise_estimate(grid, 5, cond, 1.0), atol=1e-5, rtol=1e-5)
    by_prompt = model.from_noise(z, prompts=["ankle boot", "ankle boots", "trouser", "trousers"])
    torch.testing.assert_close(by_prompt, model.from_noise(z, labels))


@pytest.mark.parametrize("kwargs, field", [
    ({"labels": torch.tensor([0, 10])}, "labels"),
    ({"labels": torch.tensor([0.5, 1.0])}, "labels"),
    ({"prompts": ["a coat", "a cat"]}, "prompt"),
    ({"prompts": ["a coat and a bag", "a coat"]}, "prompt"),
    ({"prompts": ["a coat"]}, "prompts"),
    ({"labels": torch.tensor([0, 1]), "prompts": ["a coat", "a bag"]}, "labels, prompts"),
    ({"steps": 0}, "steps"), ({"steps": 21}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
    ({"guidance": -1.0}, "guidance"), ({"guidance": float("nan")}, "guidance"), ({"guidance": "2"}, "guidance"),
])
def test_bad_requests_name_the_field(kwargs, field):
    model = ldm().eval()
    with pytest.raises(ValueError, match=f"^{field}"):
        model.sample(2, torch.Generator().manual_seed(0), **kwargs)


def test_the_autoencoder_is_frozen_saved_and_not_optimised():
    images, labels = fashion_subset(4)
    ae = autoencoder()
    model = ldm(ae)
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    state = model.state_dict()
    assert all(torch.equal(state[f"autoencoder.{k}"], v) for k, v in before.items())
    optimised = {id(p) for opt in model.optimizers().values() for g in opt.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in ae.parameters()}
    assert "autoencoder" not in model.ema_modules
    model.train()
    assert model.unet.training and not model.autoencoder.training
    cfg = model_config("ldm", batch_size=8, ema_decay=0.5)
    Trainer(model, cfg, progress=False).fit(images, labels)
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in ae.parameters())


def test_weights_with_the_latent_scale_load_into_a_fresh_model():
    images, labels = fashion_subset(4)
    model = ldm()
    Trainer(model, model_config("ldm", batch_size=8, ema_decay=0.5), progress=False).fit(images, labels)
    scale = float(model.latent_scale)
    assert scale > 0
    fresh = ldm(autoencoder(seed=1), seed=1)  # other initial weights: everything must come from the state dict
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.latent_scale) == scale
    torch.testing.assert_close(fresh.eval().sample(3, torch.Generator().manual_seed(1)),
                               model.eval().sample(3, torch.Generator().manual_seed(1)))


def test_build_needs_an_autoencoder_with_a_latent_grid():
    with pytest.raises(ValueError, match="^autoencoder: the ldm family is trained on another trained model"):
        build_model(model_config("ldm"), 1, len(CLASSES), CLASSES)
    flat = build_model(model_config("ae"), 1, len(CLASSES), CLASSES)
    with pytest.raises(ValueError, match="^autoencoder: .*no latent grid"):
        ldm(flat)
    with pytest.raises(ValueError, match="^image_size"):
        ldm(autoencoder(64), size=28)
    with pytest.raises(ValueError, match="parts"):
        build_model(model_config("kl_ae"), 1, len(CLASSES), CLASSES, parts={"autoencoder": flat})


def test_config_refuses_more_sampling_steps_than_diffusion_steps_and_unknown_keys():
    cls = FAMILIES.get("ldm").config
    with pytest.raises(ValueError, match="sample_steps"):
        cls.model_validate(model_fields("ldm", sample_steps=21))
    with pytest.raises(ValueError, match="schedule"):
        cls.model_validate({**model_fields("ldm"), "schedule": "cosine"})
    with pytest.raises(ValueError, match="kl_weight"):
        FAMILIES.get("kl_ae").config.model_validate(model_fields("kl_ae", kl_weight=-1))

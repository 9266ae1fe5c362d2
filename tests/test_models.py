"""Model families: shapes, value range, seeded sampling, training phases and the family registry."""
from __future__ import annotations

import pytest
import torch

from model_configs import model_config
from components.models import FAMILIES, build_model
from components.models.base import Family
from components.registry import Registry


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "vae": {"latent_dim": 4, "width": 4, "beta": 1.0},
    "dcgan": {"latent_dim": 8, "ngf": 4, "ndf": 4, "beta1": 0.5},
}
PHASES = {"vae": ["vae"], "dcgan": ["discriminator", "generator"]}


def small_cfg(family: str, image_size: int = 28, **overrides):
    return model_config(family, image_size=image_size, **{**SMALL[family], **overrides})


def make(family: str, image_size: int, channels: int):
    torch.manual_seed(0)
    return build_model(small_cfg(family, image_size), channels, num_classes=10)


def batch(n: int, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


GRID = pytest.mark.parametrize("family", ["vae", "dcgan"]), pytest.mark.parametrize("size", [28, 64]), \
    pytest.mark.parametrize("channels", [1, 3])


def grid(fn):
    for mark in GRID:
        fn = mark(fn)
    return fn


@grid
def test_sample_shape_and_range(family, size, channels):
    model = make(family, size, channels).eval()
    out = model.sample(5)
    assert out.shape == (5, channels, size, size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    assert out.std() > 0  # not a constant image


@grid
def test_sampling_is_reproducible_by_generator_seed(family, size, channels):
    model = make(family, size, channels).eval()
    a = model.sample(4, generator=torch.Generator().manual_seed(7))
    torch.randn(100)  # global RNG use in between must not matter
    b = model.sample(4, generator=torch.Generator().manual_seed(7))
    c = model.sample(4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@grid
def test_training_losses_phases_and_finite_scalar_losses(family, size, channels):
    model = make(family, size, channels).train()
    x, y = batch(4, channels, size)
    phases = []
    for phase, out in model.training_losses(x, y):
        phases.append(phase)
        assert out.loss.dim() == 0
        assert torch.isfinite(out.loss)
        assert out.loss.requires_grad
        for name, value in out.logs.items():
            assert torch.isfinite(value).all(), name
    assert phases == PHASES[family]
    assert sorted(model.optimizers()) == sorted(PHASES[family])  # one optimizer per phase


@pytest.mark.parametrize("family", ["vae", "dcgan"])
def test_initial_weights_depend_on_cfg_seed_alone(family):
    torch.manual_seed(1)
    a = build_model(small_cfg(family), 1, 10).state_dict()
    after_a = torch.rand(3)
    torch.manual_seed(2)
    b = build_model(small_cfg(family), 1, 10).state_dict()
    c = build_model(small_cfg(family, seed=5), 1, 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)  # building did not advance the caller's RNG


@pytest.mark.parametrize("family", ["vae", "dcgan"])
def test_training_noise_is_drawn_from_the_given_generator(family):
    model = make(family, 28, 1).train()
    x, y = batch(4, 1, 28)

    def losses(noise_seed: int, global_seed: int) -> list[float]:
        torch.manual_seed(global_seed)
        with torch.no_grad():
            return [out.loss.item() for _, out in
                    model.training_losses(x, y, torch.Generator().manual_seed(noise_seed))]

    assert losses(3, global_seed=0) == losses(3, global_seed=1)
    assert losses(3, global_seed=0) != losses(4, global_seed=0)


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_vae_reconstruct_shape_and_range(size, channels):
    model = make("vae", size, channels).eval()
    x, _ = batch(3, channels, size)
    r = model.reconstruct(x)
    assert r.shape == x.shape
    assert r.min() >= -1 and r.max() <= 1


def test_vae_loss_is_recon_plus_beta_kl():
    torch.manual_seed(0)
    model = build_model(small_cfg("vae", beta=3.0), 1, 10).train()
    x, y = batch(4, 1, 28)
    _, out = next(model.training_losses(x, y))
    assert out.logs["kl"] >= 0
    assert out.loss.item() == pytest.approx((out.logs["recon"] + 3.0 * out.logs["kl"]).item(), rel=1e-5)


def test_dcgan_discriminator_phase_does_not_train_generator():
    model = make("dcgan", 28, 1).train()
    x, y = batch(4, 1, 28)
    steps = model.training_losses(x, y)
    phase, out = next(steps)
    assert phase == "discriminator"
    out.loss.backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())
    model.zero_grad(set_to_none=True)
    phase, out = next(steps)
    assert phase == "generator"
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())


def test_models_are_unconditional_and_describe_themselves():
    for family in ("vae", "dcgan"):
        model = make(family, 64, 3)
        assert model.conditional is False
        assert (model.image_size, model.channels) == (64, 3)
        assert model.latent_dim == SMALL[family]["latent_dim"]


def test_unknown_family_lists_valid_names():
    valid = ", ".join(FAMILIES.names())
    assert {"ae", "vae", "cvae", "dcgan", "cgan", "wgan_gp"} <= set(FAMILIES.names())
    with pytest.raises(ValueError, match=rf"unknown model family 'diffusion'; valid: {valid}$"):
        FAMILIES.get("diffusion")


def test_build_model_unknown_family_raises():
    cfg = small_cfg("vae").model_copy(update={"family": "nope"})
    with pytest.raises(ValueError, match="valid: ae, .*dcgan, .*vae"):
        build_model(cfg, 1, 10)


def test_registry_refuses_duplicate_names():
    reg: Registry[Family] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        reg.register("a")(2)
    assert "a" in reg and "b" not in reg
    assert reg.names() == ["a"]

"""Progressive GAN: the growth schedule counted in images (7 → 14 → 28 with fade-in), full-size
output at every phase, the paper's layers (equalised learning rate, pixel norm, minibatch standard
deviation), a discriminator that learns, the phase carried by checkpoints and saved weights, and
the schedule's validation."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from pydantic import ValidationError

from model_configs import model_config
from components.config import describe_error
from components.images import to_model_input
from components.models import build_model
from components.models.progan import EqualizedConv2d, EqualizedLinear, MinibatchStdDev, PixelNorm
from components.tracking.model_files import load_trained_model, save_trained_model
from components.training.distributed import process_group
from components.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY's schedule: 16 images at 7×7, then per new resolution 16 fading in and 16 stable.
STABLE = FADE = 16


def make(size: int = 28, channels: int = 1, **overrides):
    return build_model(model_config("progan", image_size=size, **overrides), channels, 4)


def data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def bars(n: int = 64) -> torch.Tensor:
    """uint8 N×1×28×28 white bars on black, at a few places: images unlike the generator's noise."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for i in range(n):
        o = 4 * (i % 5)
        images[i, 0, 4:24, o:o + 6] = 255
    return images


def test_the_schedule_grows_by_images_seen_with_alpha_rising_over_each_fade():
    model = make()
    assert model.resolutions == [7, 14, 28]
    assert model.phase(0) == model.phase(STABLE - 1) == (0, 1.0)
    fade_in = [model.phase(STABLE + i) for i in range(0, FADE, 4)]
    assert [level for level, _ in fade_in] == [1] * 4
    assert [alpha for _, alpha in fade_in] == [0.0, 0.25, 0.5, 0.75]
    assert model.phase(STABLE + FADE) == model.phase(2 * STABLE + FADE - 1) == (1, 1.0)
    assert model.phase(2 * STABLE + FADE) == (2, 0.0)
    assert model.full_resolution_images() == 2 * (STABLE + FADE)
    assert model.phase(2 * (STABLE + FADE)) == model.phase(10 ** 9) == (2, 1.0)
    big = make(size=64)
    assert big.resolutions == [4, 8, 16, 32, 64]
    assert big.phase(4 * (STABLE + FADE) - 1)[0] == 4 and big.phase(4 * (STABLE + FADE)) == (4, 1.0)


def test_training_logs_resolution_and_alpha_step_by_step_and_reaches_full_resolution():
    images, labels = data(48)
    cfg = model_config("progan", epochs=2, batch_size=8)  # 6 steps per epoch, 8 images each
    model = build_model(cfg, 1, 4)
    logged = []
    trainer = Trainer(model, cfg, log_every=1, progress=False,
                      log_fn=lambda values, step: logged.append((values["resolution"], values["alpha"])))
    last = trainer.fit(images, labels)
    assert logged == [(7, 1), (7, 1), (14, 0), (14, 0.5), (14, 1), (14, 1), (28, 0), (28, 0.5)] + [(28, 1)] * 4
    assert int(model.images_seen) == 96 and model.reached_full_resolution
    assert last["full_resolution"] == 1.0


def test_a_run_ending_before_full_resolution_says_so_and_still_samples_full_size_images():
    images, labels = data(24)
    cfg = model_config("progan", batch_size=8)  # 3 steps: 7×7, then the fade-in to 14×14
    model = build_model(cfg, 1, 4)
    last = Trainer(model, cfg, progress=False).fit(images, labels)
    assert not model.reached_full_resolution and last["full_resolution"] == 0.0
    assert model.phase() == (1, 0.5)
    samples = model.sample(3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 28, 28) and samples.min() >= -1 and samples.max() <= 1
    # 14×14 images upsampled: every 2×2 block holds one value
    assert torch.equal(samples, F.interpolate(samples[..., ::2, ::2], scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("size,channels", [(28, 1), (64, 3)])
def test_every_phase_trains_on_its_resolution_and_samples_full_size_images(size, channels):
    model = make(size, channels)
    x = torch.rand(8, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(2))
    for seen in [0, STABLE + FADE // 2, model.full_resolution_images()]:
        model._seen = seen
        level, alpha = model.phase()
        r, fade = model.resolutions[level], model.fade_weight(alpha)
        assert model.real_at(x, level, fade).shape == (8, channels, r, r)
        assert model.generator(z, level, fade).shape == (3, channels, r, r)
        assert model.discriminator(model.real_at(x, level, fade), level, fade).shape == (8, 1)
        model.train()
        phases = []
        for phase, out in model.training_losses(x, None, torch.Generator().manual_seed(3)):
            assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
            out.loss.backward()
            phases.append(phase)
        assert phases == ["discriminator", "generator"] and set(phases) == set(model.optimizers())
        model.eval()
        images = model.from_noise(z)
        assert images.shape == (3, channels, size, size) and images.min() >= -1 and images.max() <= 1
        by_resolution = model.samples_by_resolution(z)
        assert [res for res, _ in by_resolution] == model.resolutions[:level + 1]
        assert all(imgs.shape == (3, channels, res, res) for res, imgs in by_resolution)
        assert torch.equal(F.interpolate(by_resolution[-1][1], size=size, mode="nearest"), images)


def test_equalised_layers_draw_unit_normal_weights_and_scale_them_by_hes_constant():
    torch.manual_seed(0)
    conv, linear = EqualizedConv2d(64, 32, 3), EqualizedLinear(512, 256, gain=1.0)
    for layer in (conv, linear):
        assert layer.weight.mean().abs() < 0.02 and layer.weight.std().item() == pytest.approx(1.0, abs=0.02)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert conv.scale == pytest.approx(math.sqrt(2 / (64 * 9))) and linear.scale == pytest.approx(1 / math.sqrt(512))
    x = torch.randn(2, 64, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * conv.scale, conv.bias, padding=1))
    # He's constant keeps the activations' scale: unit-variance inputs give outputs of variance ≈ gain²
    assert linear(torch.randn(4096, 512)).var().item() == pytest.approx(1.0, rel=0.1)


def test_pixel_norm_gives_each_pixels_features_unit_mean_square():
    y = PixelNorm()(torch.randn(3, 16, 4, 4) * 7)
    assert torch.allclose(y.pow(2).mean(dim=1), torch.ones(3, 4, 4), atol=1e-5)


def test_minibatch_stddev_adds_one_channel_of_the_groups_spread():
    x = torch.randn(8, 5, 3, 3)
    y = MinibatchStdDev(group_size=4)(x)
    assert y.shape == (8, 6, 3, 3) and torch.equal(y[:, :5], x)
    groups = x.reshape(4, 2, 5, 3, 3)  # image i is in group i % 2
    expected = groups.var(dim=0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
    assert torch.allclose(y[:, 5, 0, 0], expected.repeat(4)) and (y[:, 5] == y[:, 5, :1, :1]).all()
    same = MinibatchStdDev()(x[:1].expand(4, -1, -1, -1))
    assert same[:, 5].abs().max() < 1e-3  # identical images: no spread


def test_the_generator_is_averaged_both_players_all_reduced_and_adam_has_the_papers_betas():
    model = make()
    assert model.ema_modules == ("generator",)
    assert set(model.allreduce_modules) == {"generator", "discriminator"}
    assert model.optimizers()["generator"].defaults["betas"] == (0.0, 0.99)


def test_the_discriminator_learns_against_a_frozen_generator():
    images, labels = bars(64), torch.zeros(64, dtype=torch.long)
    cfg = model_config("progan", epochs=3, batch_size=16, lr=3e-3, ngf=8, ndf=8, fade_images=10 ** 6,
                       stable_images=10 ** 6)  # 7×7 throughout
    model = build_model(cfg, 1, 4)
    x = to_model_input(images, 28, "cpu")

    def critic_loss() -> float:
        seen = model._seen
        loss = next(model.train().training_losses(x, labels, torch.Generator().manual_seed(9)))[1].loss.item()
        model._seen = seen
        return loss

    before = critic_loss()
    frozen = {k: v.clone() for k, v in model.generator.state_dict().items()}
    trainer = Trainer(model, cfg, progress=False)
    for group in trainer.optimizers["generator"].param_groups:
        group["lr"] = 0.0
    trainer.fit(images, labels)
    assert all(torch.equal(frozen[k], v) for k, v in model.generator.state_dict().items())
    # The critic's loss starts near 0 and falls below it as its Wasserstein estimate grows (measured: 0.35 → -1.3).
    after = critic_loss()
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("options", [{}, {"ema_decay": 0.9, "precision": "bf16", "channels_last": True}])
def test_an_interrupted_run_resumes_at_its_phase_to_identical_weights(tmp_path, options):
    images, labels = data(48)
    cfg = model_config("progan", epochs=2, batch_size=8, **options)  # 12 steps, full resolution from step 9
    straight = build_model(cfg, 1, 4)
    Trainer(straight, cfg, progress=False).fit(images, labels)

    class Interrupt(Exception):
        pass

    def crash(values, step):
        if step == 6:
            raise Interrupt

    path = tmp_path / "train.pt"
    with pytest.raises(Interrupt):
        Trainer(build_model(cfg, 1, 4), cfg, checkpoint_path=path, log_every=1, checkpoint_every=5, log_fn=crash,
                progress=False).fit(images, labels)
    assert torch.load(path, weights_only=True)["model"]["images_seen"] == 40  # mid-way: 14×14, stable
    resumed = build_model(cfg, 1, 4)
    logged = []
    Trainer(resumed, cfg, checkpoint_path=path, log_every=1, progress=False,
            log_fn=lambda values, step: logged.append((step, values["resolution"], values["alpha"]))
            ).fit(images, labels)
    assert logged[:3] == [(6, 14, 1), (7, 28, 0), (8, 28, 0.5)]
    expected, got = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_saved_weights_carry_the_phase(tmp_path):
    images, labels = data(24)
    cfg = model_config("progan", batch_size=8)
    model = build_model(cfg, 1, 4)
    Trainer(model, cfg, progress=False).fit(images, labels)
    spec = {"family": "progan", "config": cfg.model_dump(mode="json"), "channels": 1, "num_classes": 4}
    save_trained_model(model, spec, tmp_path)
    again = load_trained_model(tmp_path)
    assert again.phase() == model.phase() == (1, 0.5)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(again.sample(4, g), model.sample(4, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("field,value,message", [
    ("fade_images", 0, "train.progan.fade_images: must be > 0, got 0"),
    ("stable_images", -5, "train.progan.stable_images: must be > 0, got -5"),
    ("fade_images", 4, "train.progan.fade_images: must be at least batch_size (8): a phase shorter than one batch"),
])
def test_a_schedule_that_cannot_work_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValidationError) as info:
        model_config("progan", **{field: value})
    problems = [describe_error(e, ("train", "progan")) for e in info.value.errors()]
    assert len(problems) == 1 and problems[0].startswith(message), problems


# --- two processes, as under torchrun ------------------------------------------------------------------

def _rank_main(rank: int, port: int, out) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = model_config("progan", epochs=2, batch_size=8)
    model = build_model(cfg, 1, 4)
    with process_group(torch.device("cpu")) as workers:
        Trainer(model, cfg, progress=False, workers=workers).fit(*data(48))
    torch.save(model.state_dict(), out / f"rank{rank}.pt")


def test_two_processes_count_the_global_batch_and_keep_the_same_weights(tmp_path):
    """The blocks not grown yet take no part in a step: DDP would refuse them, the all-reduce path does not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, tmp_path), nprocs=2, start_method="spawn")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert int(rank0["images_seen"]) == int(rank1["images_seen"]) == 96  # 12 global batches of 8
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_the_evaluation_draws_the_same_samples_at_every_resolution_grown(tmp_path):
    from PIL import Image

    from components.evaluation.pictures import GROWTH_SAMPLES, write_pictures

    model = build_model(model_config("progan"), 1, 10).eval()
    model.images_seen.fill_(10**6)  # past the schedule: grown to 28×28
    model.load_state_dict(model.state_dict())  # loading refreshes the phase, as a reloaded model's
    written = write_pictures(model, torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                             ["a"], tmp_path, seed=0)
    assert [p.name for p in written] == ["resolutions.png"]
    width, height = Image.open(written[0]).size
    assert (width, height) == (2 + GROWTH_SAMPLES * 30, 2 + 3 * 30)  # 7, 14 and 28 px rows

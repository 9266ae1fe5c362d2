"""The generic trainer: it learns, logs, checkpoints safely and resumes exactly."""
from __future__ import annotations

import copy

import pytest
import torch

from components.models import FAMILIES, build_model
from components.training.trainer import Trainer, to_model_input


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "vae": {"latent_dim": 4, "width": 8, "beta": 1.0},
    "dcgan": {"latent_dim": 8, "ngf": 8, "ndf": 8, "beta1": 0.5},
}


def small_cfg(family: str, **overrides):
    fields = {
        "family": family, "image_size": 28, "epochs": 4, "batch_size": 16, "lr": 3e-3, "seed": 0,
        "log_every": 2, "checkpoint_every": 1000, **SMALL[family], **overrides,
    }
    return FAMILIES.get(family).config.model_validate(fields)


def make(cfg):
    torch.manual_seed(123)
    return build_model(cfg, 1, num_classes=4)


def structured_images(n: int = 64, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×1×S×S: four shapes (horizontal bar, vertical bar, square, diagonal), shifted a little."""
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    r = torch.arange(size)
    for i in range(n):
        k, o = int(labels[i]), (i // 4) % 5 - 2
        img = images[i, 0]
        if k == 0:
            img[10 + o:16 + o, 4:24] = 255
        elif k == 1:
            img[4:24, 10 + o:16 + o] = 255
        elif k == 2:
            img[8 + o:20 + o, 8 + o:20 + o] = 200
        else:
            img[(r[:, None] - r[None, :] + o).abs() <= 2] = 230
    return images, labels


def fixed_loss(model, x, y, phase_index: int = 0) -> float:
    """The model's training loss on x with fixed noise, without changing its weights."""
    was_training = model.training
    state = copy.deepcopy(model.state_dict())  # batch-norm running stats would move in train mode
    model.train()
    torch.manual_seed(99)
    with torch.no_grad():
        phases = model.training_losses(x, y)
        for _ in range(phase_index):
            next(phases)
        loss = next(phases)[1].loss.item()
    model.load_state_dict(state)
    model.train(was_training)
    return loss


def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_to_model_input_scales_and_resizes():
    u8 = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 16, 16).contiguous()
    x = to_model_input(u8, 28, torch.device("cpu"))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0))
    assert torch.allclose(x[1], torch.full_like(x[1], 1.0))
    same = to_model_input(u8, 16, "cpu")
    assert same.shape == (2, 1, 16, 16)


def test_vae_training_lowers_loss_on_fixed_batch():
    images, labels = structured_images()
    cfg = small_cfg("vae")
    model = make(cfg)
    x = to_model_input(images, 28, torch.device("cpu"))
    before = fixed_loss(model, x, labels)
    Trainer(model, cfg, progress=False).fit(images, labels)
    after = fixed_loss(model, x, labels)
    assert after < 0.7 * before, (before, after)
    assert not model.training  # fit leaves the model in eval mode


def test_dcgan_discriminator_learns_against_a_frozen_generator():
    images, labels = structured_images()
    cfg = small_cfg("dcgan", lr=2e-3)
    model = make(cfg)
    x = to_model_input(images, 28, torch.device("cpu"))
    d_before, g_before = params_of(model.discriminator), params_of(model.generator)
    loss_d_before = fixed_loss(model, x, labels)
    trainer = Trainer(model, cfg, progress=False)
    for group in trainer.optimizers["generator"].param_groups:
        group["lr"] = 0.0  # the generator stands still: D alone has something to learn
    trainer.fit(images, labels)
    assert changed(d_before, model.discriminator)
    assert not any(not torch.equal(g_before[k], v) for k, v in model.generator.state_dict().items()
                   if v.is_floating_point() and "running" not in k)
    loss_d_after = fixed_loss(model, x, labels)
    assert loss_d_after < 0.5 * loss_d_before, (loss_d_before, loss_d_after)


def test_dcgan_training_updates_both_players_and_stays_finite():
    images, labels = structured_images()
    cfg = small_cfg("dcgan", epochs=2)
    model = make(cfg)
    d_before, g_before = params_of(model.discriminator), params_of(model.generator)
    logs = []
    last = Trainer(model, cfg, progress=False, log_fn=lambda values, step: logs.append(values)).fit(images, labels)
    assert changed(d_before, model.discriminator)
    assert changed(g_before, model.generator)
    assert logs and all(torch.isfinite(torch.tensor(v)) for entry in logs for v in entry.values())
    assert {"loss_d", "loss_g", "d_real", "d_fake"} <= set(last)
    x = to_model_input(images, 28, torch.device("cpu"))
    assert torch.isfinite(torch.tensor([fixed_loss(model, x, labels, 0), fixed_loss(model, x, labels, 1)])).all()


def test_log_callback_gets_averaged_values_and_throughput():
    images, labels = structured_images()
    cfg = small_cfg("vae", epochs=2, log_every=3)  # 4 steps/epoch, 8 in all: logs at 3, 6 and the last (8)
    calls = []
    last = Trainer(make(cfg), cfg, progress=False, log_fn=lambda values, step: calls.append((step, values))).fit(
        images, labels)
    assert [step for step, _ in calls] == [3, 6, 8]
    for _, values in calls:
        assert {"loss", "recon", "kl", "images_per_sec", "epoch"} <= set(values)
        assert values["images_per_sec"] > 0
        assert all(isinstance(v, float) for v in values.values())
    assert calls[-1][1]["epoch"] == pytest.approx(2.0)
    assert calls[0][1]["epoch"] == pytest.approx(0.75)
    assert last == calls[-1][1]


def test_batch_larger_than_data_raises():
    images, labels = structured_images(8)
    cfg = small_cfg("vae", batch_size=16)
    with pytest.raises(ValueError, match=r"batch_size=16 is larger than the 8 training images"):
        Trainer(make(cfg), cfg, progress=False).fit(images, labels)


def test_checkpoint_is_safely_loadable_and_complete(tmp_path):
    images, labels = structured_images(32)
    cfg = small_cfg("dcgan", epochs=1)
    path = tmp_path / "ckpt" / "train.pt"
    model = make(cfg)
    trainer = Trainer(model, cfg, checkpoint_path=path, resume_key="data-v1", progress=False)
    trainer.fit(images, labels)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "optimizers", "step", "rng", "config"} <= set(state)
    assert state["step"] == trainer.step == 2
    assert set(state["optimizers"]) == {"discriminator", "generator"}
    assert state["config"] == cfg.model_dump(mode="json")
    assert state["rng"].dtype == torch.uint8
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    assert [p.name for p in path.parent.iterdir()] == ["train.pt"]  # no temp files left behind


def test_finished_checkpoint_or_other_key_starts_fresh(tmp_path, capsys):
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=2)  # 2 steps/epoch
    path = tmp_path / "train.pt"
    first = Trainer(make(cfg), cfg, checkpoint_path=path, resume_key="k1", progress=False)
    first.fit(images, labels)
    assert first.step == 4

    calls = []
    again = Trainer(make(cfg), cfg, checkpoint_path=path, resume_key="k1", progress=False,
                    log_fn=lambda values, step: calls.append(step))
    again.fit(images, labels)  # asked to train again (e.g. dvc repro -f): a finished run is not reused
    assert "finished run; starting fresh" in capsys.readouterr().out
    assert calls == [2, 4] and again.step == 4

    calls.clear()
    other = Trainer(make(cfg), cfg, checkpoint_path=path, resume_key="k2", progress=False,
                    log_fn=lambda values, step: calls.append(step))
    other.fit(images, labels)
    assert "starting fresh" in capsys.readouterr().out
    assert calls == [2, 4] and other.step == 4
    assert torch.load(path, weights_only=True)["resume_key"] == "k2"


def test_changed_config_starts_fresh(tmp_path, capsys):
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=1)
    path = tmp_path / "train.pt"
    Trainer(make(cfg), cfg, checkpoint_path=path, progress=False).fit(images, labels)
    other_cfg = small_cfg("vae", epochs=1, lr=1e-3)
    trainer = Trainer(make(other_cfg), other_cfg, checkpoint_path=path, progress=False)
    trainer.fit(images, labels)
    assert "starting fresh" in capsys.readouterr().out
    assert trainer.step == 2


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    images, labels = structured_images(48)
    cfg = small_cfg("vae", epochs=3, log_every=1, checkpoint_every=2)  # 3 steps/epoch, 9 in all

    straight = make(cfg)
    Trainer(straight, cfg, progress=False).fit(images, labels)

    path = tmp_path / "train.pt"

    def crash_at_5(values, step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(make(cfg), cfg, checkpoint_path=path, log_fn=crash_at_5, progress=False).fit(images, labels)
    assert torch.load(path, weights_only=True)["step"] == 4  # the last periodic checkpoint

    resumed_model = make(cfg)
    steps = []
    resumed = Trainer(resumed_model, cfg, checkpoint_path=path, progress=False,
                      log_fn=lambda values, step: steps.append(step))
    resumed.fit(images, labels)
    assert steps == [5, 6, 7, 8, 9]
    for k, v in straight.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[k].float(), v.float(), atol=1e-6), k

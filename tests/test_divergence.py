"""Divergence: a NaN/Inf loss or gradient sends training back to the last good state with a lower
learning rate, at most divergence.max_rollbacks times, then fails naming where; rollbacks are logged."""
from __future__ import annotations

import pytest
import torch
from test_trainer import InfGradient, Interrupt, assert_same_weights, change_loss, make, small_cfg, structured_images

from components.config import ConfigError, DivergenceConfig, apply_overrides, read_params_raw
from components.params import parse_params
from components.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROLLBACKS = DivergenceConfig(max_rollbacks=3, lr_factor=0.5)


def nan_loss_from(model, phase: str, first_call: int, last_call: int | None = None) -> None:
    """The model's `phase` loss becomes NaN from its first_call-th computation to its last_call-th."""
    calls = []

    def nan(loss):
        return loss * float("nan")

    real = model.training_losses

    def training_losses(x, y, generator=None):
        for name, out in real(x, y, generator):
            if name == phase:
                calls.append(name)
                if len(calls) >= first_call and (last_call is None or len(calls) <= last_call):
                    out = type(out)(nan(out.loss), out.logs)
            yield name, out

    model.training_losses = training_losses


def finite(model) -> bool:
    return all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("on_disk", [True, False], ids=["checkpoint", "in-memory"])
def test_a_nan_loss_once_rolls_back_lowers_the_lr_and_training_finishes(tmp_path, on_disk):
    images, labels = structured_images(48)
    cfg = small_cfg("dcgan", epochs=2)  # 3 steps/epoch, 6 in all
    model = make(cfg)
    nan_loss_from(model, "generator", first_call=4, last_call=4)
    logged = []
    trainer = Trainer(model, cfg, name="tiny", log_every=1, checkpoint_every=2,
                      checkpoint_path=tmp_path / "last.pt" if on_disk else None, divergence=ROLLBACKS,
                      log_fn=lambda values, step: logged.append((step, values)), progress=False)
    trainer.fit(images, labels)

    assert finite(model) and trainer.step == 6
    assert [step for step, _ in logged] == [1, 2, 3, 4, 3, 4, 5, 6]  # step 4 failed: back to the state of step 2
    assert logged[3][1] == {"rollbacks": 1.0, "lr_scale": 0.5}
    assert all("loss_d" in values for _, values in logged[:3] + logged[4:])
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    for opt in trainer.optimizers.values():
        assert [g["lr"] for g in opt.param_groups] == [cfg.lr * 0.5]
    if on_disk:
        state = torch.load(tmp_path / "last.pt", weights_only=True)
        assert (state["step"], state["rollbacks"], state["lr_scale"]) == (6, 1, 0.5)


def test_a_rollback_before_any_checkpoint_returns_to_the_start():
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=2)  # 2 steps/epoch; checked only at the end
    model = make(cfg)
    nan_loss_from(model, "vae", first_call=1, last_call=1)
    logged = []
    trainer = Trainer(model, cfg, divergence=ROLLBACKS, progress=False,
                      log_fn=lambda values, step: logged.append((step, values)))
    trainer.fit(images, labels)
    assert [step for step, _ in logged] == [1, 4]  # reported at the step it happened, then the final log
    assert finite(model) and trainer.rollbacks == 1


def test_nan_every_time_fails_after_the_allowed_rollbacks_naming_step_phase_and_value(tmp_path):
    images, labels = structured_images(48)
    cfg = small_cfg("dcgan", epochs=2)
    model = make(cfg)
    nan_loss_from(model, "generator", first_call=4)
    logged, path = [], tmp_path / "last.pt"
    trainer = Trainer(model, cfg, name="tiny", log_every=1, checkpoint_every=2, checkpoint_path=path,
                      divergence=ROLLBACKS, log_fn=lambda values, step: logged.append((step, values)),
                      progress=False)
    with pytest.raises(FloatingPointError) as failure:
        trainer.fit(images, labels)
    message = str(failure.value)
    assert message.startswith("train.tiny (dcgan): the 'generator' loss is nan at step 3 of 6; ")
    assert "stopped after 3 rollback(s) (divergence.max_rollbacks=3, learning rate × 0.125)" in message
    assert f"the last good checkpoint {path} is kept" in message
    assert "Lower train.tiny.lr" in message
    assert [values for _, values in logged if "rollbacks" in values] == [
        {"rollbacks": 1.0, "lr_scale": 0.5}, {"rollbacks": 2.0, "lr_scale": 0.25},
        {"rollbacks": 3.0, "lr_scale": 0.125}]
    # the 4th call was step 4; after the first rollback to step 2 the 5th call is step 3, and so on
    assert [step for step, values in logged if "rollbacks" in values] == [4, 3, 3]
    assert finite(model) and trainer.step == 2  # the model holds the last good state
    assert torch.load(path, weights_only=True)["step"] == 2


def test_an_infinite_gradient_with_a_finite_loss_is_caught_and_rolled_back():
    images, labels = structured_images(48)
    cfg = small_cfg("dcgan", epochs=2)
    model = make(cfg)
    losses = []

    def inf_gradient_once(loss):
        losses.append(float(loss.detach()))
        return InfGradient.apply(loss)

    change_loss(model, "discriminator", 2, inf_gradient_once)
    logged = []
    trainer = Trainer(model, cfg, log_every=3, divergence=ROLLBACKS, progress=False,
                      log_fn=lambda values, step: logged.append((step, values)))
    trainer.fit(images, labels)
    assert all(torch.isfinite(torch.tensor(losses)))  # the loss itself was finite
    assert logged[0] == (2, {"rollbacks": 1.0, "lr_scale": 0.5})  # found at the step-3 check, reported at step 2
    assert [step for step, _ in logged[1:]] == [3, 6]
    assert finite(model)


def test_no_divergence_config_fails_at_the_first_non_finite_value():
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=1)
    model = make(cfg)
    nan_loss_from(model, "vae", first_call=2, last_call=2)
    with pytest.raises(FloatingPointError, match=r"train\.vae \(vae\): the 'vae' loss is nan at step 2 of 2; "
                                                 r"stopped after 0 rollback\(s\) \(divergence\.max_rollbacks=0"):
        Trainer(model, cfg, progress=False).fit(images, labels)


def test_a_non_finite_buffer_behind_finite_losses_and_gradients_is_found_before_the_checkpoint(tmp_path):
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=1)  # 2 steps
    path = tmp_path / "last.pt"
    model = make(cfg)
    real = model.training_losses
    batch_norm = next(m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def overflowing_statistics(x, y, generator=None):
        yield from real(x, y, generator)
        batch_norm.running_var.fill_(float("inf"))  # as if the running variance overflowed: no loss, no gradient

    model.training_losses = overflowing_statistics
    with pytest.raises(FloatingPointError, match=r"train\.vae \(vae\): non-finite values in model\.decoder\.\d+\."
                                                 r"running_var at step 1 of 2; stopped after 0 rollback"):
        Trainer(model, cfg, checkpoint_every=1, checkpoint_path=path, progress=False).fit(images, labels)
    assert not path.exists() and finite(model)  # nothing saved; the model is back at its initial state


def test_a_run_killed_after_a_rollback_resumes_with_the_lowered_lr_bit_identical(tmp_path):
    images, labels = structured_images(48)
    cfg = small_cfg("dcgan", epochs=2)
    straight = make(cfg)
    nan_loss_from(straight, "generator", first_call=4, last_call=4)
    Trainer(straight, cfg, log_every=1, checkpoint_every=2, divergence=ROLLBACKS, progress=False).fit(images, labels)

    path, rolled = tmp_path / "last.pt", []

    def crash_after_the_rollback(values, step):
        if "rollbacks" in values:
            rolled.append(step)
        elif rolled and step == 5:  # after the checkpoint of step 4, taken with the lowered rate
            raise Interrupt

    killed = make(cfg)
    nan_loss_from(killed, "generator", first_call=4, last_call=4)
    with pytest.raises(Interrupt):
        Trainer(killed, cfg, log_every=1, checkpoint_every=2, checkpoint_path=path, divergence=ROLLBACKS,
                log_fn=crash_after_the_rollback, progress=False).fit(images, labels)
    state = torch.load(path, weights_only=True)
    assert (state["step"], state["rollbacks"], state["lr_scale"]) == (4, 1, 0.5)

    resumed = make(cfg)  # no NaN this time: what matters is the lowered rate carried by the checkpoint
    trainer = Trainer(resumed, cfg, checkpoint_path=path, divergence=ROLLBACKS, progress=False)
    trainer.fit(images, labels)
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    assert_same_weights(resumed, straight)


def test_divergence_params_are_validated_with_their_path():
    raw = read_params_raw("params.yaml")
    params = parse_params(raw)
    assert params.divergence == DivergenceConfig(max_rollbacks=3, lr_factor=0.5)
    apply_overrides(raw, ["divergence.lr_factor=1.5", "divergence.max_rollbacks=-1"])
    with pytest.raises(ConfigError) as bad:
        parse_params(raw)
    assert "divergence.lr_factor: must be < 1, got 1.5" in str(bad.value)
    assert "divergence.max_rollbacks: must be >= 0, got -1" in str(bad.value)
    del raw["divergence"]
    with pytest.raises(ConfigError, match="divergence: missing; add it to params.yaml"):
        parse_params(raw)

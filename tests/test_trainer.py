"""The generic trainer: it learns, logs, checkpoints safely and resumes exactly."""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

from model_configs import model_config
from components.models import FAMILIES, StepOutput, build_model
from components.training.checkpoint import save_checkpoint
from components.images import to_model_input
from components.training.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "vae": {"latent_dim": 4, "width": 8, "beta": 1.0},
    "dcgan": {"latent_dim": 8, "ngf": 8, "ndf": 8, "beta1": 0.5},
}


def small_cfg(family: str, **overrides):
    return model_config(family, **{"epochs": 4, "batch_size": 16, "lr": 3e-3, **SMALL[family], **overrides})


def make(cfg):
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
    with torch.no_grad():
        phases = model.training_losses(x, y, torch.Generator().manual_seed(99))
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
    cfg = small_cfg("vae", epochs=2)  # 4 steps/epoch, 8 in all: logs at 3, 6 and the last (8)
    calls = []
    last = Trainer(make(cfg), cfg, log_every=3, progress=False,
                   log_fn=lambda values, step: calls.append((step, values))).fit(images, labels)
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
    assert {"model", "ema", "optimizers", "step", "rollbacks", "lr_scale", "rng", "config", "last"} <= set(state)
    assert {"global", "cuda", "numpy", "python", "noise"} == set(state["rng"])  # cuda: None on the CPU
    assert (state["rollbacks"], state["lr_scale"], state["ema"]) == (0, 1.0, {})
    assert state["step"] == trainer.step == 2
    assert set(state["optimizers"]) == {"discriminator", "generator"}
    assert state["config"] == cfg.model_dump(mode="json")
    assert state["rng"]["global"].dtype == state["rng"]["noise"].dtype == torch.uint8
    assert state["last"] == trainer.last and "loss_d" in state["last"]
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    assert [p.name for p in path.parent.iterdir()] == ["train.pt"]  # no temp files left behind


def test_checkpoint_is_fsynced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    assert len(events) == 3
    (kind, tmp), rename, folder = events
    # `.last.pt.tmp-*`: the one pattern the leftover sweep removes (tests/test_workspace.py)
    assert kind == "fsync" and Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".last.pt.tmp-")
    assert rename == ("replace", str(path))
    assert folder == ("fsync", str(tmp_path))


def test_finished_checkpoint_of_the_same_key_is_the_result(tmp_path, capsys):
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=2)  # 2 steps/epoch
    path = tmp_path / "train.pt"
    first_model = make(cfg)
    first = Trainer(first_model, cfg, checkpoint_path=path, resume_key="k1", progress=False)
    first_last = first.fit(images, labels)
    capsys.readouterr()

    def no_training(*args):
        raise AssertionError("trained again")

    model = make(cfg)
    model.training_losses = no_training
    calls = []
    again = Trainer(model, cfg, checkpoint_path=path, resume_key="k1", progress=False,
                    log_fn=lambda values, step: calls.append((step, values)))
    # killed after the final checkpoint but before the outputs were written: load, do not retrain
    assert again.fit(images, labels) == first_last
    assert "not training again" in capsys.readouterr().out
    assert calls == [(4, first_last)] and again.step == 4 and not model.training
    for k, v in first_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_checkpoint_of_other_key_or_config_starts_fresh(tmp_path, capsys):
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=2)
    path = tmp_path / "train.pt"
    Trainer(make(cfg), cfg, checkpoint_path=path, resume_key="k1", progress=False).fit(images, labels)
    calls = []
    other = Trainer(make(cfg), cfg, checkpoint_path=path, resume_key="k2", log_every=2, progress=False,
                    log_fn=lambda values, step: calls.append(step))
    other.fit(images, labels)
    assert "other params, data or code; starting fresh" in capsys.readouterr().out
    assert calls == [2, 4] and other.step == 4
    assert torch.load(path, weights_only=True)["resume_key"] == "k2"

    other_cfg = small_cfg("vae", epochs=2, lr=1e-3)
    trainer = Trainer(make(other_cfg), other_cfg, checkpoint_path=path, resume_key="k2", progress=False)
    trainer.fit(images, labels)
    assert "starting fresh" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["config"]["lr"] == 1e-3


class Interrupt(Exception):
    pass


def crash_at(step_to_crash: int):
    def log_fn(values, step):
        if step == step_to_crash:
            raise Interrupt
    return log_fn


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["vae", "dcgan"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, family):
    images, labels = structured_images(48)
    cfg = small_cfg(family, epochs=3)  # 3 steps/epoch, 9 in all
    straight = make(cfg)
    Trainer(straight, cfg, progress=False).fit(images, labels)

    path = tmp_path / "train.pt"
    with pytest.raises(Interrupt):
        Trainer(make(cfg), cfg, checkpoint_path=path, log_every=1, checkpoint_every=2, log_fn=crash_at(5),
                progress=False).fit(images, labels)
    assert torch.load(path, weights_only=True)["step"] == 4  # the last periodic checkpoint

    resumed_model = make(cfg)
    steps = []
    # other intervals than the interrupted run's: they are not part of what a checkpoint must match
    Trainer(resumed_model, cfg, checkpoint_path=path, log_every=1, checkpoint_every=1000, progress=False,
            log_fn=lambda values, step: steps.append(step)).fit(images, labels)
    assert steps == [5, 6, 7, 8, 9]
    assert_same_weights(resumed_model, straight)


def interrupted_checkpoint(tmp_path, cfg, images, labels) -> Path:
    path = tmp_path / "last.pt"
    with pytest.raises(Interrupt):
        Trainer(make(cfg), cfg, checkpoint_path=path, resume_key="k", log_every=1, checkpoint_every=2,
                log_fn=crash_at(3), progress=False).fit(images, labels)
    return path


def test_truncated_checkpoint_is_moved_aside_and_training_starts_fresh(tmp_path):
    images, labels = structured_images(32)
    cfg = small_cfg("dcgan", epochs=2)
    path = interrupted_checkpoint(tmp_path, cfg, images, labels)
    truncated = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(truncated)

    model, steps = make(cfg), []
    with pytest.warns(UserWarning, match=r"last\.pt is unusable .*moved it to last\.pt\.corrupt-.*starting fresh"):
        Trainer(model, cfg, checkpoint_path=path, resume_key="k", log_every=1, progress=False,
                log_fn=lambda values, step: steps.append(step)).fit(images, labels)
    assert steps == [1, 2, 3, 4]
    [aside] = tmp_path.glob("last.pt.corrupt-*")
    assert aside.read_bytes() == truncated  # kept for a post-mortem
    assert torch.load(path, weights_only=True)["step"] == 4
    straight = make(cfg)
    Trainer(straight, cfg, progress=False).fit(images, labels)
    assert_same_weights(model, straight)


def _wrong_model_shape(state):
    key = list(state["model"])[-2]  # a late tensor: the earlier ones would already be copied in
    state["model"][key] = torch.zeros(3)


def _wrong_rng(state):
    state["rng"]["noise"] = torch.zeros(3, dtype=torch.uint8)  # fails after model and optimizers loaded


def _missing_optimizer(state):
    del state["optimizers"]["generator"]


def _nan_weights(state):
    # saved before checkpoints were checked for finite values: resuming it fails again on every rerun
    state["model"][next(k for k, v in state["model"].items() if v.is_floating_point())].view(-1)[0] = float("nan")


def _inf_optimizer_moment(state):
    state["optimizers"]["generator"]["state"][0]["exp_avg"].view(-1)[0] = float("inf")


@pytest.mark.parametrize("damage", [_wrong_model_shape, _wrong_rng, _missing_optimizer, _nan_weights,
                                    _inf_optimizer_moment])
def test_incompatible_checkpoint_is_moved_aside_without_half_loading_it(tmp_path, damage):
    images, labels = structured_images(32)
    cfg = small_cfg("dcgan", epochs=2)
    path = interrupted_checkpoint(tmp_path, cfg, images, labels)
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)

    model = make(cfg)
    with pytest.warns(UserWarning, match="unusable"):
        trainer = Trainer(model, cfg, checkpoint_path=path, resume_key="k", progress=False)
        trainer.fit(images, labels)
    assert len(list(tmp_path.glob("last.pt.corrupt-*"))) == 1
    straight = make(cfg)
    Trainer(straight, cfg, progress=False).fit(images, labels)
    assert_same_weights(model, straight)  # a fresh start, not a mix of the checkpoint and the init


def change_loss(model, phase: str, at_call: int, change) -> None:
    """Replace the model's `phase` loss by change(loss) the at_call-th time it is computed."""
    real, calls = model.training_losses, []

    def training_losses(x, y, generator=None):
        for name, out in real(x, y, generator):
            if name == phase:
                calls.append(name)
                if len(calls) == at_call:
                    out = StepOutput(change(out.loss), out.logs)
            yield name, out

    model.training_losses = training_losses


def poison(model, phase: str, at_call: int):
    """Make the model's `phase` loss NaN the at_call-th time it is computed."""
    change_loss(model, phase, at_call, lambda loss: loss * float("nan"))


def test_non_finite_loss_without_rollbacks_fails_at_the_check_and_restores_the_last_checkpoint(tmp_path):
    images, labels = structured_images(48)
    cfg = small_cfg("dcgan", epochs=2)  # 3 steps/epoch
    path = tmp_path / "last.pt"
    model = make(cfg)
    poison(model, "generator", at_call=4)
    seen = {}

    def remember_generator(values, step):
        seen[step] = {k: v.clone() for k, v in model.generator.named_parameters()}

    trainer = Trainer(model, cfg, name="tiny", checkpoint_path=path, log_every=1, checkpoint_every=2,
                      log_fn=remember_generator, progress=False)  # no divergence config: no rollback
    with pytest.raises(FloatingPointError,
                       match=r"train\.tiny \(dcgan\): the 'generator' loss is nan at step 4 of 6; stopped after 0 "
                             r"rollback\(s\) \(divergence\.max_rollbacks=0, learning rate × 1\); the last good "
                             r"checkpoint .*last\.pt is kept\. Lower train\.tiny\.lr"):
        trainer.fit(images, labels)
    assert torch.load(path, weights_only=True)["step"] == 2  # no checkpoint written by the failing run's end
    assert list(seen) == [1, 2, 3]  # step 4 was checked (log_every=1) before it was logged
    assert trainer.step == 2
    for k, v in model.generator.named_parameters():
        assert torch.equal(v, seen[2][k]), k  # the model holds the last good state, not the NaN update
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_non_finite_loss_of_the_first_step_leaves_the_initial_weights():
    images, labels = structured_images(16)
    cfg = small_cfg("vae", epochs=1)
    model = make(cfg)
    before = {k: v.clone() for k, v in model.named_parameters()}
    poison(model, "vae", at_call=1)
    with pytest.raises(FloatingPointError, match=r"train\.vae \(vae\): the 'vae' loss is nan at step 1 of 1"):
        Trainer(model, cfg, progress=False).fit(images, labels)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_finished_checkpoint_with_non_finite_weights_is_moved_aside_not_reused(tmp_path):
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=1)  # 2 steps
    path = tmp_path / "last.pt"
    Trainer(make(cfg), cfg, checkpoint_path=path, resume_key="k", progress=False).fit(images, labels)
    state = torch.load(path, weights_only=True)
    _nan_weights(state)
    torch.save(state, path)

    model = make(cfg)
    with pytest.warns(UserWarning, match=r"last\.pt is unusable \(ValueError: non-finite values in model\."):
        trainer = Trainer(model, cfg, checkpoint_path=path, resume_key="k", progress=False)
        trainer.fit(images, labels)
    assert trainer.step == 2 and len(list(tmp_path.glob("last.pt.corrupt-*"))) == 1
    straight = make(cfg)
    Trainer(straight, cfg, progress=False).fit(images, labels)
    assert_same_weights(model, straight)  # trained again, not the NaN weights returned as "finished"


class InfGradient(torch.autograd.Function):
    """The identity, except that the gradient flowing back through it becomes infinite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inf_gradient(model, phase: str, at_call: int):
    """Give the model's `phase` loss a finite value but infinite gradients the at_call-th time: Adam
    then makes the weights NaN, which the check of the loss alone never sees."""
    change_loss(model, phase, at_call, InfGradient.apply)


@pytest.mark.parametrize("bad_step, kept_step", [(4, 2), (6, 4)], ids=["periodic", "final"])
def test_non_finite_weights_are_never_checkpointed_and_a_rerun_resumes(tmp_path, bad_step, kept_step):
    images, labels = structured_images(48)
    cfg = small_cfg("dcgan", epochs=2)  # 3 steps/epoch, 6 in all; "generator" is the last phase of a step
    path = tmp_path / "last.pt"
    model = make(cfg)
    inf_gradient(model, "generator", at_call=bad_step)
    trainer = Trainer(model, cfg, name="tiny", checkpoint_path=path, resume_key="k", checkpoint_every=2,
                      progress=False)
    with pytest.raises(FloatingPointError,
                       match=rf"train\.tiny \(dcgan\): the 'generator' gradient is (nan|inf) at step {bad_step} of 6; "
                             rf"stopped after 0 rollback.*the last good checkpoint .*last\.pt is kept"):
        trainer.fit(images, labels)
    assert trainer.step == kept_step  # the model holds the checkpointed state, no NaN weights
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    state = torch.load(path, weights_only=True)
    assert state["step"] == kept_step  # the good one, not the step with NaN weights
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    # The rerun (the inf gradient was a one-off) resumes from the good checkpoint: no wedge.
    resumed, steps = make(cfg), []
    Trainer(resumed, cfg, checkpoint_path=path, resume_key="k", log_every=1, progress=False,
            log_fn=lambda values, step: steps.append(step)).fit(images, labels)
    assert steps == list(range(kept_step + 1, 7))
    straight = make(cfg)
    Trainer(straight, cfg, progress=False).fit(images, labels)
    assert_same_weights(resumed, straight)


def test_bf16_autocasts_the_forward_passes_and_keeps_fp32_weights():
    images, labels = structured_images()
    cfg = small_cfg("vae", precision="bf16")
    model = make(cfg)
    seen = set()
    model.decoder.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    x = to_model_input(images, 28, torch.device("cpu"))
    before = fixed_loss(model, x, labels)
    seen.clear()
    Trainer(model, cfg, progress=False).fit(images, labels)
    assert seen == {torch.bfloat16}  # the training forward passes ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert fixed_loss(model, x, labels) < 0.7 * before


def test_channels_last_trains_like_the_default_layout(tmp_path):
    images, labels = structured_images()
    cfg, cl_cfg = small_cfg("dcgan", epochs=2), small_cfg("dcgan", epochs=2, channels_last=True)
    model, cl_model = make(cfg), make(cl_cfg)
    Trainer(model, cfg, progress=False).fit(images, labels)
    trainer = Trainer(cl_model, cl_cfg, checkpoint_path=tmp_path / "last.pt", progress=False)
    conv = next(m for m in cl_model.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.fit(images, labels)
    for k, v in model.state_dict().items():
        assert torch.allclose(cl_model.state_dict()[k].float(), v.float(), atol=1e-4), k  # same math, other layout


@pytest.mark.slow
def test_compiled_submodules_train_like_eager_with_the_same_state_dict_keys():
    """torch.compile on the CPU: ~1-2 minutes of compilation on a busy machine, hence slow."""
    images, labels = structured_images(32)
    cfg, compiled_cfg = small_cfg("vae", epochs=1), small_cfg("vae", epochs=1, compile=True)
    eager, compiled = make(cfg), make(compiled_cfg)
    Trainer(eager, cfg, progress=False).fit(images, labels)
    Trainer(compiled, compiled_cfg, progress=False).fit(images, labels)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for k, v in eager.state_dict().items():
        assert torch.allclose(compiled.state_dict()[k], v, atol=1e-4), k


def test_the_sentinel_sees_the_ema_in_eval_mode_every_k_steps_and_its_values_are_logged():
    images, labels = structured_images(48)
    cfg = small_cfg("dcgan", epochs=2, ema_decay=0.9)  # 6 steps
    model = make(cfg)
    calls, logged, live_at = [], [], {}

    def monitor(m):
        calls.append((m.training, {k: v.clone() for k, v in m.generator.state_dict().items()}))
        return {"sentinel_classes_covered": 3.0, "sentinel_collapse": 0.0}

    def log_fn(values, step):
        logged.append((step, values))
        live_at[step] = {k: v.clone() for k, v in model.generator.state_dict().items()}

    trainer = Trainer(model, cfg, log_every=1, log_fn=log_fn, monitor_fn=monitor, sentinel_every=2, progress=False)
    trainer.fit(images, labels)

    assert [(step, values) for step, values in logged if "sentinel_collapse" in values] == [
        (s, {"sentinel_classes_covered": 3.0, "sentinel_collapse": 0.0}) for s in (2, 4, 6)]
    assert [training for training, _ in calls] == [False, False, False]  # sampled in eval mode
    params = [k for k, _ in model.generator.named_parameters()]
    for (_, seen), step in zip(calls, (2, 4, 6)):
        assert any(not torch.equal(seen[k], live_at[step][k]) for k in params)  # the average, not the live weights
    for k in params:  # the last check saw the final average (its batch-norm statistics are measured after)
        assert torch.equal(model.generator.state_dict()[k], calls[-1][1][k]), k

    plain = make(cfg)
    Trainer(plain, cfg, progress=False).fit(images, labels)
    assert_same_weights(model, plain)  # the sentinel changed nothing in the training


def test_class_histogram_values_and_the_collapse_flag():
    from components.training.sentinel import class_histogram

    assert class_histogram(torch.tensor([5, 5, 5, 5])) == {
        "sentinel_classes_covered": 4.0, "sentinel_top_class_share": 0.25, "sentinel_collapse": 0.0}
    assert class_histogram(torch.tensor([6, 2, 2, 0]))["sentinel_collapse"] == 1.0  # top class > 50 %
    assert class_histogram(torch.tensor([5, 0, 0, 5, 0]))["sentinel_collapse"] == 1.0  # 2 of 5 classes
    assert class_histogram(torch.tensor([5, 5, 0, 0]))["sentinel_collapse"] == 0.0  # half covered, top 50 %


class OneImage(torch.nn.Module):
    """A collapsed generator: the same image whatever the noise."""

    def __init__(self, image):
        super().__init__()
        self.register_buffer("image", image)

    def sample(self, n, generator=None, labels=None, prompts=None):
        return self.image.expand(n, -1, -1, -1)


def test_the_class_histogram_sentinel_judges_samples_with_the_classifier():
    from components.config import ClassifierConfig
    from components.evaluation.classifier import train_classifier
    from components.training.sentinel import class_histogram_sentinel

    images, labels = structured_images(64)
    classifier = train_classifier(images, labels, 4, ClassifierConfig(arch="cnn", epochs=3, batch_size=16, lr=3e-3,
                                                                      width=4, seed=0, vit=None), progress=False)
    sentinel = class_histogram_sentinel(classifier, 4, samples=100)
    with pytest.warns(RuntimeWarning, match=r"mode-collapse sentinel: the largest class takes 100% of 100 samples, "
                                            r"1 of 4 classes appear"):
        values = sentinel(OneImage(to_model_input(images[:1], 28, "cpu")))
    assert values == {"sentinel_classes_covered": 1.0, "sentinel_top_class_share": 1.0, "sentinel_collapse": 1.0}

    model = make(small_cfg("dcgan")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an untrained generator may well be collapsed
        first, second = sentinel(model), sentinel(model)
    assert first == second  # fixed samples: the same model gets the same histogram
    assert 1 <= first["sentinel_classes_covered"] <= 4

    with pytest.raises(ValueError, match="classifier knows 4 classes, the data 10"):
        class_histogram_sentinel(classifier, 10)


def test_numpy_and_python_random_states_are_checkpointed_and_restored(tmp_path):
    """A family drawing from numpy or Python's random (augmentation, say) resumes on the same draws."""
    import random

    import numpy as np

    images, labels = structured_images(48)
    cfg = small_cfg("vae", epochs=2)  # 3 steps/epoch

    def draws(values, step):
        seen.append((step, float(np.random.rand()), random.random()))

    seen = []
    Trainer(make(cfg), cfg, log_every=1, log_fn=draws, progress=False).fit(images, labels)
    straight = list(seen)

    def draws_then_crash(values, step):
        draws(values, step)
        crash_at(5)(values, step)

    path, seen = tmp_path / "last.pt", []
    with pytest.raises(Interrupt):
        Trainer(make(cfg), cfg, checkpoint_path=path, log_every=1, checkpoint_every=2, progress=False,
                log_fn=draws_then_crash).fit(images, labels)
    np.random.seed(12345)  # another process would start from other states
    random.seed(12345)
    seen = []
    Trainer(make(cfg), cfg, checkpoint_path=path, log_every=1, log_fn=draws, progress=False).fit(images, labels)
    assert seen == straight[4:]

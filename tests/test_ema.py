"""The EMA of the image-making weights: the documented average (with its warm-up), batch-norm
statistics from the live model, the EMA in the model after fit and the live weights beside it."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from test_train_stage import stage  # noqa: F401  (the fixture)
from model_configs import model_config
from test_trainer import make, small_cfg, structured_images

from components.models import GenerativeModel
from components.training.ema import EMA
from components.training.trainer import Trainer, stream_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def test_update_is_the_warmed_up_average_of_parameters_and_a_copy_of_buffers():
    model = make(small_cfg("dcgan"))
    ema = EMA(model, decay=0.99)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(1.0)
        for name, b in model.generator.named_buffers():
            if "running_mean" in name:
                b.fill_(0.25)
    ema.update(0)  # decay min(0.99, 1/10) = 0.1: the new weights count 0.9
    live = dict(model.generator.named_parameters())
    for name, p in live.items():
        expected = torch.lerp(start[f"generator.{name}"], p.detach(), 0.9)
        assert torch.equal(ema.state_dict()[f"generator.{name}"], expected), name
    for name, b in model.generator.named_buffers():
        assert torch.equal(ema.state_dict()[f"generator.{name}"], b), name  # copied, not averaged
    assert not any(k.startswith("discriminator.") for k in ema.state_dict())  # only the ema_modules

    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(10_000)  # warm-up over: (1 + t) / (10 + t) > 0.99, so the decay is 0.99
    for name, p in live.items():
        key = f"generator.{name}"
        assert torch.allclose(ema.state_dict()[key], 0.99 * before[key] + 0.01 * p.detach(), atol=1e-6), name


def test_fit_leaves_the_exact_average_in_the_model_and_the_live_weights_beside_it():
    images, labels = structured_images(48)
    decay = 0.8
    cfg = small_cfg("dcgan", epochs=2, ema_decay=decay)  # 3 steps/epoch, 6 in all
    model = make(cfg)
    history = []  # the live generator after each step

    def record(values, step):
        history.append({k: v.detach().clone() for k, v in model.generator.state_dict().items()})

    trainer = Trainer(model, cfg, log_every=1, log_fn=record, progress=False)
    initial = {k: v.detach().clone() for k, v in model.generator.state_dict().items()}
    trainer.fit(images, labels)

    assert len(history) == 6
    params = {name for name, _ in model.generator.named_parameters()}
    expected = dict(initial)
    for t, live in enumerate(history):
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: torch.lerp(expected[k], v, 1 - d) if k in params else v for k, v in live.items()}
    for k in params:
        assert torch.equal(model.generator.state_dict()[k], expected[k]), k
    # Batch-norm statistics are measured anew for the averaged weights, not the live ones'.
    running = {k: v for k, v in model.generator.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert running and all(not torch.equal(v, history[-1][k]) for k, v in running.items())
    again = copy.deepcopy(model)
    trainer.ema.recalibrate_batch_norm(again, stream_seed(cfg.seed, "batch-norm"))
    assert all(torch.equal(again.generator.state_dict()[k], v) for k, v in running.items())

    live = trainer.live_state_dict()
    assert live.keys() == model.state_dict().keys()
    for k, v in history[-1].items():
        assert torch.equal(live[f"generator.{k}"], v), k
    assert any(not torch.equal(live[f"generator.{k}"], model.generator.state_dict()[k]) for k in params)
    for k, v in model.discriminator.state_dict().items():
        assert torch.equal(live[f"discriminator.{k}"], v), k  # D is not averaged
    assert not model.training


def test_a_translate_models_batch_norm_is_measured_on_degraded_training_images_for_its_average():
    """Not only samplers: an inpainter's averaged U-Net gets batch-norm statistics of its own, from
    training images holed as in training, reproducibly from the seed."""
    images, labels = structured_images(48)
    cfg = model_config("inpaint", epochs=1, batch_size=16, ema_decay=0.8)
    model = make(cfg)
    live_running = {}

    def record(values, step):
        live_running.update({k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")})

    trainer = Trainer(model, cfg, log_every=1, log_fn=record, progress=False)
    trainer.fit(images, labels)
    averaged = [k for k in live_running if k.startswith(tuple(f"{m}." for m in model.ema_modules))]
    assert averaged and all(not torch.equal(model.state_dict()[k], live_running[k]) for k in averaged)
    again = copy.deepcopy(model)
    trainer.ema.recalibrate_batch_norm(again, stream_seed(cfg.seed, "batch-norm"), "translate", images)
    assert all(torch.equal(again.state_dict()[k], model.state_dict()[k]) for k in averaged)
    with pytest.raises(ValueError, match="needs its training images"):
        trainer.ema.recalibrate_batch_norm(again, 0, "translate")


def test_without_ema_the_live_weights_are_the_model():
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=1)
    model = make(cfg)
    trainer = Trainer(model, cfg, progress=False)
    trainer.fit(images, labels)
    assert trainer.ema is None
    for k, v in trainer.live_state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_the_checkpoint_holds_the_ema_and_a_finished_one_puts_it_in_the_model(tmp_path):
    images, labels = structured_images(32)
    cfg = small_cfg("vae", epochs=2, ema_decay=0.9)
    path = tmp_path / "last.pt"
    first = make(cfg)
    Trainer(first, cfg, checkpoint_path=path, progress=False).fit(images, labels)
    state = torch.load(path, weights_only=True)
    assert {k.split(".")[0] for k in state["ema"]} == {"encoder", "decoder"}

    again = make(cfg)
    trainer = Trainer(again, cfg, checkpoint_path=path, progress=False)
    trainer.fit(images, labels)  # finished: loaded, not trained
    for k, v in first.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    for k, v in state["model"].items():
        assert torch.equal(trainer.live_state_dict()[k], v), k  # the checkpoint holds the live weights


class NoAveragedParts(GenerativeModel):
    ema_modules = ()


def test_ema_of_a_model_without_ema_modules_is_refused():
    with pytest.raises(ValueError, match=r"ema_decay=0.9: the NoAveragedParts model declares no ema_modules.*"
                                         r"set ema_decay: 0.0"):
        EMA(NoAveragedParts(), 0.9)


def test_the_train_stage_saves_live_weights_beside_the_ema_and_the_evaluate_stage_scores_both(stage, monkeypatch):
    """train_stage wiring: live.safetensors when ema_decay > 0; the evaluator classifier (from its own
    stage) judging a generate-kind model's samples every tracking.sentinel_every steps."""
    import contextlib

    from safetensors.torch import load_file

    from components.pipeline import classifier_stage, train_stage

    params, tmp_path, _ = stage
    params = params.model_copy(update={
        "tracking": params.tracking.model_copy(update={"sentinel_every": 1}),
        "train": {"vae": params.model("vae").model_copy(update={"ema_decay": 0.5})}})
    classifier_stage(params, tmp_path / "dataset", tmp_path / "classifier", tmp_path / "metrics" / "classifier.json")
    logged = []

    class Log:
        run_id = "run-1"

        def __call__(self, values, step):
            logged.append((step, values))

    @contextlib.contextmanager
    def training_run(experiment, run_name, params, tags, **kwargs):
        yield Log()

    monkeypatch.setattr("components.tracking.runs.training_run", training_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 2 steps of a tiny VAE may well look collapsed
        train_stage(params, "vae", tmp_path / "dataset", tmp_path / "models" / "vae", tmp_path / "metrics" / "vae.json",
                    classifier_dir=tmp_path / "classifier")

    sentinel = [(step, values) for step, values in logged if "sentinel_collapse" in values]
    assert [step for step, _ in sentinel] == [1, 2]
    assert set(sentinel[0][1]) == {"sentinel_classes_covered", "sentinel_top_class_share", "sentinel_collapse"}
    model, live = (load_file(str(tmp_path / "models" / "vae" / f"{name}.safetensors")) for name in ("model", "live"))
    assert model.keys() == live.keys()
    assert any(not torch.equal(model[k], live[k]) for k in model)

    # The evaluate stage scores both: the EMA weights as the model, the live ones as <metric>_live.
    from components.pipeline import evaluate_stage

    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={
        "num_samples": 8, "kid_subset_size": 4, "grid_size": 4})})
    metrics = evaluate_stage(params, "vae", tmp_path / "dataset", tmp_path / "classifier", tmp_path / "models" / "vae",
                             tmp_path / "eval" / "vae")
    assert {"fid", "fid_live"} <= set(metrics)
    assert metrics["fid"] != metrics["fid_live"]
    stored = json.loads((tmp_path / "eval" / "vae" / "metrics.json").read_text())
    assert stored["fid_live"] == metrics["fid_live"]

"""Colorization: shapes, the degradation being PIL's convert("L"), the untrained model being the grey
baseline, the output keeping the input's luma, a loss going down, beating grey on coloured shapes, a
request of grey images answered in colour, and a grey dataset refused with a clear reason (the model
cannot be built; the retrain flow skips it)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import ConfigError, apply_overrides, read_params_raw
from components.evaluation.restoration import pixel_scores
from components.images import to_model_input, to_uint8
from components.models import FAMILIES, build_model
from components.models.colorize import luma
from components.params import parse_params, unfit_models
from components.training.trainer import Trainer
from model_configs import model_config, model_fields

REPO = Path(__file__).resolve().parents[1]
COLOURS = torch.tensor([[1.0, 0.15, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 1.0], [1.0, 0.85, 0.1]])  # RGB per class

pytestmark = pytest.mark.usefixtures("one_thread")


def coloured_shapes(n: int, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A disc, a square, a horizontal and a vertical bar, each class in its own colour, on black, with
    random place, size and brightness (so grey level alone does not tell the class): uint8
    N×3×size×size, and the class ids."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    cy, cx = (torch.rand(2, n, 1, 1, generator=g) - 0.5) * 0.6
    r = 0.35 + 0.25 * torch.rand(n, 1, 1, generator=g)
    dy, dx = (yy - cy).abs(), (xx - cx).abs()
    shapes = torch.stack([dy ** 2 + dx ** 2 < r ** 2, (dy < r) & (dx < r), (dy < r / 3) & (dx < r * 1.4),
                          (dx < r / 3) & (dy < r * 1.4)], 1)  # (n, 4, size, size)
    inside = shapes[torch.arange(n), labels].float()  # (n, size, size)
    brightness = 0.55 + 0.45 * torch.rand(n, 1, 1, 1, generator=g)
    rgb = inside[:, None] * COLOURS[labels][:, :, None, None] * brightness  # (n, 3, size, size) in [0, 1]
    return (rgb * 255).round().to(torch.uint8), labels


def colorizer(size: int = 28, **overrides):
    return build_model(model_config("colorize", image_size=size, **overrides), 3, 4)


@pytest.mark.parametrize("size", [28, 64])
def test_grey_in_colour_out(size):
    model = colorizer(size).eval()
    x = to_model_input(coloured_shapes(3, size)[0], size, "cpu")  # (3, 3, size, size)
    inputs = model.degrade(x)
    assert inputs["images"].shape == (3, 1, size, size)
    assert FAMILIES.get("colorize").input_shape(model.cfg, 3) == (1, size, size)
    out = model.translate(inputs)
    assert out.shape == (3, 3, size, size) and out.min() >= -1 and out.max() <= 1
    assert model.baselines(inputs)["grey"].shape == (3, 3, size, size)


def test_the_degradation_is_pils_grey_within_one_level():
    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, 28, 28), dtype=np.uint8))
    ours = to_uint8(luma(to_model_input(rgb, 28, "cpu")))[:, 0].int()  # (6, 28, 28)
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L")))
                       for img in rgb]).int()
    assert (ours - pil).abs().max() <= 1
    assert (ours - rgb.float().mean(1).round().int()).abs().max() > 10  # not the plain mean of R, G, B


def test_the_untrained_model_is_the_grey_baseline():
    model = colorizer().eval()
    inputs = model.degrade(to_model_input(coloured_shapes(4)[0], 28, "cpu"))
    assert torch.equal(model.translate(inputs), model.baselines(inputs)["grey"])


def train_on(model, images: torch.Tensor, steps: int, batch: int = 16) -> list[float]:
    """Walk the model's phases `steps` times over `images` in turn, as the trainer does; each step's loss."""
    x = to_model_input(images, model.image_size, "cpu")
    optimizers, losses = model.optimizers(), []
    model.train()
    for step in range(steps):
        start = step * batch % (x.shape[0] - batch + 1)
        for phase, out in model.training_losses(x[start:start + batch], torch.zeros(batch, dtype=torch.long)):
            optimizers[phase].zero_grad(set_to_none=True)
            out.loss.backward()
            optimizers[phase].step()
            losses.append(float(out.loss.detach()))
    return losses


def test_the_loss_goes_down_on_a_fixed_batch_and_the_output_keeps_the_inputs_luma():
    model = colorizer(width=8, lr=3e-3)
    losses = train_on(model, coloured_shapes(16)[0], steps=60)
    assert np.mean(losses[-5:]) < 0.5 * losses[0], (losses[0], losses[-5:])

    model.eval()
    inputs = model.degrade(to_model_input(coloured_shapes(8, seed=1)[0], 28, "cpu"))
    out = model.translate(inputs)
    assert (out - model.baselines(inputs)["grey"]).abs().max() > 0.1  # it colours now
    # where no channel was clamped (most of the black background is), luma is the input's
    kept = ((out > -1) & (out < 1)).all(1, keepdim=True)  # (8, 1, 28, 28)
    assert kept.sum() > 500
    assert (luma(out) - inputs["images"])[kept].abs().max() < 1e-5


def test_it_beats_the_grey_baseline_on_coloured_shapes():
    """A few hundred steps through the real trainer; scored as the evaluation scores restorations."""
    images, labels = coloured_shapes(512)
    cfg = model_config("colorize", width=8, lr=3e-3, batch_size=32, epochs=12)  # 16 steps an epoch: 192 steps
    model = build_model(cfg, 3, 4)
    Trainer(model, cfg, progress=False).fit(images, labels)

    held_out, _ = coloured_shapes(200, seed=7)
    model.eval()
    inputs = model.degrade(to_model_input(held_out, 28, "cpu"))
    psnr, ssim = pixel_scores(to_uint8(model.translate(inputs)), held_out)
    grey_psnr, grey_ssim = pixel_scores(to_uint8(model.baselines(inputs)["grey"]), held_out)
    print(f"colorize: PSNR {psnr.mean():.2f} dB, SSIM {ssim.mean():.3f}; "
          f"grey: PSNR {grey_psnr.mean():.2f} dB, SSIM {grey_ssim.mean():.3f}")
    assert psnr.mean() > grey_psnr.mean() + 3.0
    assert ssim.mean() > grey_ssim.mean()


def test_a_request_of_grey_images_is_answered_in_colour(tmp_path):
    from components.tracking.model_files import save_trained_model
    from components.tracking.pyfunc_model import GeneratorModel

    model = colorizer(width=8, lr=3e-3)
    train_on(model, coloured_shapes(64)[0], steps=30)  # so that it colours
    spec = {"family": "colorize", "config": model.cfg.model_dump(mode="json"), "channels": 3, "num_classes": 4,
            "classes": list("abcd"), "dataset": "shapes", "dataset_version": "d1", "steps": 30}
    save_trained_model(model.eval(), spec, tmp_path / "model")
    served = GeneratorModel()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(tmp_path / "model")}))

    rgb = coloured_shapes(3, seed=2)[0]
    grey = np.stack([np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L")) for img in rgb])[:, None]
    out = served.predict(None, {"images": grey})  # uint8 3×1×28×28, as PIL makes grey images
    assert out.dtype == np.uint8 and out.shape == (3, 3, 28, 28)
    assert not (out[:, 0] == out[:, 1]).all()  # colour, not grey
    with pytest.raises(ValueError, match=r"^images: this colorize model takes N×1×28×28 images"):
        served.predict(None, {"images": rgb.numpy()})


# --- a grey dataset --------------------------------------------------------------------------------

GREY_REASON = ("the colorize family learns from colour images (data.channels: 3), and this dataset is grey "
               "(data.channels: 1); to train it, ingest colour images with data.channels: 3")


def params_with_colorize(channels: int):
    raw = read_params_raw(REPO / "params.yaml")
    raw["train"]["colour"] = model_fields("colorize")
    return parse_params(apply_overrides(raw, [f"data.channels={channels}"]))


def test_a_grey_dataset_cannot_build_the_model_and_says_why():
    with pytest.raises(ConfigError) as caught:
        build_model(model_config("colorize"), 1, 10)
    assert str(caught.value) == GREY_REASON


def test_the_retrain_flow_is_told_to_skip_it_on_a_grey_dataset_only():
    grey = params_with_colorize(1)
    assert unfit_models(grey) == {"colour": GREY_REASON}  # the other models of params.yaml train as before
    assert unfit_models(params_with_colorize(3)) == {}


def test_the_train_stage_on_a_grey_dataset_stops_with_the_reason_and_writes_nothing(tmp_path, monkeypatch):
    from components.data.pack import pack_dataset
    from components.data.sources import RawDataset, Split
    from components.pipeline import train_stage

    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / ".genpipe"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = params_with_colorize(1)
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 4).astype(np.int64)
    split = lambda a, b: Split(images[a:b], labels[a:b], [f"x#{i}" for i in range(a, b)])  # noqa: E731
    pack_dataset(RawDataset(classes=list("abcd"), splits={"train": split(0, 32), "test": split(32, 40)}),
                 tmp_path / "dataset", params.data, {"name": "unit"})

    with pytest.raises(ConfigError, match=r"^the colorize family learns from colour images"):
        train_stage(params, "colour", tmp_path / "dataset", tmp_path / "models" / "colour",
                    tmp_path / "metrics" / "colour.json")
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before any training run was opened



# --- the real flow (Prefect, DVC, MLflow) ----------------------------------------------------------

def retrain_in_workspace(ws: Path, monkeypatch, train: dict, overrides: list[str]):
    """A fresh project in `ws` (git + DVC) with params.yaml's train section replaced by `train` and
    `overrides` applied; runs the retrain flow there and returns its result."""
    import os
    import shutil
    import subprocess
    import sys

    from prefect.testing.utilities import prefect_test_harness

    from components.config import write_params_raw
    from flows.retrain import retrain

    for name in ["dvc.yaml", ".dvcignore", ".gitignore"]:
        shutil.copy(REPO / name, ws / name)
    shutil.copytree(REPO / ".dvc", ws / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for package in ["components", "flows"]:
        shutil.copytree(REPO / package, ws / package, ignore=shutil.ignore_patterns("__pycache__"))
    raw = read_params_raw(REPO / "params.yaml")
    raw["train"] = train
    write_params_raw(apply_overrides(raw, [
        "classifier.epochs=1", "classifier.batch_size=32", "evaluate.num_samples=40",
        "evaluate.kid_subset_size=20", "evaluate.grid_size=16", *overrides]), ws / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    for key, value in {"GENPIPE_HOME": str(ws / ".genpipe"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{ws / '.genpipe' / 'mlflow' / 'mlflow.db'}",
                       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                       "DVC_NO_ANALYTICS": "1", "GENPIPE_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    (ws / ".genpipe" / "mlflow").mkdir(parents=True)
    monkeypatch.chdir(ws)
    with prefect_test_harness(server_startup_timeout=60):
        return retrain()  # raises RetrainFailed if any stage failed


@pytest.mark.slow
def test_retrain_on_a_colour_image_folder_trains_scores_and_registers_a_colorizer(tmp_path, monkeypatch):
    import json

    import mlflow.pyfunc

    images, labels = coloured_shapes(240)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "data" / "shapes" / f"shape{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    result = retrain_in_workspace(tmp_path, monkeypatch, {"colour": model_fields(
        "colorize", width=8, lr=3e-3, batch_size=16, epochs=12)}, [
        "data.name=shapes", "data.source=image-folder", "data.path=data/shapes", "data.channels=3",
        "data.test_fraction=0.25", "evaluate.metrics=[fid,psnr,ssim]"])

    assert result.failures == {} and result.not_trained == {}
    assert [r.name for r in result.registrations] == ["shapes-colour"]
    metrics = json.loads((tmp_path / "artifacts" / "eval" / "colour" / "metrics.json").read_text())
    assert metrics["psnr"] > metrics["psnr_grey"] + 3 and metrics["ssim"] > metrics["ssim_grey"], metrics
    served = mlflow.pyfunc.load_model("models:/shapes-colour@champion")
    grey = np.stack([np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L")) for img in images[:4]])
    out = served.predict({"images": grey[:, None]})
    assert out.dtype == np.uint8 and out.shape == (4, 3, 28, 28)

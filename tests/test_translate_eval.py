"""Evaluating translate models as restoration (PSNR/SSIM beside the classical baselines, inside the
mask for inpainting, the lecture's figure) and a gate whose metric may be higher-is-better."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from fashion import fashion_subset
from model_configs import EVALUATE_EXTRAS, model_config
import test_registry
from test_registry import PROTOCOL, make_candidate, register
from components.config import EvaluateConfig, RegistryConfig
from components.evaluation.classifier import Classifier
from components.evaluation.evaluate import evaluate_model, reference_subset
from components.evaluation.metrics import skipped_for_kind
from components.evaluation.restoration import FIGURE_SIDE, MODEL, pixel_scores, restore
from components.models import build_model
from components.reporting.pictures import interpolation_strip
from components.tracking.registry import _judge_alone, decide
from components.training.checkpoint import write_json

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning"),
]
METRICS = ["fid", "kid", "psnr", "ssim", "class_coverage", "inception_score", "recon_mse", "elbo"]
GRID = 12
store = test_registry.store  # the fixture: an empty SQLite tracking store


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    """300 real Fashion-MNIST test images, uint8 N×1×28×28."""
    return fashion_subset(30, "test")[0]


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)  # untrained but fixed: FID only needs a deterministic feature map here
    return Classifier(channels=1, num_classes=10, width=8).eval()


def settings(**overrides) -> EvaluateConfig:
    cfg = EvaluateConfig(metrics=METRICS, num_samples=250, kid_subset_size=50, nearest_k=3,
                         bootstrap={"samples": 50, "alpha": 0.1}, grid_size=GRID, seed=7, **EVALUATE_EXTRAS)
    return cfg.model_copy(update=overrides)  # bootstrap=None: no intervals, as live_weight_scores asks


def translate_model(family: str):
    torch.manual_seed(0)
    return build_model(model_config(family), 1, 10).eval()


def test_srresnet_is_scored_beside_bicubic_deterministically(held_out, classifier, tmp_path):
    model = translate_model("srresnet")
    first = evaluate_model(model, classifier, held_out, settings(), tmp_path / "grid.png", kind="translate")
    second = evaluate_model(model, classifier, held_out, settings(), kind="translate")
    assert first == second
    assert {"fid", "kid", "psnr", "psnr_ci_low", "psnr_ci_high", "psnr_bicubic", "psnr_gain", "psnr_gain_ci_low",
            "psnr_gain_ci_high", "ssim", "ssim_ci_low", "ssim_ci_high", "ssim_bicubic"} <= set(first)
    # Skipped with their reasons, not scored: a restoration's classes are its input's.
    skipped = skipped_for_kind(METRICS, "translate")
    assert set(skipped) == {"class_coverage", "inception_score", "recon_mse", "elbo"}
    assert "reference" in skipped["class_coverage"]
    assert not {"classes_covered", "sample_confidence", "inception_score", "recon_mse", "elbo"} & set(first)
    # Untrained, the generator adds a zero residual to bicubic upscaling: it is the baseline, exactly.
    assert first["psnr"] == first["psnr_bicubic"] and first["ssim"] == first["ssim_bicubic"]
    assert first["psnr_gain"] == 0.0
    assert 10 < first["psnr"] < 30 and 0 < first["ssim"] < 1
    assert first["psnr_ci_low"] <= first["psnr"] <= first["psnr_ci_high"]
    assert first["psnr_ci_low"] < first["psnr_ci_high"]

    # The same PSNR as torchmetrics' over the whole image (no mask), from the restorations themselves.
    from torchmetrics.functional.image import peak_signal_noise_ratio

    batch = restore(model, reference_subset(held_out, settings()), seed=7)
    per_image = peak_signal_noise_ratio(batch.outputs[MODEL].float() / 255, batch.clean.float() / 255,
                                        data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert math.isclose(first["psnr"], float(per_image.mean()), rel_tol=1e-5)
    assert batch.inputs.shape[-2:] == (7, 7)  # 4x: 28 -> 7

    # A model that is no longer bicubic is scored on its own outputs.
    with torch.no_grad():
        model.generator.tail.bias.fill_(0.3)
    moved = evaluate_model(model, classifier, held_out, settings(metrics=["psnr"]), kind="translate")
    assert moved["psnr"] < first["psnr"] and moved["psnr_bicubic"] == first["psnr_bicubic"]
    assert math.isclose(moved["psnr_gain"], moved["psnr"] - moved["psnr_bicubic"], abs_tol=1e-9)


def test_the_figure_has_input_baselines_model_and_original_columns(held_out, classifier, tmp_path):
    evaluate_model(translate_model("srresnet"), classifier, held_out, settings(metrics=["psnr"]),
                   tmp_path / "sr.png", kind="translate")
    evaluate_model(translate_model("inpaint"), classifier, held_out, settings(metrics=["psnr"]),
                   tmp_path / "inpaint.png", kind="translate")
    tile = 28 * math.ceil(FIGURE_SIDE / 28)  # 112: zoomed to at least FIGURE_SIDE
    for name, columns in (("sr", 4), ("inpaint", 5)):  # input, bicubic | mean_fill + nearest_fill, model, original
        with Image.open(tmp_path / f"{name}.png") as im:
            rows = GRID // columns
            assert im.width == columns * (tile + 2) + 2, name
            assert (im.height - 2) % rows == 0 and (im.height - 2) // rows > tile + 2, name  # each tile has a caption
    strip = interpolation_strip(translate_model("srresnet"), "translate", held_out, rows=3, seed=1)
    assert strip.shape[0] == 3 * 4 and strip.shape[-1] == tile and strip.dtype == torch.uint8


def test_inpainting_is_scored_inside_the_mask_beside_its_fills(held_out, classifier):
    model = translate_model("inpaint")
    out = evaluate_model(model, classifier, held_out, settings(metrics=["psnr", "ssim"], bootstrap=None),
                         kind="translate")
    assert out == evaluate_model(model, classifier, held_out, settings(metrics=["psnr", "ssim"], bootstrap=None),
                                 kind="translate")  # the masks come from the seed
    assert {"psnr", "psnr_mean_fill", "psnr_nearest_fill", "psnr_gain", "ssim", "ssim_mean_fill",
            "ssim_nearest_fill"} <= set(out)
    assert math.isclose(out["psnr_gain"], out["psnr"] - max(out["psnr_mean_fill"], out["psnr_nearest_fill"]),
                        abs_tol=1e-9)
    # Inside the mask only: the model keeps every known pixel, so over the whole image it would score higher.
    batch = restore(model, reference_subset(held_out, settings()), seed=7)
    assert batch.mask is not None and batch.mask.sum() > 0
    inside, _ = pixel_scores(batch.outputs[MODEL], batch.clean, batch.mask)
    whole, _ = pixel_scores(batch.outputs[MODEL], batch.clean)
    assert math.isclose(out["psnr"], float(inside.double().mean()), rel_tol=1e-6)
    assert float(whole.mean()) > float(inside.mean()) + 3
    with pytest.raises(ValueError, match="mask: empty for image"):
        pixel_scores(batch.outputs[MODEL][:2], batch.clean[:2], torch.zeros(2, 1, 28, 28))


def test_masked_scores_on_a_known_answer():
    clean = torch.full((1, 1, 16, 16), 100, dtype=torch.uint8)
    restored = clean.clone()
    restored[..., :4, :] = 110  # wrong by 10 grey levels in the top four rows only
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1  # the top half: half its pixels wrong
    psnr, ssim = pixel_scores(restored, clean, mask)
    assert math.isclose(float(psnr), 10 * math.log10(1 / ((10 / 255) ** 2 / 2)), rel_tol=1e-6)
    whole, _ = pixel_scores(restored, clean)
    assert math.isclose(float(whole), 10 * math.log10(1 / ((10 / 255) ** 2 / 4)), rel_tol=1e-6)
    assert float(pixel_scores(clean, clean, mask)[0]) == 100.0  # exact: capped, not infinite
    outside = torch.zeros(1, 1, 16, 16)
    outside[..., 12:, :] = 1  # where the rows are right, beyond SSIM's window reach: SSIM 1
    assert math.isclose(float(pixel_scores(restored, clean, outside)[1]), 1.0, abs_tol=1e-6)
    assert float(ssim) < 1


# --- the gate, either way round ---------------------------------------------------------------------

def test_higher_is_better_metrics_promote_on_higher_scores():
    assert decide("psnr", 24.0, 22.0, 0.5, new_ci=None, champion_ci=None)[0] is True
    promote, reason = decide("psnr", 22.0, 24.0, 0.5, new_ci=None, champion_ci=None)
    assert promote is False and "not better by more than the margin 0.5" in reason
    assert decide("psnr", 22.4, 22.0, 0.5, new_ci=None, champion_ci=None)[0] is False  # within the margin
    assert decide("ssim", 0.81, 0.80, 0.0, new_ci=None, champion_ci=None)[0] is True
    assert decide("fid", 0.81, 0.80, 0.0, new_ci=None, champion_ci=None)[0] is False  # lower is better


def test_higher_is_better_intervals_must_be_apart_upwards():
    # the challenger's lower bound above the champion's upper bound
    promote, reason = decide("psnr", 24.0, 22.0, 0.5, new_ci=(23.5, 24.5), champion_ci=(21.5, 22.5))
    assert promote is True and "intervals apart" in reason and "[23.5, 24.5]" in reason
    promote, reason = decide("psnr", 24.0, 22.0, 0.5, new_ci=(22.4, 24.5), champion_ci=(21.5, 22.5))
    assert promote is False and "intervals overlap or touch" in reason
    assert decide("psnr", 24.0, 22.0, 0.5, new_ci=(22.5, 24.5), champion_ci=(21.5, 22.5))[0] is False  # touching
    # the same intervals the lower-is-better way round would be apart for FID only if reversed
    assert decide("fid", 22.0, 24.0, 0.5, new_ci=(21.5, 22.5), champion_ci=(23.5, 24.5))[0] is True
    assert decide("fid", 24.0, 22.0, 0.5, new_ci=(23.5, 24.5), champion_ci=(21.5, 22.5))[0] is False


def test_the_bound_is_a_floor_for_higher_is_better_metrics():
    assert _judge_alone("psnr", 21.0, 20.0) == (True, "psnr 21 reaches registry.ceiling.psnr 20 (a floor: higher "
                                                      "psnr is better)")
    promote, reason = _judge_alone("psnr_gain", 0.5, 1.0)
    assert promote is False and "falls short of registry.ceiling.psnr_gain 1" in reason
    assert _judge_alone("fid", 120.0, 100.0) == (False, "fid 120 exceeds registry.ceiling.fid 100")


def test_params_accept_psnr_as_gating_metric_and_refuse_unknown_ones():
    cfg = RegistryConfig(gating_metric="psnr", min_improvement={"psnr": 0.2}, ceiling={"psnr": 18.0})
    assert cfg.gating_metric == "psnr"
    with pytest.raises(ValueError, match="gating_metric"):
        RegistryConfig(gating_metric="recon_mse", min_improvement={"recon_mse": 0.1}, ceiling={"recon_mse": 1.0})


def test_a_psnr_gate_registers_higher_psnr_and_judges_an_unrescorable_champion_on_the_floor(tmp_path, store):
    gate = RegistryConfig(gating_metric="psnr", min_improvement={"psnr": 0.5}, ceiling={"psnr": 20.0})

    def candidate(seed: int, psnr: float, ci: tuple[float, float]):
        made = make_candidate(tmp_path, seed, 50.0)
        write_json({"fid": 50.0, "psnr": psnr, "psnr_ci_low": ci[0], "psnr_ci_high": ci[1]},
                   made[1] / "metrics.json")
        return made

    register(candidate(1, 21.0, (20.8, 21.2)), cfg=gate)
    better = register(candidate(2, 22.0, (21.8, 22.2)), cfg=gate)
    assert better.decision == "promoted", better.reason
    worse = register(candidate(3, 21.5, (21.3, 21.7)), cfg=gate)
    assert worse.decision == "kept" and "psnr 21.5 [21.3, 21.7] vs champion's 22 [21.8, 22.2]" in worse.reason
    tags = store.get_model_version("toy-dcgan", "3").tags
    assert tags["promotion.rule"] == "psnr higher by more than registry.min_improvement 0.5 and beyond both intervals"

    # A re-score that gives no PSNR (pipeline.rescore_registered gives one, tested in
    # test_translate_serving; this stands for any that cannot): the challenger is judged on the floor
    # instead of failing the registration.
    other = {**PROTOCOL, "evaluator": "e2"}
    floor = register(candidate(4, 20.5, (20.3, 20.7)), other, rescore=lambda version, protocol: {"fid": 40.0},
                     cfg=gate)
    assert floor.decision == "promoted"
    assert "re-scoring gave no psnr" in floor.reason and "reaches registry.ceiling.psnr 20" in floor.reason
    assert json.loads(tags["promotion.challenger_ci"]) == [21.3, 21.7]


def test_the_gating_metric_may_be_chosen_per_task_kind(tmp_path, store):
    per_kind = {"gating_metric": {"generate": "fid", "translate": "psnr"},
                "min_improvement": {"fid": 5.0, "psnr": 0.5}, "ceiling": {"fid": 300.0, "psnr": 20.0}}
    gate = RegistryConfig(**per_kind)
    assert (gate.metric_for("generate"), gate.metric_for("translate")) == ("fid", "psnr")
    with pytest.raises(ValueError, match="no metric for reconstruct models; add registry.gating_metric.reconstruct"):
        gate.metric_for("reconstruct")
    with pytest.raises(ValueError, match="no value for the gating metric 'psnr'; add registry.min_improvement.psnr"):
        RegistryConfig(**{**per_kind, "min_improvement": {"fid": 5.0}})

    def candidate(seed: int, fid: float, psnr: float):
        made = make_candidate(tmp_path, seed, fid)
        write_json({"fid": fid, "psnr": psnr}, made[1] / "metrics.json")
        return made

    register(candidate(1, 50.0, 30.0), cfg=gate)
    # A sampler (toy-dcgan) is judged on its kind's metric, FID: lower FID wins although its PSNR fell.
    lower_fid = register(candidate(2, 40.0, 10.0), cfg=gate)
    assert lower_fid.decision == "promoted" and lower_fid.reason.startswith("fid 40 vs champion's 50"), lower_fid.reason


def test_a_per_kind_gate_without_a_trained_models_kind_is_refused_before_training():
    from components.config import ConfigError, read_params_raw
    from components.params import parse_params

    raw = read_params_raw("params.yaml")
    raw["registry"]["gating_metric"] = {"generate": "fid"}  # and a translate model to train:
    raw["train"]["srgan"] = {"family": "srresnet", **{k: v for k, v in raw["train"]["dcgan"].items() if k in (
        "image_size", "epochs", "batch_size", "lr", "seed", "ema_decay", "precision", "channels_last", "compile")},
        "scale": 4, "width": 4, "blocks": 1}
    with pytest.raises(ConfigError, match=r"no metric for translate models; add registry.gating_metric.translate"
                                          r".*\(train.srgan\)"):
        parse_params(raw)

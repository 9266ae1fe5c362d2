"""params.yaml → typed, frozen config: the shipped file loads; every error names its key path and rule."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pydantic
import pytest

from components.config import ConfigError, apply_overrides, read_params_raw, write_params_raw
from components.params import load_params, parse_params
from components.evaluation.metrics import METRICS
from components.data.sources import SOURCES
from components.models import FAMILIES

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def raw():
    """A fresh, mutable copy of the shipped params (ruamel round-trip objects, plain-dict compatible)."""
    return read_params_raw(PARAMS)


def problems_of(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return str(info.value)


def test_shipped_params_load():
    params = load_params(PARAMS)
    assert {"vae", "dcgan", "cgan"} <= set(params.train)
    assert params.model("vae").family == "vae"
    assert params.model("dcgan").family == "dcgan"
    assert type(params.model("dcgan")).__name__ == "DCGANConfig"  # the family's own config class
    assert params.model("dcgan").ngf == 64
    assert params.evaluate.metrics == ["fid", "fid_floor", "kid", "class_coverage", "inception_score", "precision_recall",
                                       "density_coverage", "recon_mse", "psnr", "ssim", "elbo", "nll", "inception"]
    assert [params.registry.metric_for(kind) for kind in ("generate", "reconstruct", "translate")] == [
        "fid", "fid", "psnr_gain"]


def test_unknown_model_name_is_config_error():
    params = load_params(PARAMS)
    with pytest.raises(ConfigError, match=r"train\.nope: no such model.*'dcgan'.*'vae'"):
        params.model("nope")


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml: not found"):
        load_params(missing)


def test_invalid_yaml_names_path(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(bad)


def test_negative_lr_names_path_and_rule(raw):
    raw["train"]["vae"]["lr"] = -1
    assert "train.vae.lr: must be > 0, got -1" in problems_of(raw)


def test_rule_bound_printed_as_written(raw):
    raw["train"]["vae"]["lr"] = -1
    assert "train.vae.lr: must be > 0, got -1" in problems_of(raw)


def test_unknown_key_names_path(raw):
    raw["train"]["dcgan"]["lrr"] = 0.1
    assert "train.dcgan.lrr: unknown key" in problems_of(raw)


def test_unknown_top_level_key(raw):
    raw["extra_section"] = {}
    assert "extra_section: unknown key" in problems_of(raw)


def test_unknown_family_lists_valid_families(raw):
    raw["train"]["vae"]["family"] = "diffusion"
    message = problems_of(raw)
    assert "train.vae.family: must be one of" in message
    for name in FAMILIES.names():
        assert name in message
    assert "'diffusion'" in message


def test_missing_key_reported(raw):
    del raw["train"]["vae"]["beta"]
    assert "train.vae.beta: missing" in problems_of(raw)


def test_missing_section_reported(raw):
    del raw["registry"]
    assert "registry: missing" in problems_of(raw)


def test_log_and_checkpoint_intervals_live_outside_the_model_sections(raw):
    params = parse_params(raw)
    assert (params.tracking.log_every, params.tracking.checkpoint_every) == (50, 1000)
    assert "log_every" not in params.model("dcgan").model_dump()  # not in model.json or the resume key
    raw["tracking"]["log_every"] = 0
    raw["train"]["vae"]["checkpoint_every"] = 10
    problems = problems_of(raw)
    assert "tracking.log_every: must be > 0, got 0" in problems
    assert "train.vae.checkpoint_every: unknown key" in problems


def test_unknown_metric_lists_valid(raw):
    raw["evaluate"]["metrics"] = ["fid", "fid50k"]
    message = problems_of(raw)
    assert "evaluate.metrics:" in message
    assert "fid50k" in message
    for name in METRICS.names():
        assert name in message


def test_unknown_source_lists_valid(raw):
    raw["data"]["source"] = "imagenet"
    message = problems_of(raw)
    assert "data.source: must be one of" in message
    for name in SOURCES.names():
        assert name in message


def test_literal_rule_names_choices(raw):
    raw["train"]["dcgan"]["image_size"] = 32
    assert "train.dcgan.image_size: must be one of 28 or 64, got 32" in problems_of(raw)


def test_all_problems_reported_at_once(raw):
    raw["train"]["vae"]["lr"] = -1
    raw["train"]["dcgan"]["lrr"] = 0.1
    raw["data"]["channels"] = 2
    raw["evaluate"]["grid_size"] = 0
    raw["classifier"]["epochs"] = 0
    message = problems_of(raw)
    for expected in ("train.vae.lr:", "train.dcgan.lrr:", "data.channels:", "evaluate.grid_size:",
                     "classifier.epochs:"):
        assert expected in message, (expected, message)
    # Unaffected sections are not blamed.
    assert "registry." not in message


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_params(["data"])


def test_override_changes_value_and_parses_yaml_types(raw):
    apply_overrides(raw, ["train.dcgan.epochs=1", "train.vae.lr=5e-4", "data.limit_per_split=null",
                          "data.resize=false", "evaluate.metrics=[fid, kid]"])
    assert raw["train"]["dcgan"]["epochs"] == 1 and isinstance(raw["train"]["dcgan"]["epochs"], int)
    assert raw["train"]["vae"]["lr"] == pytest.approx(5e-4) and isinstance(raw["train"]["vae"]["lr"], float)
    assert raw["data"]["limit_per_split"] is None
    assert raw["data"]["resize"] is False
    params = parse_params(raw)
    assert params.model("dcgan").epochs == 1
    assert params.evaluate.metrics == ["fid", "kid"]


def test_override_value_may_contain_equals_sign(raw):
    apply_overrides(raw, ["data.name=a=b"])
    assert raw["data"]["name"] == "a=b"


@pytest.mark.parametrize("override, named", [
    ("train.dcgan.lrr=1", "train.dcgan.lrr"),
    ("train.gan.epochs=1", "train.gan"),
    ("nosection.key=1", "nosection"),
])
def test_override_unknown_key_raises_naming_it(raw, override, named):
    before = copy.deepcopy(dict(raw))
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        apply_overrides(raw, [override])
    assert dict(raw).keys() == before.keys()


@pytest.mark.parametrize("override", ["train.dcgan.epochs", "=1", ""])
def test_malformed_override_raises(raw, override):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(raw, [override])


def test_out_of_range_override_fails_validation(raw):
    apply_overrides(raw, ["train.dcgan.epochs=0"])
    assert "train.dcgan.epochs: must be > 0, got 0" in problems_of(raw)


def test_configs_are_frozen():
    params = load_params(PARAMS)
    with pytest.raises(pydantic.ValidationError):
        params.model("vae").lr = 1.0
    with pytest.raises(pydantic.ValidationError):
        params.data.channels = 3
    with pytest.raises(pydantic.ValidationError):
        params.registry = None


def test_write_params_raw_round_trip_keeps_comments(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS, path)
    comment = "# by task kind: a challenger becomes champion only if better by more than"
    assert comment in path.read_text()

    raw = read_params_raw(path)
    apply_overrides(raw, ["train.dcgan.epochs=3"])
    write_params_raw(raw, path)

    text = path.read_text()
    assert comment in text
    assert "# genpipe parameters" in text  # the header comment too
    assert load_params(path).model("dcgan").epochs == 3
    assert load_params(path).model("vae").epochs == load_params(PARAMS).model("vae").epochs
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # no temp file left behind


def test_unhashable_family_is_config_error(raw):
    raw["train"]["vae"]["family"] = ["vae"]
    assert "train.vae.family: must be one of" in problems_of(raw)


def test_a_gating_metric_without_its_own_margin_is_refused(raw):
    raw["registry"]["gating_metric"] = "kid"  # the shipped margin is FID's: 5 would never let a KID through
    problems = problems_of(raw)
    assert "registry.min_improvement: no value for the gating metric 'kid'; add registry.min_improvement.kid" in problems
    assert "registry.ceiling: no value for the gating metric 'kid'; add registry.ceiling.kid" in problems
    raw["registry"]["min_improvement"]["kid"] = 0.001
    raw["registry"]["ceiling"]["kid"] = 0.5
    assert parse_params(raw).registry.min_improvement == {"fid": 5.0, "psnr_gain": 0.2, "kid": 0.001}


def test_a_latent_model_must_name_an_autoencoder_with_a_latent_grid(raw):
    from model_configs import model_fields

    raw["train"]["kl_ae"] = model_fields("kl_ae")
    raw["latent"] = {"ldm": model_fields("ldm", autoencoder="kl_ae")}
    params = parse_params(raw)
    assert params.model("ldm").autoencoder == "kl_ae" and params.section_of("ldm") == "latent"
    assert set(params.models) == {*params.train, "ldm"}

    raw["latent"]["ldm"]["autoencoder"] = "kl-ae"
    assert "latent.ldm.autoencoder: no model 'kl-ae' in train; name one of" in problems_of(raw)
    raw["latent"]["ldm"]["autoencoder"] = "vae"
    assert ("latent.ldm.autoencoder: train.vae is a vae, which has no latent grid to train on; "
            "name a model of family kl_ae") in problems_of(raw)
    raw["latent"]["ldm"].update(autoencoder="kl_ae", image_size=64)
    assert ("latent.ldm.image_size: 64, but its autoencoder train.kl_ae makes 28 px images; "
            "set the same image_size for both") in problems_of(raw)
    raw["latent"]["ldm"]["image_size"] = 28
    raw["train"]["kl_ae"]["width"] = 0  # reported once, as its own problem, not as a missing autoencoder
    assert "no model 'kl_ae' in train" not in problems_of(raw) and "train.kl_ae.width: must be > 0" in problems_of(raw)


def test_each_model_in_the_section_of_its_kind_under_a_name_of_its_own(raw):
    from model_configs import model_fields

    raw["train"]["kl_ae"] = model_fields("kl_ae")
    raw["train"]["ldm"] = model_fields("ldm", autoencoder="kl_ae")
    raw["latent"] = {"vae": copy.deepcopy(raw["train"]["vae"])}
    problems = problems_of(raw)
    assert "train.ldm: the ldm family is trained on another model's latents (autoencoder); move it to the latent section" in problems
    assert "latent.vae: train.vae exists too; a model name must be unique across train and latent" in problems
    assert "latent.vae: the vae family is trained on images, not on another model; move it to the train section" in problems


def test_a_profile_may_add_models_to_the_latent_section(tmp_path, raw):
    from components.config import apply_profile

    profile = tmp_path / "extra.yaml"
    profile.write_text("latent:\n  ldm2:\n    family: ldm\n")
    assert apply_profile(raw, profile)["latent"]["ldm2"] == {"family": "ldm"}

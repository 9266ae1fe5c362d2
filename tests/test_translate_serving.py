"""Serving the task kind "translate": request validation naming the field (dtype, shape, count, mask),
a tiny registered srresnet answering through mlflow.pyfunc (uint8 and PNG), the example and
description stored with it, and `genpipe translate` on PNG, JPEG, wrong-size and corrupt files."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_configs import model_fields
# `cli` runs `genpipe` in this process against the store of the `registered` fixture, which this
# module overrides with its own (a translate model) below.
from test_requests import CLASSES, cli, images, registered_store, use_store  # noqa: F401
from components.tracking.requests import MAX_COUNT, RequestSchema, parse_request

pytestmark = pytest.mark.usefixtures("one_thread")
LOW, HIGH = (1, 7, 7), (1, 28, 28)  # a 4x super-resolver's input and output images at image_size 28


def sr_schema() -> RequestSchema:
    return RequestSchema.of({"family": "srresnet", "channels": 1, "num_classes": 10, "classes": CLASSES,
                             "config": model_fields("srresnet")})


def mask_schema() -> RequestSchema:
    """What an inpainting family declares (takes_mask): images and masks at the size it returns."""
    return RequestSchema(family="inpaint", kind="translate", conditions=(), channels=1, image_size=28,
                         classes=tuple(CLASSES), input_shape=HIGH, takes_mask=True)


def masks(n: int, shape=(1, 28, 28)) -> np.ndarray:
    mask = np.zeros((n, *shape), dtype=np.uint8)
    mask[..., 7:21, 7:21] = 1
    return mask


# --- validation -----------------------------------------------------------------------------------

def test_a_translate_schema_takes_images_at_the_familys_input_shape():
    schema = sr_schema()
    assert (schema.kind, schema.fields, schema.sent_shape) == ("translate", ("images", "format"), LOW)
    assert mask_schema().fields == ("images", "format", "mask")
    parsed = parse_request({"images": images(3, LOW).astype(np.int64)}, schema)  # JSON carries integers
    assert parsed["images"].dtype == np.uint8 and parsed["images"].shape == (3, *LOW)
    assert parsed["format"] == "uint8" and set(parsed) == {"images", "format"}


@pytest.mark.parametrize("request_, message", [
    ({}, "images: missing; send uint8 images N×1×7×7 to this srresnet model (the low-resolution inputs, 4x "
         "smaller than the N×1×28×28 images it returns)"),
    ({"images": images(2, LOW).astype(np.float32)}, "images: must be uint8 pixels 0..255, got dtype float32"),
    ({"images": images(2, LOW) / 255.0}, "images: must be uint8 pixels 0..255, got dtype float64 with values 0"),
    ({"images": images(2, LOW).astype(np.int64) - 1}, "images: must be uint8 pixels 0..255, got dtype int64 with values -1"),
    # the full-size image sent to a super-resolver
    ({"images": images(2, HIGH)}, "images: this srresnet model takes N×1×7×7 images (the low-resolution inputs, "
                                  "4x smaller than the N×1×28×28 images it returns), got N×1×28×28"),
    ({"images": images(1, LOW)[0]}, "images: must be 4-d N×C×H×W, got shape (1, 7, 7) (one image is 1×1×7×7)"),
    ({"images": images(1, (3, 7, 7))}, "images: this srresnet model takes N×1×7×7 images"),
    ({"images": np.zeros((MAX_COUNT + 1, *LOW), np.uint8)}, f"images: send 1..{MAX_COUNT} images per request, "
                                                            f"got {MAX_COUNT + 1}"),
    ({"images": np.zeros((0, *LOW), np.uint8)}, f"images: send 1..{MAX_COUNT} images per request, got 0"),
    ({"images": images(1, LOW), "mask": masks(1, (1, 7, 7))},
     "unknown request field(s) ['mask'] for this srresnet model (it makes one new image of each image it is "
     "sent, it does not sample); valid: images, format"),
    ({"images": images(1, LOW), "count": 2}, "unknown request field(s) ['count'] for this srresnet model"),
    ({"images": images(1, LOW), "format": "jpeg"}, "format: must be one of uint8, png, png_grid, got 'jpeg'"),
])
def test_bad_translate_requests_name_the_field_and_the_rule(request_, message):
    with pytest.raises(ValueError) as error:
        parse_request(request_, sr_schema())
    assert message in str(error.value) and len(str(error.value)) < 500


@pytest.mark.parametrize("request_, message", [
    ({"images": images(2)}, "mask: missing; send one uint8 mask N×1×28×28 per image, 1 where to fill in"),
    ({"images": images(3), "mask": masks(2)}, "mask: need one mask per image (3), got 2"),
    ({"images": images(2), "mask": masks(2, (1, 14, 14))}, "mask: this inpaint model takes N×1×28×28 masks, got N×1×14×14"),
    ({"images": images(2), "mask": masks(2, (3, 28, 28))}, "mask: this inpaint model takes N×1×28×28 masks, got N×3×28×28"),
    ({"images": images(2), "mask": masks(2)[:, 0]}, "mask: must be 4-d N×C×H×W, got shape (2, 28, 28) (one mask is 1×1×28×28)"),
    ({"images": images(2), "mask": masks(2) * 255}, "mask: must be integers 0 or 1 (1 where to fill in; not 0/255), "
                                                    "got dtype uint8 with values 0..255"),
    ({"images": images(2), "mask": masks(2).astype(np.float32)}, "mask: must be integers 0 or 1 (1 where to fill in; "
                                                                 "not 0/255), got dtype float32"),
    ({"images": images(2), "mask": masks(2).astype(np.int64) - 1}, "mask: must be integers 0 or 1"),
])
def test_a_mask_that_does_not_match_is_refused_naming_the_rule(request_, message):
    with pytest.raises(ValueError) as error:
        parse_request(request_, mask_schema())
    assert message in str(error.value)


def test_masks_of_integers_booleans_and_nothing_to_fill_are_accepted():
    pixels = images(2)
    for mask in (masks(2), masks(2).astype(np.int64), masks(2).astype(bool), np.zeros((2, 1, 28, 28), np.uint8)):
        parsed = parse_request({"images": pixels, "mask": mask}, mask_schema())
        assert parsed["mask"].dtype == np.uint8 and np.array_equal(parsed["mask"], mask.astype(np.uint8))
        assert np.array_equal(parsed["images"], pixels)
    nested = {"images": pixels[None].tolist(), "mask": masks(2)[None].tolist()}  # MLflow's `instances`: one instance
    assert parse_request(nested, mask_schema())["mask"].shape == (2, 1, 28, 28)


# --- a registered super-resolver ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tracking store holding a tiny srresnet and a tiny inpaint."""
    yield from registered_store(tmp_path_factory.mktemp("translate-store"), ["srresnet", "inpaint"])


def load(registered, family: str):
    import mlflow.pyfunc

    use_store(registered[0] / "home")
    return mlflow.pyfunc.load_model(f"models:/{registered[1][family]}/1")


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text)), formats=["PNG"]))


def test_a_super_resolver_answers_low_resolution_images_through_mlflow(registered):
    from components.evaluation.grid import translate_uint8
    from components.images import to_model_input, to_uint8
    from components.tracking.model_files import load_trained_model

    pyfunc = load(registered, "srresnet")
    local = load_trained_model(registered[0] / "srresnet-0")
    pixels = images(3, LOW)
    out = pyfunc.predict({"images": pixels})
    assert out.dtype == np.uint8 and out.shape == (3, *HIGH)
    assert np.array_equal(out, translate_uint8(local, torch.from_numpy(pixels)).numpy())
    # the model's own translate of the same inputs in [-1, 1]: the pyfunc converts, it does not resize
    expected = to_uint8(local.translate({"images": to_model_input(torch.from_numpy(pixels), 7, "cpu")}))
    assert np.array_equal(out, expected.numpy())
    assert not np.array_equal(out[0], out[1])  # each image its own output
    pngs = pyfunc.predict({"images": pixels, "format": "png"})
    assert np.array_equal(np.stack([decode_png(p) for p in pngs]), out[:, 0])
    (grid,) = pyfunc.predict({"images": pixels}, params={"format": "png_grid"})
    assert decode_png(grid).shape == (2 + 2 * 30, 2 + 2 * 30)  # 2 × 2 cells of 28 pixels, 2-pixel borders
    with pytest.raises(ValueError, match=r"^images: this srresnet model takes N×1×7×7 images \(the low-resolution"):
        pyfunc.predict({"images": images(1, HIGH)})


def test_the_registered_version_carries_a_translate_example_and_description(registered):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import get_model_info, validate_serving_input

    load(registered, "srresnet")
    name = registered[1]["srresnet"]
    uri = f"models:/{name}/1"
    info = get_model_info(uri)
    assert {p.name for p in info.signature.params.params} == {"format"}
    example = json.loads(Path(mlflow.artifacts.download_artifacts(f"{uri}/serving_input_example.json")).read_text())
    assert np.asarray(example["inputs"]["images"]).shape == (2, *LOW)
    answer = np.asarray(validate_serving_input(uri, example))
    assert answer.dtype == np.uint8 and answer.shape == (2, *HIGH)
    description = MlflowClient().get_model_version(name, "1").description
    assert "takes images 1×7×7 and returns images 1×28×28" in description
    assert '"images": "<uint8 N×1×7×7>"' in description and "`format`" in description


def test_an_inpainting_model_fills_in_the_masked_region_through_mlflow(registered):
    from components.evaluation.grid import translate_uint8
    from components.tracking.model_files import load_trained_model

    pyfunc = load(registered, "inpaint")
    local = load_trained_model(registered[0] / "inpaint-0")
    pixels, mask = images(2), masks(2)
    out = pyfunc.predict({"images": pixels, "mask": mask})
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    assert np.array_equal(out, translate_uint8(local, torch.from_numpy(pixels), torch.from_numpy(mask)).numpy())
    with pytest.raises(ValueError, match=r"^mask: need one mask per image \(2\), got 1"):
        pyfunc.predict({"images": pixels, "mask": mask[:1]})


# --- `genpipe translate` -----------------------------------------------------------------------------

def write_image(path, pixels: np.ndarray, **save) -> str:
    Image.fromarray(pixels).save(path, **save)
    return str(path)


def test_a_translate_champion_is_rescored_on_todays_inputs_through_its_pyfunc(registered, tmp_path):
    """Under a protocol its scores were not measured under, a translate champion is sent today's
    degraded inputs (and masks) through its registered pyfunc: scored against the same originals and
    baselines, it gets exactly the PSNR and SSIM its own evaluation would give it."""
    from fashion import fashion_subset
    from components.config import EvaluateConfig
    from components.data.pack import pack_dataset
    from components.data.sources import RawDataset, Split
    from components.evaluation.classifier import Classifier
    from components.evaluation.evaluate import evaluate_model
    from components.evaluation.protocol import degradation_protocol, evaluate_config, score_protocol
    from components.params import load_params
    from components.pipeline import rescore_registered
    from components.tracking.model_files import load_trained_model
    from components.tracking.registry import ChampionUnscorable
    from components.training.checkpoint import save_weights
    from model_configs import EVALUATE_EXTRAS

    test, test_labels = fashion_subset(6, "test")
    train, train_labels = fashion_subset(2)
    split = lambda x, y, tag: Split(x.numpy(), y.numpy(), [f"{tag}#{i}" for i in range(len(y))])  # noqa: E731
    data = load_params(Path(__file__).resolve().parents[1] / "params.yaml").data
    pack_dataset(RawDataset(classes=CLASSES, splits={"train": split(train, train_labels, "train"),
                                                     "test": split(test, test_labels, "test")}),
                 tmp_path / "dataset", data, {"name": "unit"})
    torch.manual_seed(0)
    classifier = Classifier(1, 10, 4).eval()
    (tmp_path / "classifier").mkdir()
    save_weights(classifier, tmp_path / "classifier" / "classifier.safetensors")
    (tmp_path / "classifier" / "classifier.json").write_text(json.dumps({"channels": 1, "num_classes": 10, "width": 4}))
    cfg = EvaluateConfig(metrics=["psnr", "ssim"], num_samples=50, kid_subset_size=10, nearest_k=3,
                         bootstrap={"samples": 20, "alpha": 0.1}, grid_size=4, seed=3, **EVALUATE_EXTRAS)

    use_store(registered[0] / "home")
    for family in ("srresnet", "inpaint"):
        model_dir = registered[0] / f"{family}-0"
        model = load_trained_model(model_dir)
        protocol = score_protocol(cfg, evaluator="e2", dataset_version="d2", image_size=28,
                                  degradation=degradation_protocol(model))
        own = evaluate_model(model, classifier, test, evaluate_config(protocol, ["psnr", "ssim"]), kind="translate")
        # one child process each: psnr_gain (measured by the psnr metric) and ssim are both paired scores
        metric = {"srresnet": "psnr_gain", "inpaint": "ssim"}[family]
        rescored = rescore_registered(f"models:/{registered[1][family]}/1", metric, protocol, tmp_path / "dataset",
                                      tmp_path / "classifier", model_dir)
        assert rescored == {k: own[k] for k in (metric, f"{metric}_ci_low", f"{metric}_ci_high")}, family
    # Inputs the champion cannot take (an inpainter's, with masks, sent to a super-resolver): unscorable, in its words.
    with pytest.raises(ChampionUnscorable, match=r"unknown request field\(s\) \['mask'\] for this srresnet model"):
        rescore_registered(f"models:/{registered[1]['srresnet']}/1", "psnr", protocol, tmp_path / "dataset",
                           tmp_path / "classifier", registered[0] / "inpaint-0")


def test_translate_writes_the_models_image_of_a_png_and_a_jpeg(cli, registered, tmp_path):
    pyfunc = load(registered, "srresnet")
    low = images(1, (7, 7))[0]
    for name, save in (("in.png", {}), ("in.jpg", {"quality": 95})):
        source = write_image(tmp_path / name, low, **save)
        out = tmp_path / f"{name}.out.png"
        code, stdout, err = cli("translate", "--model", "toy-srresnet", "--in", source, "--out", str(out))
        assert code == 0, err
        assert f"wrote the translation of {source} by models:/toy-srresnet/latest to {out}" in stdout
        with Image.open(out) as im:
            written = np.asarray(im)
        decoded = np.array(Image.open(source))  # a JPEG's pixels are its decoded ones, not `low`
        assert written.shape == (28, 28)
        assert np.array_equal(written, pyfunc.predict({"images": decoded[None, None]})[0, 0])


def test_translate_refuses_wrong_sizes_corrupt_files_and_masks_it_does_not_take(cli, tmp_path):
    full = write_image(tmp_path / "full.png", images(1, (28, 28))[0])
    low = write_image(tmp_path / "low.png", images(1, (7, 7))[0])
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    cut = tmp_path / "cut.png"
    cut.write_bytes((tmp_path / "low.png").read_bytes()[:60])
    out = tmp_path / "out.png"
    for args, message in [
        (["--in", full], f"--in {full}: 28x28 pixels; the model takes 7x7 images (the low-resolution inputs, 4x smaller"),
        (["--in", str(tmp_path / "noise.png")], f"--in {tmp_path / 'noise.png'}: not a decodable image"),
        (["--in", str(cut)], f"--in {cut}: truncated or corrupt"),
        (["--in", str(tmp_path / "none.png")], f"--in {tmp_path / 'none.png'}: no such file"),
        (["--in", low, "--mask", low], "--mask: this srresnet model takes no mask; leave --mask out"),
    ]:
        code, _, err = cli("translate", "--model", "toy-srresnet", *args, "--out", str(out))
        assert (code, "Traceback" in err) == (2, False), err
        assert message in err, err
        assert not out.exists()
    code, _, err = cli("translate", "--model", "toy-srresnet", "--in", low, "--out", str(tmp_path / "out.jpg"))
    assert code == 2 and "--out" in err and "written as a .png" in err
    code, _, err = cli("sample", "--model", "toy-srresnet", "--out", str(out))
    assert code == 2 and "--model toy-srresnet: a translate model, not a sampler; translate an image with " \
                         "`genpipe translate --model toy-srresnet --in in.png --out out.png`" in err


def test_translate_fills_in_where_a_mask_file_is_white(cli, registered, tmp_path):
    pyfunc = load(registered, "inpaint")
    pixels, mask = images(1, (28, 28))[0], masks(1, (28, 28))[0]
    source = write_image(tmp_path / "in.png", pixels)
    mask_file = write_image(tmp_path / "mask.png", mask * 255)  # white where to fill in
    out = tmp_path / "out.png"
    code, _, err = cli("translate", "--model", "toy-inpaint", "--in", source, "--out", str(out))
    assert code == 2 and "--mask: this inpaint model fills in a masked region: give --mask mask.png" in err
    code, _, err = cli("translate", "--model", "toy-inpaint", "--in", source, "--mask", mask_file, "--out", str(out))
    assert code == 0, err
    with Image.open(out) as im:
        written = np.asarray(im)
    assert np.array_equal(written, pyfunc.predict({"images": pixels[None, None], "mask": mask[None, None]})[0, 0])
    assert np.array_equal(written[mask == 0], pixels[mask == 0])  # the pixels outside the hole are kept
    wrong = write_image(tmp_path / "small-mask.png", np.zeros((14, 14), np.uint8))
    code, _, err = cli("translate", "--model", "toy-inpaint", "--in", source, "--mask", wrong, "--out", str(out))
    assert code == 2 and f"--mask {wrong}: 14x14 pixels; the model takes 28x28 images" in err

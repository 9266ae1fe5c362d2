"""iGPT: pixels as tokens, the KV cache matching the full forward pass, completions that keep the given
rows bit for bit, a loss going down, the nll metric and its histogram baseline, completion requests
(validation naming the field, and a registered model answering them through mlflow.pyfunc), and the
evaluation's completions picture."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_configs import model_config, model_fields
from test_requests import CLASSES, images, registered_store, use_store
from components.models import build_model
from components.tracking.requests import MAX_COUNT, RequestSchema, parse_request

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    return build_model(model_config("igpt", **overrides), 1, 10).eval()


def as_input(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1  # as to_model_input makes it


def test_tokens_are_the_8_bit_values_in_raster_order_and_back():
    model = tiny()
    u8 = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    tokens = model.to_tokens(as_input(u8))
    assert tokens.shape == (3, 784) and torch.equal(tokens, u8.flatten(1).long())
    assert torch.equal(model.to_images(tokens), as_input(u8))
    colour = build_model(model_config("igpt"), 3, 10)
    rgb = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    tokens = colour.to_tokens(as_input(rgb))  # a pixel's three channels side by side
    assert torch.equal(tokens[:, :3], rgb[:, :, 0, 0].long()) and torch.equal(tokens[:, 3:6], rgb[:, :, 0, 1].long())


def test_the_kv_cache_gives_the_logits_of_the_full_forward_pass():
    model = tiny(depth=2)
    tokens = torch.randint(0, 256, (2, 40))
    net = model.net
    full = net(net.embed(tokens[:, :-1], with_start=True))  # (2, 40, 256)
    cache = net.new_cache(2, "cpu", torch.float32)
    stepped = [net(net.embed(tokens[:, :10], with_start=True), cache)]  # the given prefix at once
    for p in range(10, 39):
        stepped.append(net(net.embed(tokens[:, p:p + 1], with_start=False), cache))
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 40


def test_completions_keep_the_given_rows_bit_for_bit_and_a_seed_repeats():
    from components.evaluation.grid import complete_uint8

    model = tiny()
    u8 = images(3, (1, 28, 28))
    u8 = torch.from_numpy(u8)
    first = complete_uint8(model, u8, rows_given=14, count=2, seed=5)
    assert first.shape == (6, 1, 28, 28) and first.dtype == torch.uint8
    assert torch.equal(first[:, :, :14], u8.repeat_interleave(2, dim=0)[:, :, :14])
    assert torch.equal(first, complete_uint8(model, u8, rows_given=14, count=2, seed=5))
    assert not torch.equal(first[:, :, 14:], complete_uint8(model, u8, rows_given=14, count=2, seed=6)[:, :, 14:])
    assert not torch.equal(first[0, :, 14:], first[1, :, 14:])  # two completions of one image differ
    with pytest.raises(ValueError, match="rows_given: must be in 0..28"):
        model.complete(as_input(u8), 29)
    assert torch.equal(model.complete(as_input(u8), 28), as_input(u8))  # all rows given: the images themselves
    with pytest.raises(ValueError, match="heads\n.*must divide dim \(8\)"):
        model_config("igpt", heads=3)


def test_the_loss_goes_down_and_the_nll_metric_reports_it_beside_the_histogram():
    from components.evaluation.metrics import METRICS, EvalContext, histogram_bits_per_dim

    torch.manual_seed(0)
    # Images whose rows repeat the first one: a model that reads the pixel above predicts them.
    rows = torch.randint(0, 256, (64, 1, 1, 28), dtype=torch.uint8)
    u8 = rows.expand(64, 1, 28, 28).contiguous()
    model = tiny(dim=32, heads=4, lr=3e-3).train()
    optimizer = model.optimizers()["igpt"]
    losses = []
    for step in range(40):
        (_, out), = model.training_losses(as_input(u8[step % 4 * 16:][:16]), None)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.logs["bits_per_dim"].item())
    assert losses[0] > 7.5 and sum(losses[-5:]) / 5 < losses[0] - 1.2, losses  # 8.0 → 6.4 measured

    ctx = EvalContext(model=model, classifier=None, real=as_input(u8[:8]), fake=as_input(u8[:8]), kid_subset_size=2,
                      train_u8=u8)
    scores = METRICS.get("nll")(ctx)
    nats = model.nats_per_image(as_input(u8[:8])).mean().item()
    assert scores["nll_bits_per_dim"] == pytest.approx(nats / (784 * math.log(2)), rel=1e-4)
    # the histogram counts 64 images per pixel over 256 values (+1 each): a value seen k times has p = (k+1)/320
    counts = torch.stack([torch.bincount(u8.flatten(1)[:, d].long(), minlength=256) for d in range(784)])  # (784, 256)
    p = (counts.double() + 1) / (64 + 256)
    expected = -p.gather(1, u8[:8].flatten(1).long().t()).log().mean() / math.log(2)
    assert histogram_bits_per_dim(u8, as_input(u8[:8])) == pytest.approx(float(expected), rel=1e-9)
    assert METRICS.get("nll")(EvalContext(model=None, classifier=None, real=ctx.real, fake=ctx.real,
                                          kid_subset_size=2)) == {}  # stored samples: no model, no likelihood


# --- requests --------------------------------------------------------------------------------------

def schema() -> RequestSchema:
    return RequestSchema.of({"family": "igpt", "channels": 1, "num_classes": 10, "classes": CLASSES,
                             "config": model_fields("igpt")})


def test_a_completion_request_is_parsed_and_a_sampling_request_is_unchanged():
    s = schema()
    assert s.kind == "generate" and s.fields == ("count", "seed", "format", "images", "rows_given")
    parsed = parse_request({"images": images(2, (1, 28, 28)).astype(np.int64), "rows_given": 14, "count": 3}, s)
    assert (parsed["rows_given"], parsed["count"], parsed["seed"]) == (14, 3, 0)
    assert parsed["images"].dtype == np.uint8 and parsed["images"].shape == (2, 1, 28, 28)
    assert parse_request({"images": images(1, (1, 28, 28))}, s, {"rows_given": 7, "seed": 4})["seed"] == 4
    assert parse_request({"count": 5}, s) == {"count": 5, "seed": 0, "format": "uint8"}


@pytest.mark.parametrize("request_, message", [
    ({"images": images(2, (1, 28, 28))}, "rows_given: missing; to complete images send both images"),
    ({"rows_given": 14}, "images: missing; to complete images send both images (uint8 N×1×28×28)"),
    ({"images": images(2, (1, 28, 28)), "rows_given": 0}, "rows_given: must be an integer in 1..27"),
    ({"images": images(2, (1, 28, 28)), "rows_given": 28}, "rows_given: must be an integer in 1..27"),
    ({"images": images(2, (1, 28, 28)), "rows_given": 2.5}, "rows_given: must be an integer in 1..27"),
    ({"images": images(2, (1, 14, 14)), "rows_given": 7}, "images: this igpt model takes N×1×28×28 images"),
    ({"images": images(2, (1, 28, 28)), "rows_given": 14, "count": MAX_COUNT},
     f"count: completions per image, an integer in 1..{MAX_COUNT // 2} (at most {MAX_COUNT} images per answer, "
     f"and 2 were sent)"),
    ({"images": images(2, (1, 28, 28)), "rows_given": 14, "seed": -1}, "seed: must be an integer >= 0"),
    ({"images": images(2, (1, 28, 28)), "rows_given": 14, "labels": [0, 1]}, "labels: this igpt model does not take"),
])
def test_a_bad_completion_request_names_its_field(request_, message):
    with pytest.raises(ValueError) as caught:
        parse_request(request_, schema())
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    yield from registered_store(tmp_path_factory.mktemp("igpt-store"), ["igpt"])


def test_a_registered_igpt_completes_images_and_samples_through_mlflow(registered):
    import mlflow.pyfunc

    from components.evaluation.grid import complete_uint8
    from components.tracking.model_files import load_trained_model
    from components.tracking.pyfunc_model import InvalidRequest

    root, names = registered
    use_store(root / "home")
    pyfunc = mlflow.pyfunc.load_model(f"models:/{names['igpt']}/1")
    sent = images(2, (1, 28, 28))
    answer = pyfunc.predict({"images": sent, "rows_given": 10, "count": 2, "seed": 3})
    assert answer.shape == (4, 1, 28, 28) and answer.dtype == np.uint8
    assert np.array_equal(answer[:, :, :10], np.repeat(sent, 2, axis=0)[:, :, :10])
    local = load_trained_model(root / "igpt-0")
    assert np.array_equal(answer, complete_uint8(local, torch.from_numpy(sent), 10, 2, 3).numpy())
    assert pyfunc.predict({"count": 3, "seed": 1}).shape == (3, 1, 28, 28)
    with pytest.raises(InvalidRequest, match="rows_given: must be an integer in 1..27"):
        pyfunc.predict({"images": sent}, params={"rows_given": 40})


def test_the_evaluation_draws_completions_of_held_out_images(tmp_path):
    from PIL import Image

    from components.evaluation.pictures import COMPLETIONS, write_pictures

    model = tiny()
    u8 = torch.from_numpy(images(20, (1, 28, 28)))
    labels = torch.arange(20) % 10
    written = write_pictures(model, u8, labels, CLASSES, tmp_path, seed=0)
    assert [p.name for p in written] == ["completions.png"]  # no latent: no traversal, no latent-space scatter
    width, height = Image.open(written[0]).size
    assert (width, height) == (2 + (COMPLETIONS + 2) * 30, 2 + 8 * 30)  # 8 rows of given, completions, original


def test_the_reports_strip_of_a_pixel_model_is_completions_of_held_out_images():
    from components.reporting.pictures import interpolation_strip

    model = tiny()
    reference = torch.from_numpy(images(12, (1, 28, 28)))
    strip = interpolation_strip(model, "generate", reference, rows=4, steps=10, seed=2)
    assert strip.shape == (40, 1, 28, 28)
    rows = strip.view(4, 10, 1, 28, 28)
    for row in rows:  # given half (bottom grey), 8 completions, the original: all share the top half
        assert torch.equal(row[0, :, 14:], torch.full((1, 14, 28), 128, dtype=torch.uint8))
        assert all(torch.equal(image[:, :14], row[-1, :, :14]) for image in row)
        assert any(row[-1].view(-1).tolist() == r.view(-1).tolist() for r in reference)

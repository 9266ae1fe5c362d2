"""The inpaint family (context encoder): shapes, the three mask kinds drawn reproducibly from a seed,
known pixels kept exactly, a loss going down on a fixed batch, stitching two images, the baselines,
and config errors."""
from __future__ import annotations

import pytest
import torch

from model_configs import model_config, model_fields
from components.images import to_model_input
from components.models import FAMILIES, build_model
from components.models.inpaint import mean_fill, nearest_fill
from components.tracking.model_files import load_trained_model, save_trained_model
from components.training.trainer import Trainer
from test_trainer import structured_images

pytestmark = pytest.mark.usefixtures("one_thread")

ONLY = {"boxes": (1.0, 0.0, 0.0), "strokes": (0.0, 1.0, 0.0), "band": (0.0, 0.0, 1.0)}


def masks_fields(weights=(1.0, 1.0, 1.0), two_images: float = 0.5) -> dict:
    masks = model_fields("inpaint")["masks"]
    boxes, strokes, band = ({**masks[k], "weight": w} for k, w in zip(("boxes", "strokes", "band"), weights))
    return {"boxes": boxes, "strokes": strokes, "band": {**band, "two_images": two_images}}


def make(size: int = 28, channels: int = 1, **overrides):
    return build_model(model_config("inpaint", image_size=size, **overrides), channels, 10)


def images_in(n: int, channels: int = 1, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def draw(kind: str, n: int = 32, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model_config("inpaint", image_size=size, masks=masks_fields(ONLY[kind]))
    return cfg.masks.draw(n, size, torch.Generator().manual_seed(seed))


def bounding_box(hole: torch.Tensor) -> torch.Tensor:
    """The smallest rectangle holding a hole (H, W) bool."""
    rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
    box = torch.zeros_like(hole)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    return box


# --- declarations and shapes ----------------------------------------------------------------------

def test_family_declares_a_translate_kind_that_takes_a_mask():
    family = FAMILIES.get("inpaint")
    assert family.kind == "translate" and family.takes_mask
    assert family.input_shape(model_config("inpaint", image_size=64), 3) == (3, 64, 64)
    model = make()
    assert model.ema_modules == ("generator",) and set(model.optimizers()) == {"discriminator", "generator"}
    with pytest.raises(TypeError, match="translates images"):
        model.sample(2)


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_degrade_translate_and_baselines_shapes(size, channels):
    model = make(size, channels).eval()
    x = images_in(4, channels, size)
    inputs = model.degrade(x, torch.Generator().manual_seed(0))
    assert inputs["images"].shape == x.shape and inputs["mask"].shape == (4, 1, size, size)
    assert set(inputs["mask"].unique().tolist()) <= {0.0, 1.0} and inputs["mask"].flatten(1).amax(1).eq(1).all()
    hole = inputs["mask"].bool().expand_as(x)
    assert inputs["images"][hole].eq(0).all()  # the hole is mid grey
    assert torch.equal(inputs["images"][~hole], x[~hole])
    out = model.translate(inputs)
    assert out.shape == x.shape and out.abs().max() <= 1
    assert {k: v.shape for k, v in model.baselines(inputs).items()} == {"mean_fill": x.shape, "nearest_fill": x.shape}
    phases = [(phase, out.loss) for phase, out in model.train().training_losses(x, None, torch.Generator())]
    assert [p for p, _ in phases] == ["discriminator", "generator"]
    assert all(loss.ndim == 0 and torch.isfinite(loss) for _, loss in phases)


# --- masks ----------------------------------------------------------------------------------------

def test_masks_are_reproducible_from_a_seed():
    model = make()
    x = images_in(16)
    first, again = (model.degrade(x, torch.Generator().manual_seed(7))["mask"] for _ in range(2))
    other = model.degrade(x, torch.Generator().manual_seed(8))["mask"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    losses = [[out.loss.item() for _, out in model.train().training_losses(x, None, torch.Generator().manual_seed(3))]
              for _ in range(2)]
    assert losses[0] == losses[1]  # every draw of the training loss from the generator


def test_box_masks_are_rectangles_within_the_size_range():
    hole, far = draw("boxes", size=64)
    low, high = model_fields("inpaint")["masks"]["boxes"]["size"]
    for h in hole[:, 0]:
        assert torch.equal(h, bounding_box(h))
        rows, cols = int(h.any(1).sum()), int(h.any(0).sum())
        assert round(low * 64) <= min(rows, cols) and max(rows, cols) <= round(high * 64)
    assert not far.any()
    assert len({tuple(h.nonzero()[0].tolist()) for h in hole[:, 0]}) > 20  # placed all over


def test_stroke_masks_are_thick_free_form_lines():
    hole, far = draw("strokes", n=300)  # more than one chunk of the rasterisation
    assert hole.flatten(1).any(1).all() and not far.any()
    assert not hole.flatten(1).all(1).any()
    not_boxes = sum(not torch.equal(h, bounding_box(h)) for h in hole[:, 0])
    assert not_boxes >= 0.85 * 300  # free-form, not rectangles
    thin = torch.nn.functional.max_pool2d(-(~hole).float(), 3, 1, 1)  # eroded by a 3×3 square: thick strokes survive
    assert (-thin).flatten(1).any(1).float().mean() > 0.5


def test_band_masks_are_centred_vertical_or_horizontal_bands_between_two_halves():
    hole, far = draw("band")
    orientations = set()
    for h, f in zip(hole[:, 0], far[:, 0]):
        vertical = bool(h.all(0).any())  # a vertical band holds whole columns
        orientations.add(vertical)
        line = h[0] if vertical else h[:, 0]  # across the band
        assert torch.equal(h, line[None, :].expand_as(h) if vertical else line[:, None].expand_as(h))
        index = line.nonzero().flatten()
        assert index.max() - index.min() + 1 == len(index)  # one contiguous band
        assert index.min() <= 13 and index.max() >= 13 and abs((index.min() + index.max()) / 2 - 13.5) <= 1
        across = torch.arange(28)[None, :] if vertical else torch.arange(28)[:, None]
        assert torch.equal(f, (across >= 14).expand_as(f))  # the far half
    assert orientations == {True, False}


def test_the_mix_follows_the_kinds_weights():
    cfg = model_config("inpaint", masks=masks_fields((1.0, 0.0, 3.0)))
    hole, _ = cfg.masks.draw(400, 28, torch.Generator().manual_seed(0))
    band = torch.tensor([bool(h.all(0).any() or h.all(1).any()) for h in hole[:, 0]])  # boxes span at most half
    boxes = torch.tensor([torch.equal(h, bounding_box(h)) for h in hole[:, 0]]) & ~band
    assert boxes.sum() + band.sum() == 400
    assert 0.65 < band.float().mean() < 0.85  # 3 : 1


# --- the model ------------------------------------------------------------------------------------

def test_translate_keeps_every_known_pixel_exactly_and_ignores_what_the_hole_held():
    model = make(width=8).eval()
    x = images_in(16)
    inputs = model.degrade(x, torch.Generator().manual_seed(0))
    out = model.translate(inputs)
    known = inputs["mask"].expand_as(x) == 0
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known])
    # a request sends a uint8 mask and may leave the original pixels in the hole: the same answer
    request = {"images": x, "mask": inputs["mask"].to(torch.uint8)}
    assert torch.equal(model.translate(request), out)
    with pytest.raises(ValueError, match=r"mask: expected shape \(16, 1, 28, 28\)"):
        model.translate({"images": x, "mask": inputs["mask"][:, :, :14]})


def rec_loss(model, x: torch.Tensor) -> float:
    """The generator's reconstruction loss on x with fixed masks, leaving weights and buffers as they were."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        phases = dict(model.train().training_losses(x, None, torch.Generator().manual_seed(99)))
    model.load_state_dict(state)
    return phases["generator"].logs["loss_rec"].item()


def test_reconstruction_loss_goes_down_on_a_fixed_batch():
    model = make(width=8, ndf=4, lr=3e-3)
    x = to_model_input(structured_images(16)[0], 28, "cpu")
    optimizers = model.optimizers()
    before = rec_loss(model, x)
    for step in range(40):
        for phase, out in model.train().training_losses(x, None, torch.Generator().manual_seed(step % 4)):
            optimizers[phase].zero_grad()
            out.loss.backward()
            optimizers[phase].step()
    assert rec_loss(model, x) < 0.5 * before


def test_stitched_images_get_the_adversarial_loss_only():
    x = images_in(8)
    losses = {}
    for two_images in (0.0, 1.0):
        model = make(masks=masks_fields(ONLY["band"], two_images=two_images))
        phases = dict(model.train().training_losses(x, None, torch.Generator().manual_seed(0)))
        losses[two_images] = phases["generator"].logs
    assert losses[0.0]["loss_rec"] > 0 and losses[1.0]["loss_rec"] == 0  # a band between two images has no truth
    assert losses[1.0]["loss_adv"] > 0


def test_trains_with_the_trainer_and_beats_mean_fill_on_held_out_shapes():
    images, labels = structured_images(256)
    model = make(width=8, ndf=4, epochs=4, batch_size=16, lr=3e-3, ema_decay=0.9)
    Trainer(model, model.cfg, progress=False).fit(images[:192], labels[:192])
    x = to_model_input(images[192:], 28, "cpu")
    inputs = model.degrade(x, torch.Generator().manual_seed(5))
    hole = inputs["mask"]

    def hole_mse(out):
        return float(((out - x) ** 2 * hole).sum() / hole.sum())

    baselines = model.baselines(inputs)
    assert hole_mse(model.translate(inputs)) < 0.5 * hole_mse(baselines["mean_fill"])


def test_round_trips_through_the_model_files(tmp_path):
    model = make().eval()
    spec = {"family": "inpaint", "config": model.cfg.model_dump(mode="json"), "channels": 1, "num_classes": 10,
            "classes": [f"class {i}" for i in range(10)]}
    save_trained_model(model, spec, tmp_path)
    loaded = load_trained_model(tmp_path)
    assert loaded.cfg == model.cfg  # the nested mask settings too
    inputs = model.degrade(images_in(4), torch.Generator().manual_seed(2))
    assert torch.equal(loaded.degrade(images_in(4), torch.Generator().manual_seed(2))["mask"], inputs["mask"])
    assert torch.equal(loaded.translate(inputs), model.translate(inputs))


# --- baselines ------------------------------------------------------------------------------------

def test_mean_fill_fills_the_hole_with_the_known_pixels_mean_per_image_and_channel():
    x = images_in(4, channels=3)
    hole = draw("boxes", n=4)[0]
    out = mean_fill(x, hole)
    known = ~hole.expand_as(x)
    assert torch.equal(out[known], x[known])
    for i in range(4):
        for c in range(3):
            expected = x[i, c][~hole[i, 0]].mean()
            assert torch.allclose(out[i, c][hole[i, 0]], expected.expand(int(hole[i].sum())), atol=1e-6)


def test_nearest_fill_copies_the_nearest_known_pixel():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, :, :4] = -1.0
    x[:, :, :, 4:] = 0.5
    hole = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    hole[0, 0, :, 2:6] = True  # a vertical band: each side copies its own half
    hole[1] = True  # nothing known: mid grey
    out = nearest_fill(x, hole)
    assert out[0, 0, :, :4].eq(-1).all() and out[0, 0, :, 4:].eq(0.5).all()
    assert out[1].eq(0).all()
    y = images_in(6)
    hole = draw("strokes", n=6)[0]
    filled = nearest_fill(y, hole)
    known = ~hole.expand_as(y)
    assert torch.equal(filled[known], y[known])
    assert torch.isin(filled[~known], y[known]).all()  # every filled value is a known pixel's


# --- config errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"boxes": {"size": [0.5, 0.25]}}, r"masks\.boxes.*size: \[low, high\] with low <= high"),
    ({"strokes": {"width": [0.0, 0.2]}}, r"masks\.strokes\.width\.0.*greater than 0"),
    ({"band": {"two_images": 1.5}}, r"masks\.band\.two_images.*less than or equal to 1"),
    ({"boxes": {"weight": 0.0}, "strokes": {"weight": 0.0}, "band": {"weight": 0.0}},
     r"masks.*all 0: give at least one kind a positive weight"),
])
def test_bad_mask_settings_name_the_field(change, message):
    masks = masks_fields()
    for kind, fields in change.items():
        masks[kind] = {**masks[kind], **fields}
    with pytest.raises(ValueError, match=f"(?s){message}"):
        model_config("inpaint", masks=masks)


def test_config_has_no_defaults_and_refuses_unknown_keys():
    fields = model_fields("inpaint")
    fields["masks"] = {**fields["masks"], "band": {**fields["masks"]["band"]}}
    del fields["masks"]["band"]["two_images"]
    with pytest.raises(ValueError, match=r"masks\.band\.two_images"):
        FAMILIES.get("inpaint").config.model_validate(fields)
    with pytest.raises(ValueError, match=r"masks\.ellipses"):
        FAMILIES.get("inpaint").config.model_validate(
            {**model_fields("inpaint"), "masks": {**masks_fields(), "ellipses": {"weight": 1.0}}})

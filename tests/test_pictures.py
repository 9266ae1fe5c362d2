"""Latent traversals and latent-space pictures: which models get which, valid PNGs of the expected
size, and a traversal that really moves one latent dimension at a time."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from model_configs import model_config
from components.evaluation.pictures import (TRAVERSAL_SEEDS, TRAVERSAL_STEPS, project_2d, traversal,
                                            traversal_codes, used_dimensions, write_pictures)
from components.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["bar", "column", "square"]


def make(family: str, channels: int = 1, **overrides):
    return build_model(model_config(family, **overrides), channels, len(CLASSES), CLASSES).eval()


def held_out(n: int = 60, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, channels, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def grid_size(rows: int, cols: int, tile: int = 28, pad: int = 2) -> tuple[int, int]:
    """(width, height) of a torchvision make_grid PNG."""
    return cols * (tile + pad) + pad, rows * (tile + pad) + pad


def png(path) -> Image.Image:
    with Image.open(path) as image:
        image.verify()  # a complete, uncorrupted PNG
    image = Image.open(path)
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("family, channels, expected", [
    ("vae", 1, ["latent-space.png", "traversal-seed7.png", "traversal-seed8.png", "traversal-seed9.png"]),
    ("cvae", 3, ["latent-space.png", "traversal-seed7-class0.png", "traversal-seed8-class1.png",
                 "traversal-seed9-class2.png"]),
    ("ae", 1, ["latent-space.png"]),  # no prior, so no traversal
    ("dcgan", 1, []),                 # neither a prior decoder nor an encoder: an empty folder
])
def test_each_model_gets_the_pictures_it_supports(tmp_path, family, channels, expected):
    model = make(family, channels)
    images, labels = held_out(channels=channels)
    out = tmp_path / "pictures"
    written = write_pictures(model, images, labels, CLASSES, out, seed=7)
    assert out.is_dir()
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir()) == expected  # no temp files left
    for path in written:
        image = png(path)
        if path.name.startswith("traversal"):
            rows = min(10, model.latent_dim)  # tiny configs: latent_dim 4
            assert image.size == grid_size(rows, TRAVERSAL_STEPS)
            assert image.mode == ("L" if channels == 1 else "RGB")
        else:
            assert image.size == (700, 600)
            assert len(set(image.convert("RGB").getdata())) > 10  # points, axes and legend, not a blank page


def test_write_pictures_replaces_an_earlier_picture(tmp_path):
    images, labels = held_out()
    out = tmp_path / "pictures"
    write_pictures(make("vae"), images, labels, CLASSES, out, seed=0)
    first = (out / "traversal-seed0.png").read_bytes()
    write_pictures(make("vae", seed=1), images, labels, CLASSES, out, seed=0)  # other weights
    assert (out / "traversal-seed0.png").read_bytes() != first
    assert len(list(out.iterdir())) == 1 + TRAVERSAL_SEEDS


def test_traversal_codes_move_one_dimension_by_minus_to_plus_three_sigma():
    z0 = torch.tensor([0.5, -1.0, 2.0, 0.0])
    codes = traversal_codes(z0, [1, 3], steps=5).view(2, 5, 4)
    assert torch.allclose(codes[0, :, 1], -1.0 + torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0]))
    assert torch.allclose(codes[1, :, 3], torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0]))
    untouched = torch.ones(2, 5, 4, dtype=torch.bool)
    untouched[0, :, 1] = untouched[1, :, 3] = False
    assert torch.equal(codes[untouched], z0.expand(2, 5, 4)[untouched])
    assert torch.equal(codes[:, 2], z0.expand(2, 4))  # the centre column is the seed's own code


@pytest.mark.parametrize("family", ["vae", "cvae"])
def test_traversal_images_vary_along_rows_and_agree_at_the_centre(family):
    model = make(family, latent_dim=6)
    label = 2 if model.conditional else None
    images = traversal(model, [0, 2, 5], seed=3, label=label).view(3, TRAVERSAL_STEPS, 1, 28, 28)
    centre = images[:, TRAVERSAL_STEPS // 2]
    assert torch.allclose(centre, centre[0].expand_as(centre), atol=1e-6)  # every row passes through z0
    for row in images:  # along a row the decoded images change step by step
        assert all((row[j] - row[j + 1]).abs().max() > 1e-4 for j in range(TRAVERSAL_STEPS - 1))
    z0 = model.noise(1, torch.Generator().manual_seed(3))
    expected = model.decode(z0, torch.tensor([2])) if model.conditional else model.decode(z0)
    assert torch.allclose(centre[0], expected[0], atol=1e-6)  # seeded draw, and for the cvae at its class


def test_traversal_rows_are_the_dimensions_the_encoder_uses():
    model = make("vae", latent_dim=12)
    head = model.encoder[-1]  # Linear → (mean, log-variance) of the 12 dimensions
    with torch.no_grad():
        for d in (0, 5):  # posterior = prior for these: KL 0, an unused dimension
            head.weight[[d, 12 + d]] = 0
            head.bias[[d, 12 + d]] = 0
    images, labels = held_out()
    assert used_dimensions(model, images, labels, 10) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert used_dimensions(model, images[:0], labels[:0], 10) == list(range(10))  # no data: the first ones


def test_project_2d_keeps_the_directions_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(500, 1, generator=g)
    codes = torch.cat([3 * t, 0.01 * torch.randn(500, 2, generator=g), -3 * t], dim=1)  # a line in 4-D
    xy = project_2d(codes)
    assert xy.shape == (500, 2)
    assert xy[:, 0].std() > 4 and xy[:, 1].std() < 0.05
    assert torch.allclose(xy[:, 0].abs(), (t.squeeze(1) - t.mean()).abs() * 18 ** 0.5, atol=0.05)
    assert torch.equal(project_2d(torch.randn(7, 1))[:, 1], torch.zeros(7))  # a 1-D latent: second axis 0

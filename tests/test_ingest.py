"""Ingestion: sources, image validation, packing round trip, atomic replacement."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from components.config import DataConfig
from components.data import pack as pack_module
from components.data import validate as validate_module
from components.data.ingest import ingest
from components.data.pack import dataset_version, load_split, pack_dataset, read_items, read_manifest, read_rejected
from components.data.sources import DataError, RawDataset, Split
from components.data.validate import ImageRejected, load_image

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def data_cfg(path, **overrides) -> DataConfig:
    fields = {
        "name": "test-data",
        "source": "image-folder",
        "path": str(path),
        "image_size": 16,
        "channels": 1,
        "resize": False,
        "test_fraction": 0.3,
        "limit_per_split": None,
        "max_pixels": 10_000,
        "max_file_bytes": 10_000_000,
        "shard_size": 4,
        "follow_symlinks": False,
        "archive": {"max_members": 1000, "max_bytes": 10_000_000},
    }
    return DataConfig.model_validate({**fields, **overrides})


def noise(seed: int, size=(16, 16), mode="L") -> Image.Image:
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


BAD_FILES = {
    "cats/not-image.png": "not a decodable image",
    "cats/truncated.png": "truncated or corrupt",
    "dogs/bomb.png": "decompression bomb: 300x300 = 90000 pixels > data.max_pixels 10000",
    "dogs/wide.png": "size 20x16, expected 16x16 (set data.resize: true to resize)",
    "dogs/notes.txt": "unsupported extension '.txt'",
    "stray.png": "not inside a class folder",
}


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            noise(100 * c + i).save(root / name / f"{i}.png")
        noise(100 * c + 50).save(root / name / "j.JPG", quality=95)
    (root / "cats/not-image.png").write_text("hello, not a png")
    data = png_bytes(noise(7))
    (root / "cats/truncated.png").write_bytes(data[: len(data) // 2])
    noise(8, (300, 300)).save(root / "dogs/bomb.png")
    noise(9, (20, 16)).save(root / "dogs/wide.png")
    (root / "dogs/notes.txt").write_text("notes")
    noise(10).save(root / "stray.png")
    return root


def test_image_folder_rejects_each_bad_kind_and_packs_the_rest(folder, tmp_path):
    out = tmp_path / "packed"
    lines: list[str] = []
    summary = ingest(data_cfg(folder), out, log=lines.append)
    manifest = read_manifest(out)

    reasons = {r["origin"]: r["reason"] for r in read_rejected(out)}
    assert set(reasons) == set(BAD_FILES)
    for origin, expected in BAD_FILES.items():
        assert reasons[origin].startswith(expected), (origin, reasons[origin])

    packed = sorted(item["origin"] for item in read_items(out))
    valid = [f"{c}/{i}.png" for c in ("cats", "dogs") for i in range(5)] + ["cats/j.JPG", "dogs/j.JPG"]
    assert packed == sorted(valid)
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["image_shape"] == [1, 16, 16]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["items_train"] + summary["items_test"] == 12
    assert summary["rejected"] == len(BAD_FILES) and summary["num_classes"] == 2
    assert any("6 left out" in line for line in lines) and any("rejected.jsonl" in line for line in lines)

    # the split is a pure function of file content: a second run packs the same bytes
    ingest(data_cfg(folder), tmp_path / "again", log=lambda _: None)
    assert (tmp_path / "again/manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_pack_round_trip_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 10).astype(np.int64)
    raw = RawDataset(
        classes=["a", "b", "c"],
        splits={
            "train": Split(images, labels, [f"x#{i}" for i in range(10)]),
            "test": Split(images[:3], labels[:3], [f"y#{i}" for i in range(3)]),
        },
        rejected=[{"origin": "bad.png", "reason": "broken"}],
    )
    cfg = data_cfg(tmp_path, image_size=8, channels=3, shard_size=4)
    summary = pack_dataset(raw, tmp_path / "ds", cfg, {"name": "unit"})
    assert summary == {"items_train": 10, "items_test": 3, "rejected": 1, "num_classes": 3}

    manifest = read_manifest(tmp_path / "ds")
    assert manifest["splits"]["train"]["shards"] == ["train-000.npz", "train-001.npz", "train-002.npz"]
    counts = {c: int((labels == i).sum()) for i, c in enumerate("abc")}
    assert manifest["splits"]["train"]["class_counts"] == counts
    assert manifest["config"]["shard_size"] == 4
    with np.load(tmp_path / "ds/train-002.npz", allow_pickle=False) as shard:
        assert shard["images"].shape == (2, 3, 8, 8) and shard["labels"].dtype == np.int64

    x, y = load_split(tmp_path / "ds", "train")
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (10, 3, 8, 8)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    for item in read_items(tmp_path / "ds"):
        with np.load(tmp_path / "ds" / item["shard"], allow_pickle=False) as shard:
            assert hashlib.sha256(shard["images"][item["index"]].tobytes()).hexdigest() == item["sha256"]

    with pytest.raises(DataError, match="train, test"):
        load_split(tmp_path / "ds", "validation")
    with pytest.raises(DataError, match="genpipe ingest"):
        load_split(tmp_path / "nothing", "train")


def test_failed_ingest_leaves_existing_dataset_untouched(folder, tmp_path, monkeypatch):
    out = tmp_path / "packed"
    ingest(data_cfg(folder), out, log=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(DataError, match="not found"):
        ingest(data_cfg(tmp_path / "missing"), out, log=lambda _: None)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pack_module.np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        ingest(data_cfg(folder), out, log=lambda _: None)

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "packed"]  # no temp folders left


def test_empty_train_split_is_refused(tmp_path):
    (tmp_path / "only/a").mkdir(parents=True)
    (tmp_path / "only/a/x.png").write_text("nope")
    with pytest.raises(DataError, match="no valid training images.*1 left out"):
        ingest(data_cfg(tmp_path / "only"), tmp_path / "out", log=lambda _: None)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ingest(data_cfg(tmp_path / "flat"), tmp_path / "out", log=lambda _: None)


def test_alpha_and_palette_become_grayscale(tmp_path):
    cfg = data_cfg(tmp_path, image_size=8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, :, 3] = 255  # opaque row keeps its value
    rgba[1, :, 3] = 0  # transparent row becomes black
    rgba[2:, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png", cfg)
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    assert (out[0, 0] == 200).all() and (out[0, 1] == 0).all()
    assert np.abs(out[0, 2:].astype(int) - 100).max() <= 1

    pal = Image.fromarray(np.array([[0, 1, 2, 3] * 2] * 8, np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255, 90, 90, 90, 30, 60, 90] + [0] * (252 * 3))
    pal.save(tmp_path / "pal.png", transparency=2)  # entry 2 transparent → black
    out = load_image(tmp_path / "pal.png", cfg)
    gray = round(30 * 0.299 + 60 * 0.587 + 90 * 0.114)
    assert np.abs(out[0].astype(int) - [[0, 255, 0, gray] * 2] * 8).max() <= 1

    rgb = load_image(tmp_path / "rgba.png", data_cfg(tmp_path, image_size=8, channels=3))
    assert rgb.shape == (3, 8, 8) and (rgb[:, 0] == 200).all()


def test_resize_scales_shorter_side_and_centre_crops(tmp_path):
    noise(1, (40, 20)).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", data_cfg(tmp_path, resize=True))
    assert out.shape == (1, 16, 16)
    with pytest.raises(ImageRejected, match="set data.resize: true"):
        load_image(tmp_path / "wide.png", data_cfg(tmp_path))


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def fake_fashion(root: Path, gz: bool = True, sizes=(("train", 7), ("t10k", 3))) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in sizes:
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), 2049, gz)
    return root


def fmnist_cfg(path, **overrides) -> DataConfig:
    return data_cfg(path, **{"source": "fashion-mnist", "image_size": 28, "limit_per_split": 5, **overrides})


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_synthetic(tmp_path, gz):
    root = fake_fashion(tmp_path / "fm", gz=gz)
    summary = ingest(fmnist_cfg(root), tmp_path / "out", log=lambda _: None)
    assert summary == {"items_train": 5, "items_test": 3, "rejected": 0, "num_classes": 10}
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape == (5, 1, 28, 28) and y.dtype == torch.int64
    manifest = read_manifest(tmp_path / "out")
    assert manifest["classes"][0] == "T-shirt/top" and manifest["classes"][9] == "Ankle boot"
    assert read_items(tmp_path / "out")[1]["origin"] == "train-images-idx3-ubyte#1"  # same with or without .gz


def test_fashion_mnist_resize_and_channels(tmp_path):
    root = fake_fashion(tmp_path / "fm")
    raw_cfg = fmnist_cfg(root, image_size=32, channels=3, resize=True)
    ingest(raw_cfg, tmp_path / "out", log=lambda _: None)
    x, _ = load_split(tmp_path / "out", "test")
    assert x.shape == (3, 3, 32, 32) and (x[:, 0] == x[:, 2]).all()
    with pytest.raises(DataError, match="set data.resize: true"):
        ingest(fmnist_cfg(root, image_size=32), tmp_path / "out2", log=lambda _: None)


def test_fashion_mnist_corrupt_or_missing(tmp_path):
    root = fake_fashion(tmp_path / "fm")
    bad = root / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress((1234).to_bytes(4, "big") + bytes(100)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: magic number 1234, expected 2051"):
        ingest(fmnist_cfg(root), tmp_path / "out", log=lambda _: None)

    write_idx(root / "train-images-idx3-ubyte", np.zeros((6, 28, 28)), 2051)  # 6 images, 7 labels
    with pytest.raises(DataError, match="6 images but .* 7 labels"):
        ingest(fmnist_cfg(root), tmp_path / "out", log=lambda _: None)

    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        ingest(fmnist_cfg(tmp_path / "nowhere"), tmp_path / "out", log=lambda _: None)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(root / "train-images-idx3-ubyte", np.zeros((7, 28, 28)), 2051)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: not found.*dataset-fashion-mnist"):
        ingest(fmnist_cfg(root), tmp_path / "out", log=lambda _: None)


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files(tmp_path):
    summary = ingest(fmnist_cfg(REAL_FMNIST, limit_per_split=100), tmp_path / "out", log=lambda _: None)
    assert summary == {"items_train": 100, "items_test": 100, "rejected": 0, "num_classes": 10}
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape == (100, 1, 28, 28) and 0 <= int(y.min()) and int(y.max()) <= 9 and x.float().mean() > 10


def packed_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_dataset_version_ignores_where_the_data_lies_and_sharding(folder, tmp_path):
    # issue 5 item 9: the same images copied elsewhere pack to the same bytes and version
    moved = tmp_path / "elsewhere/deeper/images"
    shutil.copytree(folder, moved)
    ingest(data_cfg(folder), tmp_path / "a", log=lambda _: None)
    ingest(data_cfg(moved), tmp_path / "b", log=lambda _: None)
    assert packed_files(tmp_path / "a") == packed_files(tmp_path / "b")
    version = dataset_version(tmp_path / "a")
    assert len(version) == 16 and read_manifest(tmp_path / "a")["dataset_version"] == version
    assert str(tmp_path) not in (tmp_path / "a/manifest.json").read_text()

    ingest(data_cfg(moved, shard_size=2), tmp_path / "c", log=lambda _: None)
    assert read_manifest(tmp_path / "c")["splits"]["train"]["shards"] != read_manifest(tmp_path / "a")[
        "splits"]["train"]["shards"]
    assert dataset_version(tmp_path / "c") == version


def test_dataset_version_changes_with_one_pixel_or_label(folder, tmp_path):
    ingest(data_cfg(folder), tmp_path / "base", log=lambda _: None)
    base = dataset_version(tmp_path / "base")

    pixel = tmp_path / "pixel"
    shutil.copytree(folder, pixel)
    img = np.asarray(Image.open(pixel / "cats/0.png")).copy()
    img[3, 3] ^= 1
    Image.fromarray(img).save(pixel / "cats/0.png")
    ingest(data_cfg(pixel), tmp_path / "p", log=lambda _: None)
    assert dataset_version(tmp_path / "p") != base

    label = tmp_path / "label"
    shutil.copytree(folder, label)
    (label / "cats/0.png").rename(label / "dogs/0-was-cat.png")
    ingest(data_cfg(label), tmp_path / "l", log=lambda _: None)
    assert dataset_version(tmp_path / "l") != base


def test_dataset_version_of_fashion_mnist_copies(tmp_path):
    gz = fake_fashion(tmp_path / "one", gz=True)
    plain = fake_fashion(tmp_path / "two/fm", gz=False)
    ingest(fmnist_cfg(gz), tmp_path / "a", log=lambda _: None)
    ingest(fmnist_cfg(plain), tmp_path / "b", log=lambda _: None)
    assert packed_files(tmp_path / "a") == packed_files(tmp_path / "b")

    labels = np.zeros(7, np.uint8)
    write_idx(plain / "train-labels-idx1-ubyte", labels, 2049, gz=False)
    ingest(fmnist_cfg(plain), tmp_path / "c", log=lambda _: None)
    assert dataset_version(tmp_path / "c") != dataset_version(tmp_path / "a")


def test_dataset_version_of_an_old_pack_asks_for_ingest(folder, tmp_path):
    out = tmp_path / "old"
    ingest(data_cfg(folder), out, log=lambda _: None)
    manifest = read_manifest(out)
    del manifest["dataset_version"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json: no \"dataset_version\".*re-run `genpipe ingest`"):
        dataset_version(out)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    # issue 5 item 10: PIL's convert("L") clips 16-bit values, turning almost everything white
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_image(tmp_path / "deep.png", data_cfg(tmp_path, image_size=8))
    assert np.array_equal(out[0], (wide >> 8).astype(np.uint8))
    rgb = load_image(tmp_path / "deep.png", data_cfg(tmp_path, image_size=8, channels=3))
    assert (rgb == (wide >> 8).astype(np.uint8)).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 16), np.uint8)
    pixels[:, 0] = 255  # a white left column; orientation 6 means "rotate 90° clockwise to view"
    exif = Image.Exif()
    exif[ImageOps.ExifTags.Base.Orientation] = 6
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    out = load_image(tmp_path / "turned.png", data_cfg(tmp_path))
    assert np.array_equal(out[0], np.rot90(pixels, -1)) and (out[0, 0] == 255).all()

    # applied before the size rule: stored 8x16, shown 16x8
    Image.fromarray(np.zeros((16, 8), np.uint8)).save(tmp_path / "tall.png", exif=exif)
    with pytest.raises(ImageRejected, match="size 16x8, expected 8x8"):
        load_image(tmp_path / "tall.png", data_cfg(tmp_path, image_size=8))


def test_conversion_error_rejects_one_file(folder, tmp_path, monkeypatch):
    noise(3, (17, 17)).save(folder / "cats/odd.png")
    to_mode = validate_module._to_mode

    def flaky(img, channels):
        if img.size == (17, 17):
            raise ValueError("conversion not supported")
        return to_mode(img, channels)

    monkeypatch.setattr(validate_module, "_to_mode", flaky)
    summary = ingest(data_cfg(folder), tmp_path / "out", log=lambda _: None)
    reasons = {r["origin"]: r["reason"] for r in read_rejected(tmp_path / "out")}
    assert reasons["cats/odd.png"] == "cannot convert: ValueError: conversion not supported"
    assert summary["items_train"] + summary["items_test"] == 12

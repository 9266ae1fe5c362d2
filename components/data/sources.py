"""Data sources: each turns a DataConfig into a RawDataset (decoded, validated arrays per split).

A source is a function `(cfg) -> RawDataset` registered with `@SOURCES.register("name")`;
params.yaml picks one with `data.source`.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from components.data.validate import ImageRejected, load_image
from components.registry import Registry

if TYPE_CHECKING:
    from components.config import DataConfig


class DataError(ValueError):
    """Unusable input data or dataset folder; the message names the path and what to do."""


@dataclass
class Split:
    images: np.ndarray  # uint8 N×C×H×W
    labels: np.ndarray  # int64 N
    origins: list[str]  # where each item came from, relative to data.path: "cat/1.png", "train-images-idx3-ubyte#12"

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawDataset:
    classes: list[str]
    splits: dict[str, Split]
    rejected: list[dict] = field(default_factory=list)  # {"origin": ..., "reason": ...}


SOURCES: Registry[Callable[["DataConfig"], RawDataset]] = Registry("data source")

_MISSING_FMNIST = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or set data.path in params.yaml"
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}.gz: not found (nor without .gz); {_MISSING_FMNIST}")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an idx file (big-endian magic, dims, then uint8 payload) into an array of shape dims."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an idx header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic}; not an idx file of this kind")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path}: header dims {dims} need {expected} bytes of data, file has {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _fit_fashion(images: np.ndarray, cfg: DataConfig, origin: Path) -> np.ndarray:
    """N×H×W uint8 → N×C×S×S following data.image_size / resize / channels."""
    h, w = images.shape[1:]
    size = cfg.image_size
    if (h, w) != (size, size):
        if not cfg.resize:
            raise DataError(
                f"{origin}: images are {w}x{h}, data.image_size is {size}; set data.resize: true to resize"
            )
        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in images]
        ) if len(images) else np.zeros((0, size, size), np.uint8)
    images = images[:, None]
    if cfg.channels == 3:
        images = np.repeat(images, 3, axis=1)
    return np.ascontiguousarray(images)


@SOURCES.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig) -> RawDataset:
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"{folder}: Fashion-MNIST folder not found; {_MISSING_FMNIST}")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        image_file = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
        label_file = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        images = _read_idx(image_file, 2051, 3)
        labels = _read_idx(label_file, 2049, 1)
        if len(images) != len(labels):
            raise DataError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
        if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{label_file}: label {labels.max()} out of range 0..{len(FASHION_MNIST_CLASSES) - 1}")
        n = len(labels) if cfg.limit_per_split is None else min(len(labels), cfg.limit_per_split)
        splits[split] = Split(
            images=_fit_fashion(images[:n], cfg, image_file),
            labels=labels[:n].astype(np.int64),
            # named without ".gz" so that gzipping the files (or not) does not change the packed manifest
            origins=[f"{image_file.name.removesuffix('.gz')}#{i}" for i in range(n)],
        )
    return RawDataset(classes=list(FASHION_MNIST_CLASSES), splits=splits, rejected=[])


def _split_of(data: bytes, test_fraction: float) -> str:
    # Deterministic by content: the same file lands in the same split on every machine and rerun,
    # and adding files never moves existing ones.
    sha = hashlib.sha256(data).hexdigest()
    return "test" if int(sha[:8], 16) / 2**32 < test_fraction else "train"


def _rejection(origin: str, path: Path, reason: str) -> dict:
    # Error messages quote the absolute path; name the file by its origin instead, so the packed
    # dataset does not depend on where the folder lies.
    return {"origin": origin, "reason": reason.replace(str(path), origin)}


@SOURCES.register("image-folder")
def image_folder(cfg: DataConfig) -> RawDataset:
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; set data.path in params.yaml")
    entries = sorted(root.iterdir())
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        raise DataError(
            f"{root}: no class folders; expected one sub-folder per class holding .png/.jpg/.jpeg images"
        )
    rejected = [
        {"origin": p.name, "reason": "not inside a class folder"} for p in entries if not p.is_dir()
    ]
    collected: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "test": ([], [], [])}
    limit = cfg.limit_per_split
    files = [(label, path.relative_to(root).as_posix(), path)
             for label, name in enumerate(classes) for path in (root / name).rglob("*") if path.is_file()]
    # Visit files in an order fixed by their path's hash rather than class by class, so a
    # limit_per_split subset (or any prefix of a split) mixes all classes.
    files.sort(key=lambda item: hashlib.sha256(item[1].encode()).digest())
    for label, origin, path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            reason = f"unsupported extension {path.suffix!r} (use .png, .jpg, .jpeg)"
            rejected.append(_rejection(origin, path, reason))
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            rejected.append(_rejection(origin, path, f"unreadable: {exc}"))
            continue
        images, labels, origins = collected[_split_of(data, cfg.test_fraction)]
        if limit is not None and len(images) >= limit:
            continue  # a deliberate subset, not a rejection
        try:
            images.append(load_image(path, cfg))
        except ImageRejected as exc:
            rejected.append(_rejection(origin, path, exc.reason))
            continue
        labels.append(label)
        origins.append(origin)
    shape = (0, cfg.channels, cfg.image_size, cfg.image_size)
    splits = {
        split: Split(
            images=np.stack(images) if images else np.zeros(shape, np.uint8),
            labels=np.asarray(labels, dtype=np.int64),
            origins=origins,
        )
        for split, (images, labels, origins) in collected.items()
    }
    return RawDataset(classes=classes, splits=splits, rejected=rejected)

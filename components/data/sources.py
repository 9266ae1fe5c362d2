"""Data sources, picked by params.yaml's `data.source` from SOURCES (components/data/items.py).

Sources of image files (image-folder, archive, s3: files.py, archive.py, s3.py) list what they find
and the ingest decodes it (stream.py); fashion-mnist, below, comes decoded with its own splits.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from components.data.items import SOURCES

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



_MISSING_FMNIST = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or set data.path in params.yaml"
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


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


# Sources of image files: their modules are imported when used (boto3 only for s3), so the stages
# that read params.yaml do not depend on them.
@SOURCES.register("image-folder")
def image_folder(cfg: DataConfig):
    from components.data.files import walk_folder

    return walk_folder(Path(cfg.path), cfg.follow_symlinks, max_file_bytes=cfg.max_file_bytes)


@SOURCES.register("archive")
def archive(cfg: DataConfig):
    from components.data.archive import walk_archive

    return walk_archive(Path(cfg.path), cfg.archive, max_file_bytes=cfg.max_file_bytes)


@SOURCES.register("s3")
def s3(cfg: DataConfig):
    from components.data.s3 import walk_s3

    return walk_s3(cfg.path, max_file_bytes=cfg.max_file_bytes)

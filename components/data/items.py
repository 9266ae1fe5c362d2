"""What a file-based source yields: the files it found, one by one, and what it refused, with why.

Every source of image files (a folder, an archive, an S3 prefix) walks its files in one fixed
order and yields a FileItem for each candidate image and a Skipped for each
thing it will not read, so nothing found is lost: every file ends in the dataset or in the report.
Decoding, deduplication, the split and packing happen downstream, the same for every source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable

from components.registry import Registry

if TYPE_CHECKING:
    from components.config import DataConfig

# Decoded like PNG/JPEG; GIF, WebP and TIFF may hold several frames: the first is taken (and said).
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class FileItem:
    origin: str  # where it came from, relative to data.path: "cat/1.png", "cat/1.png" in an archive, an S3 key
    label: str  # its class: the name of the folder (or prefix) it sits in
    read: Callable[[], bytes]  # its bytes; OSError: this file is unreadable (reported); SourceUnavailable: stop


class SourceUnavailable(Exception):
    """A file could not be read for a reason that may pass (a network error, a throttled store): the
    ingest stops, leaving the previous dataset in place, rather than pack a dataset without it; a
    rerun (Prefect's retry, the next schedule) reads it. A FileItem.read raises this; an OSError
    instead means this one file is unreadable, and it is reported."""


@dataclass(frozen=True)
class Skipped:
    origin: str
    reason: str  # in words meant for the report: what it is and what to do


def is_hidden(origin: str) -> bool:
    """A file or folder whose name (or any folder above it) starts with a dot."""
    return any(part.startswith(".") for part in PurePosixPath(origin).parts)


def has_image_extension(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def unsupported_extension(origin: str) -> str:
    return (f"unsupported extension {PurePosixPath(origin).suffix!r} "
            f"(use {', '.join(sorted(IMAGE_EXTENSIONS))})")


@dataclass
class Listing:
    """What a file source found: its classes, then its files and refusals one by one."""

    classes: list[str]  # sorted; the folders (prefixes) holding at least one candidate image
    entries: Iterable[FileItem | Skipped]  # a fixed order, the same on every run over the same files
    source_info: dict = field(default_factory=dict)  # recorded in the manifest's "source"; never credentials


# Every data source, by data.source (registered in sources.py): `(cfg) -> Listing` for sources of image files (decoding,
# deduplication, the split and packing are then the ingest's, the same for all of them), or
# `(cfg) -> RawDataset` for sources that come decoded with their own splits (fashion-mnist).
SOURCES: Registry[Callable[["DataConfig"], object]] = Registry("data source")

"""What a file-based source yields: the files it found, one by one, and what it refused, with why.

Every source of image files (a folder, an archive, an S3 prefix) walks its files in one fixed
order and yields a FileItem for each candidate image and a Skipped for each
thing it will not read, so nothing found is lost: every file ends in the dataset or in the report.
Decoding, deduplication, the split and packing happen downstream, the same for every source.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from components.registry import Registry

if TYPE_CHECKING:
    from components.config import DataConfig

# Decoded like PNG/JPEG; GIF, WebP and TIFF may hold several frames: the first is taken (and said).
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


class FileItem(NamedTuple):  # a tuple: a million are made per ingest, ~5x faster than a frozen dataclass
    origin: str  # where it came from, relative to data.path: "cat/1.png", "cat/1.png" in an archive, an S3 key
    label: str  # its class: the name of the folder (or prefix) it sits in
    # Its bytes. Picklable (a module-level function, or a functools.partial of one): the decode
    # processes call it. OSError: this file is unreadable (reported); SourceUnavailable: stop.
    read: Callable[[], bytes]


class SourceUnavailable(Exception):
    """A file could not be read for a reason that may pass (a network error, a throttled store): the
    ingest stops, leaving the previous dataset in place, rather than pack a dataset without it; a
    rerun (Prefect's retry, the next schedule) reads it. A FileItem.read raises this; an OSError
    instead means this one file is unreadable, and it is reported."""


class TooLarge(OSError):
    """A file found larger than data.max_file_bytes as it is read; its message is the report's reason."""


@dataclass(frozen=True)
class Skipped:
    origin: str
    reason: str  # in words meant for the report: what it is and what to do


# Reasons every file source gives, so a report reads the same whatever the source.
HIDDEN = "hidden (a name starts with '.'): left out; rename it without the dot to include it"
NOT_IN_CLASS = "not inside a class folder (or prefix): move it into the folder of its class"
IMAGE_NAMED_FOLDER = ("a folder (or prefix) named like an image: left out, with all it holds; "
                      "rename it to include it")
EMPTY_CLASS = "empty class folder (or prefix), no candidate image: left out of the class list"
SPECIAL_FILE = "not a regular file (a fifo, socket or device): left out"
SYMLINK_REFUSED = "symlink, refused: set data.follow_symlinks: true to follow links inside data.path"
NOT_UTF8 = "its name is not valid UTF-8: rename it"


def inside_image_named_folder(folder: str) -> str:
    return f"inside a folder (or prefix) named like an image ({folder}): left out; rename the folder to include it"


def too_large(max_file_bytes: int, size: int) -> str:
    return (f"larger than data.max_file_bytes {max_file_bytes} ({size} bytes): left out; "
            f"raise data.max_file_bytes in params.yaml to include it")


def is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (decoded by Python as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """A name that is_utf8 refuses, its odd bytes written as \\xNN, so a report can print it."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def hash_order(origins: Sequence[str]) -> np.ndarray:
    """The positions of `origins` sorted by their sha256: files are listed in an order fixed by their
    origin's hash rather than class by class, so a limit_per_split subset (or any prefix of a split)
    mixes all classes. Sorted on 8-byte keys in one array: a key object per file would cost ~65 bytes
    each, a third of the walk's memory."""
    keys = np.fromiter((int.from_bytes(hashlib.sha256(origin.encode()).digest()[:8], "big") for origin in origins),
                       dtype=np.uint64, count=len(origins))
    return np.argsort(keys, kind="stable")


class Names:
    """Many short strings (a walk's file names) in one buffer: about len + 8 bytes each, where a list
    of str costs len + 57, most of a large walk's memory."""

    def __init__(self):
        self.data = bytearray()
        self.ends = array("Q")

    def append(self, name: str) -> None:
        self.data += name.encode("utf-8", "surrogateescape")
        self.ends.append(len(self.data))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> str:
        start = self.ends[index - 1] if index else 0
        return self.data[start:self.ends[index]].decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[index] for index in range(len(self)))


class Replayable:
    """Entries made afresh by `make` on each iteration, so a listing can be walked more than once."""

    def __init__(self, make: Callable[[], Iterator[FileItem | Skipped]]):
        self._make = make

    def __iter__(self) -> Iterator[FileItem | Skipped]:
        return self._make()


def is_hidden(origin: str) -> bool:
    """A file or folder whose name (or any folder above it) starts with a dot."""
    return any(part.startswith(".") for part in PurePosixPath(origin).parts)


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS  # PurePosixPath(name).suffix, 10x faster


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

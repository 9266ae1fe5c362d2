"""The `image-folder` file source: data.path is a folder with one sub-folder per class.

The walk applies the one policy for odd files, each refusal a Skipped with its reason:
symlinks are refused unless data.follow_symlinks (and then never followed out of data.path, and
no folder is walked twice, so a link loop ends); hidden files and folders, folders named like
images, files outside a class folder, unsupported extensions and special files (fifos, sockets,
devices) are reported and left out; a class folder without a single candidate image is reported
and left out of the class list. Only names are looked at here: files are read later, lazily.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from components.data.items import FileItem, Listing, Skipped, has_image_extension, unsupported_extension

# Reasons shared with the archive source, so a report reads the same whatever the source.
HIDDEN = "hidden (a name starts with '.'): left out; rename it without the dot to include it"
NOT_IN_CLASS = "not inside a class folder: move it into the folder of its class"
IMAGE_NAMED_FOLDER = "a folder named like an image: left out, with all it holds; rename it to include it"
EMPTY_CLASS = "empty class folder (no candidate image): left out of the class list"
SPECIAL_FILE = "not a regular file (a fifo, socket or device): left out"
SYMLINK_REFUSED = "symlink, refused: set data.follow_symlinks: true to follow links inside data.path"


class Replayable:
    """Entries made afresh by `make` on each iteration, so a listing can be walked more than once."""

    def __init__(self, make: Callable[[], Iterator[FileItem | Skipped]]):
        self._make = make

    def __iter__(self) -> Iterator[FileItem | Skipped]:
        return self._make()


def origin_order(origin: str) -> bytes:
    # Files are listed in an order fixed by their origin's hash rather than class by class, so a
    # limit_per_split subset (or any prefix of a split) mixes all classes.
    return hashlib.sha256(origin.encode()).digest()


class _FolderWalk:
    """Walks the real folders first and the links after, so a folder reached both ways is walked
    (and its files classed) where it really lies, and a link to it is reported."""

    def __init__(self, root: Path, follow_symlinks: bool):
        self.root = root
        self.real_root = root.resolve()
        self.follow_symlinks = follow_symlinks
        self.skipped: list[Skipped] = []
        self.found: list[str] = []  # origins of candidate images: only strings, so a million stay small
        self.walked = {self.real_root: "data.path itself"}  # real path of every folder walked -> its origin
        self.class_folders: list[str] = []
        self.folders: list[tuple[str, Path]] = []  # (origin, real path) of folders still to walk
        self.links: deque[tuple[str, Path]] = deque()  # (origin, path) of links still to follow

    def skip(self, origin: str, reason: str) -> None:
        self.skipped.append(Skipped(origin, reason))

    def walk(self) -> None:
        self.folders.append((".", self.real_root))
        while self.folders or self.links:
            if self.folders:
                self.walk_folder(*self.folders.pop())
            else:
                self.follow(*self.links.popleft())

    def walk_folder(self, folder: str, real: Path) -> None:
        path = self.root / folder if folder != "." else self.root
        try:
            with os.scandir(path) as found:  # its entries know their type: no stat per file
                entries = sorted(found, key=lambda entry: entry.name)
        except OSError as exc:
            return self.skip(folder, f"unreadable folder ({exc.strerror}): left out")
        subfolders = []
        for entry in entries:
            origin = entry.name if folder == "." else f"{folder}/{entry.name}"
            if entry.name.startswith("."):
                self.skip(origin, HIDDEN)
            elif entry.is_symlink():
                if self.follow_symlinks:
                    self.links.append((origin, Path(entry.path)))
                else:
                    self.skip(origin, SYMLINK_REFUSED)
            elif entry.is_dir(follow_symlinks=False):
                if self.enter(origin, real / entry.name):
                    subfolders.append((origin, real / entry.name))
            elif entry.is_file(follow_symlinks=False):
                self.file(origin)
            else:
                self.skip(origin, SPECIAL_FILE)
        self.folders.extend(reversed(subfolders))  # walk sub-folders in name order

    def follow(self, origin: str, path: Path) -> None:
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(self.real_root):
            written = os.readlink(path)
            shown = "an absolute path" if os.path.isabs(written) else written
            self.skip(origin, f"symlink pointing outside data.path ({shown}), refused")
        elif target.is_dir():
            if self.enter(origin, target):
                self.folders.append((origin, target))
        elif target.is_file():
            self.file(origin)
        elif not target.exists():
            self.skip(origin, "broken symlink (its target is missing, or links loop): left out")
        else:
            self.skip(origin, SPECIAL_FILE)

    def enter(self, origin: str, real: Path) -> bool:
        """Whether to walk a folder; False once it is reported."""
        if has_image_extension(origin):
            self.skip(origin, IMAGE_NAMED_FOLDER)
            return False
        if real in self.walked:
            self.skip(origin, f"symlink to a folder already walked ({self.walked[real]}): not walked twice")
            return False
        self.walked[real] = origin
        if "/" not in origin:
            self.class_folders.append(origin)
        return True

    def file(self, origin: str) -> None:
        if "/" not in origin:
            self.skip(origin, NOT_IN_CLASS)
        elif has_image_extension(origin):
            self.found.append(origin)
        else:
            self.skip(origin, unsupported_extension(origin))

    def classes(self) -> list[str]:
        """The class folders holding a candidate image; the others reported."""
        filled = {origin.split("/", 1)[0] for origin in self.found}
        for folder in sorted(set(self.class_folders) - filled):
            self.skip(folder, EMPTY_CLASS)
        return sorted(filled)


def _entries(root: Path, skipped: list[Skipped], found: list[str]) -> Iterator[FileItem | Skipped]:
    yield from skipped
    for origin in found:
        yield FileItem(origin, origin.split("/", 1)[0], partial(Path.read_bytes, root / origin))


def walk_folder(root: Path, follow_symlinks: bool) -> Listing:
    """Every file and folder under root, each a FileItem (a candidate image in a class folder) or a
    Skipped with its reason: refusals first, in walk order, then the files by the hash of their origin.
    No class folder at all gives an empty listing (the ingest says what is expected)."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: image folder not found; set data.path in params.yaml")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; the image-folder source needs a folder with one "
                                 f"sub-folder per class (for a .zip or .tar use data.source: archive)")
    walk = _FolderWalk(root, follow_symlinks)
    walk.walk()
    classes = walk.classes()
    walk.found.sort(key=origin_order)
    skipped, found = walk.skipped, walk.found
    return Listing(classes=classes, entries=Replayable(lambda: _entries(root, skipped, found)))

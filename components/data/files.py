"""The `image-folder` file source: data.path is a folder with one sub-folder per class.

The walk applies the one policy for odd files, each refusal a Skipped with its reason:
symlinks are refused unless data.follow_symlinks (and then never followed out of data.path, and
no folder is walked twice, so a link loop ends); hidden files and folders, folders named like
images, files outside a class folder, unsupported extensions and special files (fifos, sockets,
devices), names that are not valid UTF-8 and files larger than data.max_file_bytes are reported
and left out; a class folder without a single candidate image is reported and left out of the
class list. Only names, and the size of each candidate image, are looked at here: files are read
later, lazily, without following a link unless data.follow_symlinks (read_file).
"""
from __future__ import annotations

import errno
import os
import stat
from collections import deque
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from components.data.items import (EMPTY_CLASS, HIDDEN, IMAGE_NAMED_FOLDER, NOT_IN_CLASS, NOT_UTF8, SPECIAL_FILE,
                                   SYMLINK_REFUSED, FileItem, Listing, Replayable, Skipped, has_image_extension,
                                   is_utf8, hash_order, printable, too_large, unsupported_extension)


def read_file(path: Path, max_file_bytes: int, follow_symlinks: bool) -> bytes:
    """A found file's bytes. OSError, its message without this machine's paths, when it cannot be
    read, is no longer a regular file, or grew past max_file_bytes since the walk."""
    # O_NOFOLLOW: a file swapped for a link after the walk is not followed (ELOOP); O_NONBLOCK: one
    # swapped for a fifo does not hang the open (regular files ignore the flag).
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise OSError(exc.errno, "replaced by a symlink since the walk: not followed "
                                     "(data.follow_symlinks is false)") from None
        raise OSError(exc.errno, exc.strerror) from None
    with open(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"no longer a regular file since the walk: {SPECIAL_FILE}")
        data = stream.read(max_file_bytes + 1)
    if len(data) > max_file_bytes:
        raise OSError(errno.EFBIG, f"grew since the walk past data.max_file_bytes {max_file_bytes}: left out")
    return data


class _FolderWalk:
    """Walks the real folders first and the links after, so a folder reached both ways is walked
    (and its files classed) where it really lies, and a link to it is reported."""

    def __init__(self, root: Path, follow_symlinks: bool, max_file_bytes: int):
        self.root = root
        self.real_root = root.resolve()
        self.follow_symlinks = follow_symlinks
        self.max_file_bytes = max_file_bytes
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
            if not is_utf8(entry.name):  # its origin could not be written to the manifest
                self.skip(printable(origin), NOT_UTF8)
            elif entry.name.startswith("."):
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
                self.file(origin, lambda: entry.stat(follow_symlinks=False).st_size)
            else:
                self.skip(origin, SPECIAL_FILE)
        self.folders.extend(reversed(subfolders))  # walk sub-folders in name order

    def follow(self, origin: str, path: Path) -> None:
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(self.real_root):
            written = os.readlink(path)
            shown = "an absolute path" if os.path.isabs(written) else printable(written)
            self.skip(origin, f"symlink pointing outside data.path ({shown}), refused")
        elif target.is_dir():
            if self.enter(origin, target):
                self.folders.append((origin, target))
        elif target.is_file():
            self.file(origin, lambda: target.stat().st_size)
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

    def file(self, origin: str, size: Callable[[], int]) -> None:
        """A candidate image if it sits in a class folder, is named like one and is not too large;
        `size` stats it, only then."""
        if "/" not in origin:
            return self.skip(origin, NOT_IN_CLASS)
        if not has_image_extension(origin):
            return self.skip(origin, unsupported_extension(origin))
        try:
            found_size = size()
        except OSError as exc:
            return self.skip(origin, f"unreadable file ({exc.strerror}): left out")
        if found_size > self.max_file_bytes:
            return self.skip(origin, too_large(self.max_file_bytes, found_size))
        self.found.append(origin)

    def classes(self) -> list[str]:
        """The class folders holding a candidate image; the others reported."""
        filled = {origin.split("/", 1)[0] for origin in self.found}
        for folder in sorted(set(self.class_folders) - filled):
            self.skip(folder, EMPTY_CLASS)
        return sorted(filled)


def _entries(root: Path, skipped: list[Skipped], found: list[str], max_file_bytes: int,
             follow_symlinks: bool) -> Iterator[FileItem | Skipped]:
    yield from skipped
    for origin in found:
        yield FileItem(origin, origin.split("/", 1)[0],
                       partial(read_file, root / origin, max_file_bytes, follow_symlinks))


def walk_folder(root: Path, follow_symlinks: bool, *, max_file_bytes: int) -> Listing:
    """Every file and folder under root, each a FileItem (a candidate image in a class folder) or a
    Skipped with its reason: refusals first, in walk order, then the files by the hash of their origin.
    No class folder at all gives an empty listing (the ingest says what is expected)."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: image folder not found; set data.path in params.yaml")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; the image-folder source needs a folder with one "
                                 f"sub-folder per class (for a .zip or .tar use data.source: archive)")
    walk = _FolderWalk(root, follow_symlinks, max_file_bytes)
    walk.walk()
    classes = walk.classes()
    walk.found = [walk.found[i] for i in hash_order(walk.found)]
    skipped, found = walk.skipped, walk.found
    return Listing(classes=classes,
                   entries=Replayable(lambda: _entries(root, skipped, found, max_file_bytes, follow_symlinks)))

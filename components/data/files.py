"""The `image-folder` file source: data.path is a folder with one sub-folder per class.

The walk applies the one policy for odd files, each refusal a Skipped with its reason:
symlinks are refused unless data.follow_symlinks (and then never followed out of data.path, and
no folder is walked twice, so a link loop ends); hidden files and folders, folders named like
images, files outside a class folder, unsupported extensions and special files (fifos, sockets,
devices) and names that are not valid UTF-8 are reported and left out; a class folder without a
single candidate image is reported and left out of the class list. Only names are looked at here:
files are read later, lazily, without following a link unless data.follow_symlinks, and one larger
than data.max_file_bytes is refused before a byte of it is read (read_file).
"""
from __future__ import annotations

import errno
import os
import stat
from collections import deque
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from components.data.items import (EMPTY_CLASS, HIDDEN, IMAGE_NAMED_FOLDER, NOT_IN_CLASS, NOT_UTF8, SPECIAL_FILE,
                                   SYMLINK_REFUSED, FileItem, Listing, Names, Replayable, Skipped, TooLarge,
                                   has_image_extension, is_utf8, hash_order, printable, too_large,
                                   unsupported_extension)


def read_file(path: str | Path, max_file_bytes: int, follow_symlinks: bool) -> bytes:
    """A found file's bytes. OSError, its message without this machine's paths, when it cannot be
    read or is no longer a regular file; TooLarge (an OSError) when it is larger than max_file_bytes."""
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
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise OSError(errno.EINVAL, f"no longer a regular file since the walk: {SPECIAL_FILE}")
        if found.st_size > max_file_bytes:
            raise TooLarge(too_large(max_file_bytes, found.st_size))
        # Sized by fstat (asking for max_file_bytes would allocate that much per file); read on to EOF
        # in case the file grows meanwhile, and stop past the limit.
        parts = [os.read(fd, found.st_size + 1)]  # one call for the whole file on a local disk
        total = len(parts[0])
        while len(parts[-1]) and total != found.st_size:  # a short read (NFS, FUSE), or the file grew: on to its end
            parts.append(os.read(fd, max(found.st_size + 1 - total, 1 << 20)))
            total += len(parts[-1])
            if total > max_file_bytes:
                raise TooLarge(f"grew past data.max_file_bytes {max_file_bytes} while it was read: left out")
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _FolderWalk:
    """Walks the real folders first and the links after, so a folder reached both ways is walked
    (and its files classed) where it really lies, and a link to it is reported."""

    def __init__(self, root: Path, follow_symlinks: bool):
        self.root = root
        self.real_root = root.resolve()
        self.follow_symlinks = follow_symlinks
        self.skipped: list[Skipped] = []
        self.found = Names()  # origins of candidate images
        self.filled: set[str] = set()  # the class folders holding one
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
                self.file(origin)
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
        """A candidate image if it sits in a class folder and is named like one. Its size is checked
        when it is read (read_file), before any byte is: a stat here would double the walk's time."""
        if "/" not in origin:
            return self.skip(origin, NOT_IN_CLASS)
        if not has_image_extension(origin):
            return self.skip(origin, unsupported_extension(origin))
        self.found.append(origin)
        self.filled.add(origin[:origin.index("/")])

    def classes(self) -> list[str]:
        """The class folders holding a candidate image; the others reported."""
        for folder in sorted(set(self.class_folders) - self.filled):
            self.skip(folder, EMPTY_CLASS)
        return sorted(self.filled)


def _entries(root: Path, skipped: list[Skipped], found: Names, order: np.ndarray, max_file_bytes: int,
             follow_symlinks: bool) -> Iterator[FileItem | Skipped]:
    yield from skipped
    for start in range(0, len(order), 4096):  # .tolist() of all of it would cost 36 bytes a file
        for index in order[start:start + 4096].tolist():
            origin = found[index]
            yield FileItem(origin, origin[:origin.index("/")],
                           partial(read_file, f"{root}/{origin}", max_file_bytes, follow_symlinks))


def walk_folder(root: Path, follow_symlinks: bool, *, max_file_bytes: int) -> Listing:
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
    skipped, found = walk.skipped, walk.found
    order = hash_order(found).astype(np.uint32 if len(found) < 2**32 else np.uint64)
    return Listing(classes=classes, entries=Replayable(
        lambda: _entries(root, skipped, found, order, max_file_bytes, follow_symlinks)))

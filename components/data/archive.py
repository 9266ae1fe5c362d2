"""The `archive` file source: data.path is a .zip or a .tar (plain, .gz/.tgz, .bz2, .xz) of class folders.

Members are read straight from the archive, in archive order, and never extracted to disk. The
policy is the folder walk's (components.data.files), member by member, plus what only archives
have; each refusal is a Skipped with its reason:
- unsafe names (absolute paths, '..', drive letters, backslashes: zip-slip) are refused; a tar
  member is first judged by tarfile's own `data_filter`;
- links (symbolic or hard), devices, fifos are refused: links in an archive are never followed,
  whatever data.follow_symlinks says (it applies to folders);
- names that are not valid UTF-8 (a tar may hold any bytes) are refused;
- an image whose header declares more than data.max_file_bytes is refused unread;
- once the images read pass data.archive.max_bytes (uncompressed, by their declared sizes), the
  rest is refused; past data.archive.max_members members the archive is not read further (one
  Skipped says so), so a million empty headers cost no more than max_members of them.
A member is read only up to the size its header declares, so a bomb never takes more memory than
the budget: a zip member whose header lies about its size fails zip's CRC check at the end of those
bytes, and a tar member's stream ends where its header says.

Classes: the first folder of a member's path, as in a folder. An archive made of the folder itself
(`zip -r data.zip data`, `tar czf data.tgz data`) holds everything under one top folder; when every
file (hidden and unsafe names aside) sits under one top folder T, T is named neither like an image
nor hidden, and no image lies directly in T, then T is that wrapper and its sub-folders are the
classes. A one-class archive (`cat/1.png`, `cat/2.png`) has images directly in `cat`, so `cat` stays
the class; a folder holding only sub-folders of images is read as a wrapper. Origins keep the full
member name (with the wrapper), so a report line points at the member.

The walk passes over the archive twice: once over the headers (the wrapper, the classes, the member
count), then reading each candidate image. Each member's bytes are read during the second pass and
handed over in its FileItem: consume the entries as a stream, so memory stays a few members.
"""
from __future__ import annotations

import hashlib
import lzma
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator

from components.data.items import (EMPTY_CLASS, HIDDEN, IMAGE_NAMED_FOLDER, NOT_IN_CLASS, NOT_UTF8, FileItem,
                                   Listing, Replayable, Skipped, has_image_extension, inside_image_named_folder,
                                   is_hidden, is_utf8, printable, too_large, unsupported_extension)

if TYPE_CHECKING:
    from components.config import ArchiveLimits

FORMATS = ".zip, .tar, .tar.gz/.tgz (also .tar.bz2, .tar.xz)"
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, zipfile.BadZipFile,
                NotImplementedError)  # NotImplementedError: a zip compression method Python lacks


@dataclass(frozen=True)
class Member:
    name: str  # as stored in the archive
    kind: str  # "file", "folder", or what else it is: "symbolic link", "character device", ...
    size: int  # uncompressed bytes, as its header declares
    problem: str | None  # the format's own refusal (tarfile's data filter, an encrypted zip member)
    open: Callable[[], IO[bytes]]  # its data; valid only while the walk stands on this member

    @cached_property
    def parts(self) -> tuple[str, ...]:
        """Its path's parts, without "." and empty ones: "./cat//1.png" → ("cat", "1.png")."""
        return tuple(part for part in self.name.split("/") if part not in ("", "."))

    @cached_property
    def hidden(self) -> bool:
        return is_hidden(self.name)


# The same few folder names come back in every member's path: judge each once.
_named_like_image = lru_cache(maxsize=1 << 16)(has_image_extension)


# --- formats: each lists its members in archive order ---------------------------------------------

_ZIP_TYPES = {stat.S_IFDIR: "folder", stat.S_IFLNK: "symbolic link", stat.S_IFCHR: "character device",
              stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
_TAR_TYPES = (("isreg", "file"), ("isdir", "folder"), ("issym", "symbolic link"), ("islnk", "hard link"),
              ("ischr", "character device"), ("isblk", "block device"), ("isfifo", "fifo"))
_TAR_FILTER_REFUSALS = {
    tarfile.AbsolutePathError: "an absolute path",
    tarfile.OutsideDestinationError: "a path that leaves the archive's root",
    tarfile.SpecialFileError: "a device file or fifo",
    tarfile.AbsoluteLinkError: "a link to an absolute path",
    tarfile.LinkOutsideDestinationError: "a link pointing outside the archive's root",
}


def _zip_members(path: Path) -> Iterator[Member]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            # Unix file type in the high 16 bits of external_attr; 0 (e.g. made on Windows): a plain file
            kind = "folder" if info.is_dir() else _ZIP_TYPES.get(stat.S_IFMT(info.external_attr >> 16), "file")
            problem = ("encrypted member, refused: archives must not be password-protected"
                       if info.flag_bits & 0x1 else None)
            yield Member(info.filename, kind, info.file_size, problem, partial(archive.open, info))


def _tar_filter_problem(info: tarfile.TarInfo, destination: str) -> str | None:
    try:
        tarfile.data_filter(info, destination)
    except tarfile.FilterError as exc:
        # The filter's own message quotes paths of this machine: say what it found in words.
        found = _TAR_FILTER_REFUSALS.get(type(exc), type(exc).__name__)
        return f"unsafe member, refused by tarfile's data filter: {found}"
    return None


def _tar_members(path: Path) -> Iterator[Member]:
    # data_filter judges a member against a destination folder: an empty one, never written to.
    with tempfile.TemporaryDirectory() as nowhere, tarfile.open(path, "r:*") as archive:
        while (info := archive.next()) is not None:
            archive.members.clear()  # read once, in order: keep no index of a million headers
            kind = next((kind for test, kind in _TAR_TYPES if getattr(info, test)()), "special member")
            yield Member(info.name, kind, info.size, _tar_filter_problem(info, nowhere),
                         partial(archive.extractfile, info))


@dataclass(frozen=True)
class _Format:
    name: str
    detect: Callable[[Path], bool]
    members: Callable[[Path], Iterator[Member]]


# Tar first: a plain tar whose last member is a .zip also ends like a zip, while no zip starts
# like a tar header.
_FORMATS = (_Format("tar", tarfile.is_tarfile, _tar_members), _Format("zip", zipfile.is_zipfile, _zip_members))


def _members(fmt: _Format, path: Path) -> Iterator[Member | Skipped]:
    """The members in order, then a Skipped for the rest if the archive breaks off (truncated, damaged)."""
    count = 0
    members = fmt.members(path)
    while True:
        try:
            member = next(members)
        except StopIteration:
            return
        except _READ_ERRORS as exc:
            yield Skipped(path.name, f"{fmt.name} archive damaged after {count} members ({exc}): "
                                     f"the rest could not be read; repair or rebuild the archive")
            return
        count += 1
        yield member


# --- the policy, member by member --------------------------------------------------------------------

_UNSAFE_NAMES = (
    (lambda name: name.startswith("/"), "an absolute path"),
    (lambda name: re.match(r"[A-Za-z]:", name) is not None, "a drive letter"),
    (lambda name: "\\" in name, "a backslash (a Windows separator, which can hide '..' or a drive)"),
    (lambda name: ".." in name.split("/"), "a '..' component, which leaves the archive's root"),
    (lambda name: "\x00" in name, "a NUL byte"),
    (lambda name: not name, "an empty name"),
)


def _unsafe_name(name: str) -> str | None:
    return next((f"unsafe member name, refused: {what}" for test, what in _UNSAFE_NAMES if test(name)), None)


@dataclass(frozen=True)
class _Verdict:
    origin: str
    label: str | None = None  # the class of a candidate image
    reason: str | None = None  # why it is refused; neither label nor reason: a folder, nothing to say
    folder: str | None = None  # the class folder it shows exists (an empty one is reported)


def _class_folder(rel: tuple[str, ...], kind: str) -> str | None:
    if not rel or (kind != "folder" and len(rel) < 2):
        return None
    top = rel[0]
    return None if top.startswith(".") or _named_like_image(top) else top


def _refusal(member: Member, rel: tuple[str, ...], outside: bool) -> str | None:
    if member.kind not in ("file", "folder"):
        return (f"a {member.kind} in an archive, refused: an archive may hold only files and folders "
                f"(links are never followed there, whatever data.follow_symlinks says)")
    if member.hidden:
        return HIDDEN
    if member.kind == "folder":
        return IMAGE_NAMED_FOLDER if rel and _named_like_image(rel[-1]) else None
    if outside or len(rel) < 2:
        return NOT_IN_CLASS
    parts = member.parts  # with the wrapper, which is never named like an image
    for depth, part in enumerate(parts[:-1]):
        if _named_like_image(part):
            return inside_image_named_folder("/".join(parts[:depth + 1]))
    return None if has_image_extension(rel[-1]) else unsupported_extension(member.name)


def _judge(member: Member, wrapper: str | None) -> _Verdict:
    """What the policy says of one member, given the archive's wrapper folder (None: none)."""
    if not is_utf8(member.name):
        return _Verdict(printable(member.name), reason=NOT_UTF8)
    refusal = member.problem or _unsafe_name(member.name)  # the format's own judgement first
    if refusal is not None:
        return _Verdict(member.name, reason=refusal)
    rel = member.parts
    origin = "/".join(rel)  # without "./" and a folder's trailing "/"
    if not rel:
        return _Verdict(origin)  # "./": the archive's root
    outside = wrapper is not None and rel[0] != wrapper
    if wrapper is not None and not outside:
        rel = rel[1:]
    reason = _refusal(member, rel, outside)
    label = rel[0] if reason is None and member.kind == "file" else None
    return _Verdict(origin, label, reason, None if outside else _class_folder(rel, member.kind))


def _members_not_read(max_members: int) -> str:
    return (f"members after #{max_members} not read (data.archive.max_members {max_members}): "
            f"raise it in params.yaml to read more")


class _Bounds:
    """data.archive's limits and data.max_file_bytes, spent member by member in archive order."""

    def __init__(self, limits: ArchiveLimits, max_file_bytes: int):
        self.limits = limits
        self.max_file_bytes = max_file_bytes
        self.members = 0
        self.bytes_left = limits.max_bytes
        self.full = False  # once the byte budget is passed, every later image is refused too

    def past_members(self) -> bool:
        """Count one more member; True once past the member limit: read no further."""
        self.members += 1
        return self.members > self.limits.max_members

    def take(self, size: int) -> str | None:
        """Spend `size` bytes on one image; the refusal if it is too large or passes the budget."""
        if size > self.max_file_bytes:
            return too_large(self.max_file_bytes, size)
        if self.full or size > self.bytes_left:
            self.full = True
            return (f"archive byte limit data.archive.max_bytes {self.limits.max_bytes} reached "
                    f"(uncompressed, all images together): raise it in params.yaml to take more")
        self.bytes_left -= size
        return None


# --- the first pass: wrapper, classes, member count ----------------------------------------------------

@dataclass
class _Survey:
    members: int  # read, at most data.archive.max_members
    wrapper: str | None
    classes: list[str]  # folders holding at least one candidate image within the limits
    empty: list[str]  # origins of class folders without one


def _top_folder(member: Member) -> str | None:
    """The first part of a member's path; None for an unsafe or non-UTF-8 name."""
    parts = member.parts
    safe = member.problem is None and is_utf8(member.name) and _unsafe_name(member.name) is None
    return parts[0] if parts and safe else None


def _keeps_wrapper(member: Member, wrapper: str) -> bool:
    """Whether a member leaves `wrapper` possible: folders, hidden and unsafe names do not count;
    any other member must lie in a sub-folder of the wrapper."""
    if member.kind == "folder" or _top_folder(member) is None or member.hidden:
        return True
    parts = member.parts
    if len(parts) < 2 or parts[0] != wrapper or _named_like_image(wrapper):
        return False
    return len(parts) > 2 or not has_image_extension(parts[1])  # no image directly in the wrapper


def _survey(fmt: _Format, path: Path, limits: ArchiveLimits, max_file_bytes: int) -> _Survey:
    # Each member is judged both without a wrapper and with its own top folder as the wrapper: when
    # a wrapper holds, both judge the same members candidates (only the class differs), so one pass
    # over the headers tells the classes under either reading.
    bounds = _Bounds(limits, max_file_bytes)
    count, wrapper, wrapped = 0, None, True
    plain_seen: set[str] = set()
    plain_classes: set[str] = set()
    top_seen: dict[str, set[str]] = defaultdict(set)
    top_classes: dict[str, set[str]] = defaultdict(set)
    for member in _members(fmt, path):
        if isinstance(member, Skipped):
            if count == 0:
                raise ValueError(f"{path}: cannot read the {fmt.name} archive: {member.reason}")
            break
        if bounds.past_members():
            break
        count += 1
        top = _top_folder(member)
        if wrapper is None and member.kind != "folder" and top is not None and not member.hidden:
            wrapper = top  # the only candidate: the top folder of the first member that counts
        wrapped = wrapped and (wrapper is None or _keeps_wrapper(member, wrapper))
        plain = _judge(member, None)
        under_top = _judge(member, top) if top else plain
        if plain.folder:
            plain_seen.add(plain.folder)
        if top and under_top.folder:
            top_seen[top].add(under_top.folder)
        if plain.label is not None and bounds.take(member.size) is None:
            plain_classes.add(plain.label)
            if top and under_top.label is not None:
                top_classes[top].add(under_top.label)
    if count == 0:
        raise ValueError(f"{path}: the {fmt.name} archive is empty; it should hold one folder per class")
    wrapper = wrapper if wrapped else None
    seen, classes = (top_seen[wrapper], top_classes[wrapper]) if wrapper else (plain_seen, plain_classes)
    prefix = f"{wrapper}/" if wrapper else ""
    return _Survey(count, wrapper, sorted(classes), [prefix + name for name in sorted(seen - classes)])


# --- the second pass: the entries ----------------------------------------------------------------------

def _read(member: Member, verdict: _Verdict, bounds: _Bounds) -> FileItem | Skipped:
    refusal = bounds.take(member.size)
    if refusal is not None:
        return Skipped(verdict.origin, refusal)
    try:
        with member.open() as stream:
            data = stream.read(member.size)  # never more than the header declares (see the module's docstring)
    except _READ_ERRORS as exc:
        return Skipped(verdict.origin, f"unreadable archive member ({exc}): left out")
    return FileItem(verdict.origin, verdict.label, partial(bytes, data))


def _entries(fmt: _Format, path: Path, limits: ArchiveLimits, max_file_bytes: int,
             survey: _Survey) -> Iterator[FileItem | Skipped]:
    # Budgets are spent by declared sizes as in the survey, so every image found here has its class
    # in the survey's class list (one the survey counted may still end up empty: a member unreadable).
    bounds = _Bounds(limits, max_file_bytes)
    for member in _members(fmt, path):
        if isinstance(member, Skipped):
            yield member
            break
        if bounds.past_members():
            yield Skipped(path.name, _members_not_read(limits.max_members))
            break
        verdict = _judge(member, survey.wrapper)
        if verdict.reason is not None:
            yield Skipped(verdict.origin, verdict.reason)
        elif verdict.label is not None:
            yield _read(member, verdict, bounds)
    for folder in survey.empty:
        yield Skipped(folder, EMPTY_CLASS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def walk_archive(path: Path, limits: ArchiveLimits, *, max_file_bytes: int) -> Listing:
    """The archive's first data.archive.max_members members, in archive order, each a FileItem (a
    candidate image in a class folder, its bytes already read) or a Skipped with its reason; one
    Skipped for the members not read past them; then the empty class folders."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: archive not found; set data.path in params.yaml to a {FORMATS} file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a folder, not an archive; for a folder of class folders "
                                f"set data.source: image-folder")
    fmt = next((fmt for fmt in _FORMATS if fmt.detect(path)), None)
    if fmt is None:
        raise ValueError(f"{path}: not a zip or tar archive; the archive source reads {FORMATS} "
                         f"(recognised by content, not by name)")
    survey = _survey(fmt, path, limits, max_file_bytes)
    return Listing(classes=survey.classes,
                   entries=Replayable(lambda: _entries(fmt, path, limits, max_file_bytes, survey)),
                   source_info={"archive": path.name, "sha256": _sha256(path), "members": survey.members})

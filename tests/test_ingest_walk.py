"""The folder walk and the archive source: every file found is a FileItem or a Skipped with its reason."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from components.config import ArchiveLimits, DataConfig
from components.data.archive import walk_archive
from components.data.files import walk_folder
from components.data.items import EMPTY_CLASS, NOT_UTF8, FileItem, Skipped, TooLarge, too_large
from components.data.sources import SOURCES


def split(listing) -> tuple[dict[str, FileItem], dict[str, str]]:
    """(FileItems by origin, Skipped reasons by origin); no origin may appear twice."""
    entries = list(listing.entries)
    origins = [entry.origin for entry in entries]
    assert len(origins) == len(set(origins)), origins
    items = {e.origin: e for e in entries if isinstance(e, FileItem)}
    skipped = {e.origin: e.reason for e in entries if isinstance(e, Skipped)}
    assert len(items) + len(skipped) == len(entries)
    return items, skipped


def summary(listing) -> list[tuple[str, str]]:
    return [(e.origin, e.reason if isinstance(e, Skipped) else f"{e.label}:{e.read()!r}") for e in listing.entries]


def assert_reasons(skipped: dict[str, str], expected: dict[str, str]) -> None:
    assert set(skipped) == set(expected), sorted(set(skipped) ^ set(expected))
    for origin, keyword in expected.items():
        assert keyword in skipped[origin], (origin, skipped[origin])


def data_cfg(path: Path, source: str, **overrides) -> DataConfig:
    fields = {"name": "t", "source": source, "path": str(path), "image_size": 16, "channels": 1, "resize": False,
              "test_fraction": 0.5, "limit_per_split": None, "max_pixels": 10_000, "max_file_bytes": 10**7,
              "shard_size": 4,
              "follow_symlinks": False, "archive": {"max_members": 1000, "max_bytes": 1_000_000}}
    return DataConfig.model_validate({**fields, **overrides})


CAP = 10**7  # data.max_file_bytes where a test is not about it


def limits(max_members: int = 1000, max_bytes: int = 1_000_000) -> ArchiveLimits:
    return ArchiveLimits(max_members=max_members, max_bytes=max_bytes)


# --- folders -----------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "data"
    files = {"cat/1.png": b"one", "cat/2.JPG": b"two", "cat/sub/4.png": b"four", "cat/notes.txt": b"",
             "cat/.hidden.png": b"", "cat/.git/x.png": b"", "cat/x.png/3.png": b"", "dog/5.png": b"five",
             "only_txt/readme.txt": b"", "top.png": b"", "pic.png/a.png": b"", ".cache/c.png": b"",
             "../outside/o.png": b"secret", "../outside/dir/d.png": b"secret"}
    for origin, data in files.items():
        (root / origin).parent.mkdir(parents=True, exist_ok=True)
        (root / origin).write_bytes(data)
    (root / "empty").mkdir()
    os.mkfifo(root / "cat" / "fifo.png")
    links = {"cat/in.png": "../dog/5.png", "cat/out.png": "../../outside/o.png",
             "cat/abs": str(tmp_path / "outside" / "dir"), "cat/loop": ".", "cat/broken.png": "missing.png",
             "cat/ping.png": "pong.png", "cat/pong.png": "ping.png", "classlink": "dog", "cat/sub/up": "../.."}
    for origin, target in links.items():
        os.symlink(target, root / origin)
    return root


FOLDER_REFUSALS = {
    "cat/notes.txt": "unsupported extension '.txt'", "only_txt/readme.txt": "unsupported extension",
    "cat/.hidden.png": "hidden", "cat/.git": "hidden", ".cache": "hidden",
    "cat/x.png": "a folder (or prefix) named like an image", "pic.png": "a folder (or prefix) named like an image",
    "cat/fifo.png": "not a regular file", "top.png": "not inside a class folder",
    "empty": "empty class folder", "only_txt": "empty class folder",
}


def test_folder_reports_every_odd_file_and_refuses_links(tree):
    listing = walk_folder(tree, follow_symlinks=False, max_file_bytes=CAP)
    items, skipped = split(listing)
    assert {o: i.label for o, i in items.items()} == {"cat/1.png": "cat", "cat/2.JPG": "cat",
                                                      "cat/sub/4.png": "cat", "dog/5.png": "dog"}
    assert items["cat/sub/4.png"].read() == b"four"
    links = ["cat/in.png", "cat/out.png", "cat/abs", "cat/loop", "cat/broken.png", "cat/ping.png",
             "cat/pong.png", "classlink", "cat/sub/up"]
    assert_reasons(skipped, {**FOLDER_REFUSALS, **{o: "set data.follow_symlinks: true" for o in links}})
    assert listing.classes == ["cat", "dog"]  # empty and only_txt are left out of the class list


def test_folder_follows_links_inside_root_only_and_never_loops(tree):
    listing = walk_folder(tree, follow_symlinks=True, max_file_bytes=CAP)
    items, skipped = split(listing)
    assert set(items) == {"cat/1.png", "cat/2.JPG", "cat/sub/4.png", "dog/5.png", "cat/in.png"}
    assert items["cat/in.png"].label == "cat" and items["cat/in.png"].read() == b"five"
    assert_reasons(skipped, {
        **FOLDER_REFUSALS,
        "cat/out.png": "symlink pointing outside data.path (../../outside/o.png)",
        "cat/abs": "symlink pointing outside data.path (an absolute path)",
        "cat/loop": "already walked (cat)", "cat/sub/up": "already walked (data.path itself)",
        "classlink": "already walked (dog)",  # the real folder keeps its class, whatever the names' order
        "cat/broken.png": "broken symlink", "cat/ping.png": "broken symlink", "cat/pong.png": "broken symlink",
    })
    assert str(tree.parent) not in "".join(skipped.values())  # no path of this machine in the report
    assert listing.classes == ["cat", "dog"]


def test_folder_order_is_fixed_mixes_classes_and_replays(tmp_path):
    for k in range(30):
        path = tmp_path / f"c{k % 3}" / f"{k}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([k]))
    listing = walk_folder(tmp_path, follow_symlinks=False, max_file_bytes=CAP)
    origins = [e.origin for e in listing.entries]
    assert origins == sorted(origins, key=lambda o: hashlib.sha256(o.encode()).digest())
    assert {o.split("/")[0] for o in origins[:6]} == {"c0", "c1", "c2"}
    again = walk_folder(tmp_path, follow_symlinks=False, max_file_bytes=CAP)
    assert summary(listing) == summary(listing) == summary(again)


def test_folder_errors_and_no_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="set data.path"):
        walk_folder(tmp_path / "missing", follow_symlinks=False, max_file_bytes=CAP)
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="data.source: archive"):
        walk_folder(tmp_path / "f.png", follow_symlinks=False, max_file_bytes=CAP)
    listing = walk_folder(tmp_path, follow_symlinks=False, max_file_bytes=CAP)
    assert listing.classes == []  # the ingest turns this into its error
    assert_reasons(split(listing)[1], {"f.png": "not inside a class folder"})


def test_names_not_utf8_are_reported_printably_never_listed(tmp_path):
    root = os.fsencode(tmp_path)
    for name in (b"cat/ok.png", b"cat/caf\xe9.png", b"caf\xe9/1.png", b"dog/\xff.txt"):
        os.makedirs(os.path.dirname(root + b"/" + name), exist_ok=True)
        Path(os.fsdecode(root + b"/" + name)).write_bytes(b"x")
    listing = walk_folder(tmp_path, follow_symlinks=False, max_file_bytes=CAP)
    items, skipped = split(listing)
    assert set(items) == {"cat/ok.png"}
    assert skipped == {"cat/caf\\xe9.png": NOT_UTF8, "caf\\xe9": NOT_UTF8, "dog/\\xff.txt": NOT_UTF8,
                       "dog": "empty class folder (or prefix), no candidate image: left out of the class list"}
    assert listing.classes == ["cat"]


def test_files_larger_than_max_file_bytes_are_refused_before_a_byte_is_read(tmp_path):
    for origin, size in {"cat/small.png": 5, "cat/large.png": 6}.items():
        (tmp_path / origin).parent.mkdir(exist_ok=True)
        (tmp_path / origin).write_bytes(b"x" * size)
    (tmp_path / "dog").mkdir()
    with open(tmp_path / "dog" / "huge.png", "wb") as huge:
        huge.truncate(2**34)  # sparse: reading it would take minutes and 16 GB
    os.symlink("../cat/large.png", tmp_path / "dog" / "link.png")
    items, skipped = split(walk_folder(tmp_path, follow_symlinks=True, max_file_bytes=5))
    assert skipped == {} and set(items) == {"cat/small.png", "cat/large.png", "dog/huge.png", "dog/link.png"}
    assert items["cat/small.png"].read() == b"x" * 5
    for origin, size in {"cat/large.png": 6, "dog/huge.png": 2**34, "dog/link.png": 6}.items():
        with pytest.raises(TooLarge) as err:
            items[origin].read()
        assert str(err.value) == too_large(5, size)
    assert "larger than data.max_file_bytes 5 (6 bytes): left out" in too_large(5, 6)


def test_a_file_swapped_after_the_walk_is_read_safely(tmp_path):
    for origin in ("cat/1.png", "cat/2.png", "cat/3.png", "cat/4.png", "dog/5.png"):
        (tmp_path / origin).parent.mkdir(exist_ok=True)
        (tmp_path / origin).write_bytes(origin.encode())
    items = split(walk_folder(tmp_path, follow_symlinks=False, max_file_bytes=100))[0]
    followed = split(walk_folder(tmp_path, follow_symlinks=True, max_file_bytes=100))[0]
    (tmp_path / "cat/1.png").unlink()
    os.symlink("../dog/5.png", tmp_path / "cat/1.png")  # after the walk: a link where a file was
    (tmp_path / "cat/2.png").unlink()
    os.mkfifo(tmp_path / "cat/2.png")  # a fifo: reading it would block
    (tmp_path / "cat/3.png").write_bytes(b"x" * 101)  # grown past the cap
    (tmp_path / "cat/4.png").unlink()
    for origin, words in {"cat/1.png": "replaced by a symlink since the walk: not followed",
                          "cat/2.png": "no longer a regular file", "cat/3.png": "larger than data.max_file_bytes 100 \\(101 bytes\\)",
                          "cat/4.png": "No such file or directory"}.items():
        with pytest.raises(OSError, match=words) as err:
            items[origin].read()
        assert str(tmp_path) not in str(err.value)  # no path of this machine in the report
    assert followed["cat/1.png"].read() == b"dog/5.png"  # data.follow_symlinks: true follows it (inside data.path)


def test_registered_sources_read_the_config(tree, tmp_path):
    listing = SOURCES.get("image-folder")(data_cfg(tree, "image-folder", follow_symlinks=True))
    assert "cat/in.png" in split(listing)[0]
    write_zip(tmp_path / "a.zip", {"cat/1.png": b"1"})
    cfg = data_cfg(tmp_path / "a.zip", "archive", archive={"max_members": 7, "max_bytes": 99})
    assert split(SOURCES.get("archive")(cfg))[0]["cat/1.png"].read() == b"1"


# --- archives ----------------------------------------------------------------------------------------

def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)  # names as given: writestr does not clean "..", "/" or "\\"
    return path


def tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None


def write_tar(path: Path, members: list[tuple], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for info, data in members:
            archive.addfile(info, data)
    return path


def test_zip_slip_names_links_and_encrypted_members_are_refused(tmp_path):
    path = write_zip(tmp_path / "slip.zip", {
        "cat/1.png": b"1", "../evil.png": b"e", "/abs.png": b"a", "C:/win.png": b"w",
        "cat\\..\\..\\bs.png": b"b", "cat/../../up.png": b"u", "dog/2.png": b"2"})
    with zipfile.ZipFile(path, "a") as archive:
        link = zipfile.ZipInfo("cat/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # how zip stores a symlink: its target as data
        archive.writestr(link, "1.png")
        archive.writestr("dog/secret.png", b"s")
    patch_headers(path, "dog/secret.png", 6, 8, b"\x01\x00")  # general purpose flags: encrypted
    listing = walk_archive(path, limits(), max_file_bytes=CAP)
    items, skipped = split(listing)
    assert {o: i.read() for o, i in items.items()} == {"cat/1.png": b"1", "dog/2.png": b"2"}
    unsafe = {"../evil.png": "a '..' component", "/abs.png": "an absolute path", "C:/win.png": "a drive letter",
              "cat\\..\\..\\bs.png": "a backslash", "cat/../../up.png": "a '..' component"}
    assert_reasons(skipped, {**{o: f"unsafe member name, refused: {why}" for o, why in unsafe.items()},
                             "cat/link.png": "a symbolic link in an archive, refused",
                             "dog/secret.png": "encrypted member, refused"})
    assert listing.classes == ["cat", "dog"]


def test_tar_refuses_unsafe_names_links_and_devices(tmp_path):
    path = write_tar(tmp_path / "odd.tar.gz", [
        tar_member("cat/1.png", b"1"), tar_member("/abs.png", b"a"), tar_member("../up.png", b"u"),
        tar_member("cat/link.png", kind=tarfile.SYMTYPE, link="1.png"),
        tar_member("cat/hard.png", kind=tarfile.LNKTYPE, link="cat/1.png"),
        tar_member("cat/etc.png", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        tar_member("cat/dev.png", kind=tarfile.CHRTYPE), tar_member("cat/fifo.png", kind=tarfile.FIFOTYPE),
        tar_member("dog/2.png", b"2")])
    listing = walk_archive(path, limits(), max_file_bytes=CAP)
    items, skipped = split(listing)
    assert {o: i.read() for o, i in items.items()} == {"cat/1.png": b"1", "dog/2.png": b"2"}
    assert_reasons(skipped, {
        "/abs.png": "unsafe member name, refused: an absolute path",
        "../up.png": "unsafe member, refused by tarfile's data filter: a path that leaves the archive's root",
        "cat/link.png": "a symbolic link in an archive, refused", "cat/hard.png": "a hard link in an archive",
        "cat/etc.png": "data filter: a link to an absolute path", "cat/dev.png": "data filter: a device file",
        "cat/fifo.png": "data filter: a device file or fifo"})
    assert str(tmp_path) not in "".join(skipped.values())
    assert listing.classes == ["cat", "dog"]
    assert listing.source_info == {"archive": "odd.tar.gz", "members": 9,
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.fixture
def class_folders(tmp_path) -> Path:
    root = tmp_path / "data"
    for origin in ("cat/1.png", "cat/sub/2.png", "dog/3.png", "readme.txt", "cat/.DS_Store", "cat/x.png/4.png",
                   "notes/a.txt"):
        (root / origin).parent.mkdir(parents=True, exist_ok=True)
        (root / origin).write_bytes(origin.encode())
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("fmt", ["zip", "tgz", "tar"])
def test_archive_of_a_folder_reads_its_subfolders_as_classes(class_folders, tmp_path, fmt):
    # as `zip -r data.zip data` / `tar czf data.tgz data` make it: one top folder holding the classes
    path = tmp_path / f"data.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            for found in sorted(class_folders.rglob("*")):
                archive.write(found, found.relative_to(class_folders.parent).as_posix())
    else:
        with tarfile.open(path, "w:gz" if fmt == "tgz" else "w") as archive:
            archive.add(class_folders, "data")
    listing = walk_archive(path, limits(), max_file_bytes=CAP)
    items, skipped = split(listing)
    assert {o: (i.label, i.read()) for o, i in items.items()} == {
        "data/cat/1.png": ("cat", b"cat/1.png"), "data/cat/sub/2.png": ("cat", b"cat/sub/2.png"),
        "data/dog/3.png": ("dog", b"dog/3.png")}
    assert_reasons(skipped, {
        "data/readme.txt": "not inside a class folder", "data/cat/.DS_Store": "hidden",
        "data/cat/x.png": "a folder (or prefix) named like an image",
        "data/cat/x.png/4.png": "inside a folder (or prefix) named like an image (data/cat/x.png)",
        "data/notes/a.txt": "unsupported extension", "data/notes": "empty class folder",
        "data/empty": "empty class folder"})
    assert listing.classes == ["cat", "dog"]
    assert summary(listing) == summary(listing)  # the same entries, in the same order, on every pass


def test_archive_without_a_wrapper(class_folders, tmp_path):
    with tarfile.open(tmp_path / "dot.tar", "w") as archive:
        archive.add(class_folders, ".")  # as `tar cf dot.tar -C data .` makes it: "./cat/1.png", ...
    listing = walk_archive(tmp_path / "dot.tar", limits(), max_file_bytes=CAP)
    assert listing.classes == ["cat", "dog"]
    assert {o: i.label for o, i in split(listing)[0].items()} == {"cat/1.png": "cat", "cat/sub/2.png": "cat",
                                                                  "dog/3.png": "dog"}
    one_zip = write_zip(tmp_path / "one.zip", {"cat/1.png": b"1", "cat/2.png": b"2"})
    one_class = walk_archive(one_zip, limits(), max_file_bytes=CAP)
    assert one_class.classes == ["cat"] and {i.label for i in split(one_class)[0].values()} == {"cat"}
    macos = write_zip(tmp_path / "mac.zip", {"d/cat/1.png": b"1", "d/dog/2.png": b"2", "__MACOSX/d/cat/._1.png": b""})
    listing = walk_archive(macos, limits(), max_file_bytes=CAP)
    assert listing.classes == ["cat", "dog"]  # Finder's hidden AppleDouble files do not hide the wrapper
    assert "hidden" in split(listing)[1]["__MACOSX/d/cat/._1.png"]


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_bomb_stops_at_the_byte_budget(tmp_path, fmt):
    members = {"cat/1.png": b"1" * 100, "cat/bomb.png": b"\0" * 5_000_000, "cat/after.png": b"a"}
    path = write_zip(tmp_path / "bomb.zip", members) if fmt == "zip" else \
        write_tar(tmp_path / "bomb.tgz", [tar_member(name, data) for name, data in members.items()])
    assert path.stat().st_size < 20_000  # the zeros compress to a few kB
    items, skipped = split(walk_archive(path, limits(max_bytes=10_000), max_file_bytes=CAP))
    assert set(items) == {"cat/1.png"}
    # past the budget the rest is refused too, whatever its size
    assert_reasons(skipped, {"cat/bomb.png": "data.archive.max_bytes 10000 reached",
                             "cat/after.png": "data.archive.max_bytes 10000 reached"})


def patch_headers(path: Path, name: str, local_at: int, central_at: int, value: bytes) -> None:
    """Overwrite one field of a member's local and central zip headers (offsets from each header)."""
    data = bytearray(path.read_bytes())
    for signature, field_at, name_len_at, header_len in ((b"PK\x03\x04", local_at, 26, 30),
                                                         (b"PK\x01\x02", central_at, 28, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            length = int.from_bytes(data[start + name_len_at:start + name_len_at + 2], "little")
            if data[start + header_len:start + header_len + length] == name.encode():
                data[start + field_at:start + field_at + len(value)] = value
            start += 4
    path.write_bytes(bytes(data))


def test_zip_member_lying_about_its_size_is_caught(tmp_path):
    path = write_zip(tmp_path / "forged.zip", {"cat/ok.png": b"ok", "cat/forged.png": b"\0" * 5_000_000})
    patch_headers(path, "cat/forged.png", 22, 24, (10).to_bytes(4, "little"))  # declared size: 10 bytes
    assert zipfile.ZipFile(path).getinfo("cat/forged.png").file_size == 10
    items, skipped = split(walk_archive(path, limits(max_bytes=1000), max_file_bytes=CAP))
    assert set(items) == {"cat/ok.png"}
    assert "unreadable archive member" in skipped["cat/forged.png"] and "CRC" in skipped["cat/forged.png"]


def test_member_limit_stops_the_reading_with_one_report(tmp_path):
    path = write_zip(tmp_path / "many.zip", {f"c{k % 2}/{k}.png": bytes([k]) for k in range(6)})
    listing = walk_archive(path, limits(max_members=4), max_file_bytes=CAP)
    items, skipped = split(listing)
    assert set(items) == {"c0/0.png", "c1/1.png", "c0/2.png", "c1/3.png"}
    assert skipped == {"many.zip": "members after #4 not read (data.archive.max_members 4): "
                                   "raise it in params.yaml to read more"}
    assert listing.source_info["members"] == 4


def test_member_limit_bounds_the_work_on_a_hundred_thousand_headers(tmp_path):
    # 100,000 empty members (51 MB of headers, <1 MB gzipped): only the first max_members + 1 are read.
    headers = [tarfile.TarInfo(f"cat/{k}.png").tobuf() for k in range(10)]
    filler = tarfile.TarInfo("cat/filler.png").tobuf()
    path = tmp_path / "headers.tgz"
    path.write_bytes(gzip.compress(b"".join(headers) + filler * 99_990 + b"\0" * 1024, compresslevel=1))
    start = time.monotonic()
    listing = walk_archive(path, limits(max_members=10), max_file_bytes=CAP)
    entries = list(listing.entries)
    assert time.monotonic() - start < 2
    assert len(entries) == 11 and listing.classes == ["cat"]
    assert {e.origin for e in entries if isinstance(e, FileItem)} == {f"cat/{k}.png" for k in range(10)}
    assert entries[-1] == Skipped("headers.tgz", "members after #10 not read (data.archive.max_members 10): "
                                                 "raise it in params.yaml to read more")


def test_tar_member_names_not_utf8_are_reported_printably(tmp_path):
    members = [tar_member(os.fsdecode(name), b"x") for name in (b"cat/1.png", b"cat/caf\xe9.png", b"caf\xe9/2.png")]
    path = write_tar(tmp_path / "names.tar", members, mode="w")
    listing = walk_archive(path, limits(), max_file_bytes=CAP)
    items, skipped = split(listing)
    assert set(items) == {"cat/1.png"} and listing.classes == ["cat"]
    assert skipped == {"cat/caf\\xe9.png": NOT_UTF8, "caf\\xe9/2.png": NOT_UTF8}


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_archive_member_larger_than_max_file_bytes_is_refused_unread(tmp_path, fmt):
    members = {"cat/large.png": b"x" * 6, "cat/small.png": b"x" * 5, "dog/huge.png": b"x" * 9}
    path = write_zip(tmp_path / "a.zip", members) if fmt == "zip" else \
        write_tar(tmp_path / "a.tgz", [tar_member(name, data) for name, data in members.items()])
    # The byte budget holds only small.png: the larger members, refused unread, do not spend it.
    listing = walk_archive(path, limits(max_bytes=5), max_file_bytes=5)
    items, skipped = split(listing)
    assert {o: i.read() for o, i in items.items()} == {"cat/small.png": b"xxxxx"} and listing.classes == ["cat"]
    assert skipped == {"cat/large.png": too_large(5, 6), "dog/huge.png": too_large(5, 9), "dog": EMPTY_CLASS}


def test_truncated_tar_keeps_what_came_before(tmp_path):
    path = write_tar(tmp_path / "cut.tar.gz", [tar_member(f"cat/{k}.png", os.urandom(4000)) for k in range(8)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    items, skipped = split(walk_archive(path, limits(), max_file_bytes=CAP))
    assert 1 <= len(items) < 8 and set(items) == {f"cat/{k}.png" for k in range(len(items))}
    assert "unreadable archive member" in skipped[f"cat/{len(items)}.png"]  # the member cut in two
    assert "tar archive damaged after" in skipped["cut.tar.gz"]  # and the rest, once


def test_archive_errors_name_the_file_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="archive not found"):
        walk_archive(tmp_path / "missing.zip", limits(), max_file_bytes=CAP)
    with pytest.raises(IsADirectoryError, match="data.source: image-folder"):
        walk_archive(tmp_path, limits(), max_file_bytes=CAP)
    (tmp_path / "notes.zip").write_text("not an archive at all")
    with pytest.raises(ValueError, match=r"notes.zip: not a zip or tar archive.*\.tar\.gz"):
        walk_archive(tmp_path / "notes.zip", limits(), max_file_bytes=CAP)

"""One messy corpus, made here, holding every odd case of the ingest policy, ingested as a folder and
as archives through `ingest()`: nothing is lost (every file found is packed or reported with its
reason) and no image sits in both splits."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from test_ingest_stream import data_cfg as stream_cfg
from test_ingest_stream import encode, noise

from components.config import DataConfig
from components.data.ingest import ingest
from components.data.pack import read_items, read_manifest, read_rejected


def data_cfg(source: str, path: Path, **overrides) -> DataConfig:
    return stream_cfg(**{"name": "corpus", "source": source, "path": str(path), "shard_size": 5,
                         "archive": {"max_members": 1000, "max_bytes": 2_000_000}, **overrides})


def corpus_files() -> dict[str, bytes]:
    """origin -> bytes of every regular file of the corpus."""
    animated = io.BytesIO()
    noise(20).save(animated, "GIF", save_all=True, append_images=[noise(21)])
    pages = io.BytesIO()
    noise(22).save(pages, "TIFF", save_all=True, append_images=[noise(23)])
    original = encode(noise(1), "PNG")
    files = {
        "a/1.png": original, "a/2.jpg": encode(noise(2), "JPEG"), "a/3.bmp": encode(noise(3), "BMP"),
        "a/4.webp": encode(noise(4), "WEBP", lossless=True), "a/5.gif": animated.getvalue(),
        "a/6.tif": pages.getvalue(), "a/cut.png": encode(noise(5), "PNG")[:-40],
        "a/.secret.png": encode(noise(6), "PNG"), "a/folder.png/inner.png": encode(noise(7), "PNG"),
        "b/bomb.png": encode(noise(8, 200), "PNG"), "b/copy.png": original,
        "b/same-pixels.png": encode(noise(1), "PNG", compress_level=0),
        "b/notes.txt": b"notes", "txt-only/readme.txt": b"readme", ".hidden/x.png": encode(noise(9), "PNG"),
        "stray.png": encode(noise(10), "PNG"),
    }
    files.update({f"b/{i}.png": encode(noise(100 + i), "PNG") for i in range(8)})
    return files


def check_nothing_lost(found: set[str], out: Path) -> tuple[list[dict], dict[str, dict]]:
    items = read_items(out)
    rejected = {r["origin"]: r for r in read_rejected(out)}
    packed = {r["origin"] for r in items}
    assert not packed & set(rejected)
    for origin in found:  # in the dataset, reported, or inside a folder reported as a whole
        ancestors = {str(p) for p in PurePosixPath(origin).parents}
        assert origin in packed or origin in rejected or ancestors & set(rejected), origin
    hashes = [r["sha256"] for r in items]
    assert len(hashes) == len(set(hashes))  # each image once, so none in both splits
    train = {r["sha256"] for r in items if r["split"] == "train"}
    assert train and not train & {r["sha256"] for r in items if r["split"] == "test"}
    return items, rejected


def test_a_messy_folder_loses_nothing(tmp_path):
    root = tmp_path / "images"
    for origin, data in corpus_files().items():
        (root / origin).parent.mkdir(parents=True, exist_ok=True)
        (root / origin).write_bytes(data)
    (root / "empty").mkdir()
    (tmp_path / "outside.png").write_bytes(encode(noise(11), "PNG"))
    os.symlink(tmp_path / "outside.png", root / "a/out.png")  # out of the root
    os.symlink("../b/0.png", root / "a/in.png")  # inside it, but links are refused by default
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}

    ingest(data_cfg("image-folder", root), tmp_path / "out", log=lambda _: None)
    items, rejected = check_nothing_lost(found, tmp_path / "out")
    assert read_manifest(tmp_path / "out")["classes"] == ["a", "b"]  # empty, txt-only: no candidate image
    assert {"empty", "txt-only"} <= set(rejected)
    group = {"a/1.png", "b/copy.png", "b/same-pixels.png"}  # one image: two files of the same bytes, one re-encoded
    (kept,) = group & {r["origin"] for r in items}
    assert all(rejected[origin]["duplicate_of"] == kept for origin in group - {kept})
    assert "symlink" in rejected["a/out.png"]["reason"] and "symlink" in rejected["a/in.png"]["reason"]
    assert rejected["a/cut.png"]["reason"].startswith("truncated or corrupt")
    assert rejected["b/bomb.png"]["reason"].startswith("decompression bomb")
    notes = {r["origin"]: r["note"] for r in items if "note" in r}
    assert set(notes) == {"a/5.gif", "a/6.tif"}

    # Followed links stay inside the root: the inside one is read (a duplicate of b/0.png), the other not.
    ingest(data_cfg("image-folder", root, follow_symlinks=True), tmp_path / "followed", log=lambda _: None)
    _, rejected = check_nothing_lost(found, tmp_path / "followed")
    assert "outside" in rejected["a/out.png"]["reason"] and "duplicate" in rejected["a/in.png"]["reason"]


def unsafe_tar_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    members = []
    for name, kind in (("a/link.png", tarfile.SYMTYPE), ("a/hard.png", tarfile.LNKTYPE),
                       ("a/dev.png", tarfile.CHRTYPE)):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "a/1.png" if kind != tarfile.CHRTYPE else ""
        members.append((info, None))
    for name in ("../evil.png", "/abs.png"):
        info = tarfile.TarInfo(name)
        data = encode(noise(30), "PNG")
        info.size = len(data)
        members.append((info, data))
    return members


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_messy_archive_loses_nothing(tmp_path, kind):
    files = corpus_files()
    path = tmp_path / f"corpus.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            for origin, data in files.items():
                archive.writestr(origin, data)
            archive.writestr("../../evil.png", encode(noise(31), "PNG"))  # zip-slip
            archive.writestr("bomb/zeros.png", b"\0" * 3_000_000, compress_type=zipfile.ZIP_DEFLATED)
        extra = {"../../evil.png", "bomb/zeros.png"}
    else:
        with tarfile.open(path, "w:gz") as archive:
            for origin, data in files.items():
                info = tarfile.TarInfo(origin)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            for info, data in unsafe_tar_members():
                archive.addfile(info, None if data is None else io.BytesIO(data))
        extra = {"a/link.png", "a/hard.png", "a/dev.png", "../evil.png", "/abs.png"}

    ingest(data_cfg("archive", path), tmp_path / "out", log=lambda _: None)
    rejected_origins = {r["origin"] for r in read_rejected(tmp_path / "out")}
    for origin in extra:  # each unsafe or over-budget member reported, under its name or a cleaned one
        assert any(origin.lstrip("./") in r or r in origin for r in rejected_origins), (origin, rejected_origins)
    check_nothing_lost(set(files), tmp_path / "out")
    assert read_manifest(tmp_path / "out")["classes"] == ["a", "b"]


def test_the_ingest_stage_logs_its_report_to_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from components.config import apply_overrides, read_params_raw
    from components.params import parse_params
    from components.pipeline import ingest_stage

    root = tmp_path / "images"
    for origin, data in corpus_files().items():
        (root / origin).parent.mkdir(parents=True, exist_ok=True)
        (root / origin).write_bytes(data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GENPIPE_HOME", str(tmp_path / "home"))
    raw = apply_overrides(read_params_raw(Path(__file__).parents[1] / "params.yaml"), [
        "data.name=corpus", "data.source=image-folder", f"data.path={root}", "data.image_size=16",
        "data.resize=false", "data.max_pixels=10000", "data.test_fraction=0.5"])
    summary = ingest_stage(parse_params(raw), tmp_path / "dataset", tmp_path / "ingest.json")

    c = MlflowClient(tracking_uri=uri)
    (run,) = c.search_runs([c.get_experiment_by_name("corpus-ingest").experiment_id])
    assert run.data.metrics["rejected"] == summary["rejected"] > 0
    assert run.data.params["data.source"] == "image-folder" and run.data.tags["dataset_version"]
    logged = {a.path for a in c.list_artifacts(run.info.run_id, "report")}
    assert logged == {"report/report.json", "report/contact_sheet.png", "report/rejected.jsonl"}

"""The streamed ingest of file sources: every format, duplicates kept once and never across splits,
nothing lost, the same dataset whatever the number of decode processes, memory bounded by shards."""
from __future__ import annotations

import hashlib
import io
import json
from functools import partial

import numpy as np
import pytest
from PIL import Image

from components.config import DataConfig
from components.data import stream
from components.data.items import FileItem, Listing, Skipped
from components.data.pack import DatasetWriter, load_split, read_items, read_manifest, read_rejected
from components.data.report import CONTACT_SHEET, REPORT, IngestReport, category
from components.data.stream import ingest_files, split_of


def data_cfg(**overrides) -> DataConfig:
    fields = {"name": "t", "source": "image-folder", "path": ".", "image_size": 16, "channels": 1, "resize": False,
              "test_fraction": 0.5, "limit_per_split": None, "max_pixels": 10_000, "max_file_bytes": 10**7, "shard_size": 4,
              "follow_symlinks": False, "archive": {"max_members": 1000, "max_bytes": 10_000_000}}
    return DataConfig.model_validate({**fields, **overrides})


def noise(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8), "L")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def item(origin: str, data: bytes) -> FileItem:
    return FileItem(origin, origin.split("/")[0], partial(bytes, data))  # picklable, as decode processes need


def run(entries: list, classes: list[str], tmp_path, cfg: DataConfig | None = None, processes: int = 1):
    cfg = cfg or data_cfg()
    folder = tmp_path / f"ds-{processes}"
    folder.mkdir()
    writer = DatasetWriter(folder, classes, (cfg.channels, cfg.image_size, cfg.image_size), cfg.shard_size)
    report = IngestReport(folder, classes)
    ingest_files(Listing(classes, iter(entries)), cfg, writer, report, processes=processes)
    dropped = writer.drop_empty_classes()
    manifest = writer.finish({"name": cfg.name})
    report.write(manifest)
    return folder, manifest, dropped


def test_every_format_decodes_and_a_multi_frame_file_says_which_frame(tmp_path):
    frames = [noise(10), noise(11)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    tiff_pages = io.BytesIO()
    noise(12).save(tiff_pages, "TIFF", save_all=True, append_images=[noise(13)])
    entries = [item("a/png.png", encode(noise(1), "PNG")), item("a/bmp.bmp", encode(noise(2), "BMP")),
               item("a/webp.webp", encode(noise(3), "WEBP", lossless=True)),
               item("a/tiff.tiff", encode(noise(4), "TIFF")), item("b/gif.gif", encode(noise(5), "GIF")),
               item("b/anim.gif", animated.getvalue()), item("b/pages.tif", tiff_pages.getvalue()),
               item("b/jpeg.jpg", encode(noise(6), "JPEG", quality=95))]
    folder, manifest, _ = run(entries, ["a", "b"], tmp_path)
    records = {r["origin"]: r for r in read_items(folder)}
    assert set(records) == {e.origin for e in entries}
    assert "first taken" in records["b/anim.gif"]["note"] and "2 frames" in records["b/pages.tif"]["note"]
    # Lossless formats keep the exact pixels; a file of several frames gives its first.
    def pixels_sha(image: Image.Image) -> str:
        return hashlib.sha256(np.asarray(image)[None].tobytes()).hexdigest()

    for origin, seed in (("a/png.png", 1), ("a/bmp.bmp", 2), ("a/webp.webp", 3), ("a/tiff.tiff", 4)):
        assert records[origin]["sha256"] == pixels_sha(noise(seed)), origin
    assert records["b/anim.gif"]["sha256"] == pixels_sha(frames[0])
    assert records["b/pages.tif"]["sha256"] == pixels_sha(noise(12))


def test_duplicates_are_kept_once_never_across_splits_and_reported_with_the_file_they_duplicate(tmp_path):
    original = noise(1)
    png = encode(original, "PNG")
    recompressed = encode(original, "PNG", compress_level=0)  # other bytes, same pixels
    as_bmp = encode(original, "BMP")
    assert png != recompressed
    entries = [item("a/1.png", png), item("b/copy.png", png), item("a/2.png", recompressed),
               item("b/3.bmp", as_bmp)] + [item(f"a/n{i}.png", encode(noise(100 + i), "PNG")) for i in range(12)]
    folder, manifest, _ = run(entries, ["a", "b"], tmp_path)
    rejected = {r["origin"]: r for r in read_rejected(folder)}
    assert rejected["b/copy.png"]["duplicate_of"] == "a/1.png" and "exact duplicate" in rejected["b/copy.png"]["reason"]
    for origin in ("a/2.png", "b/3.bmp"):
        assert rejected[origin]["duplicate_of"] == "a/1.png" and "pixel-identical" in rejected[origin]["reason"]
    kept = read_items(folder)
    hashes = [r["sha256"] for r in kept]
    assert len(hashes) == len(set(hashes)) == 13  # each distinct image once
    train = {r["sha256"] for r in kept if r["split"] == "train"}
    test = {r["sha256"] for r in kept if r["split"] == "test"}
    assert not train & test and train and test
    report = json.loads((folder / REPORT).read_text())
    assert report["duplicates"] == 3 and report["rejected"] == 3


def test_nothing_found_is_lost_and_refusals_are_reported(tmp_path):
    good = [item(f"a/{i}.png", encode(noise(i), "PNG")) for i in range(6)]

    def unreadable():
        raise OSError("permission denied")

    truncated = encode(noise(50), "PNG")[:-30]
    entries = good + [Skipped("a/link.png", "symlink, refused"), FileItem("a/locked.png", "a", unreadable),
                      item("a/cut.png", truncated), item("a/big.png", encode(noise(51, 200), "PNG")),
                      item("a/text.png", b"not an image")]
    folder, manifest, _ = run(entries, ["a"], tmp_path)
    packed = {r["origin"] for r in read_items(folder)}
    rejected = {r["origin"]: r["reason"] for r in read_rejected(folder)}
    assert packed | set(rejected) == {e.origin for e in entries} and not packed & set(rejected)
    assert "unreadable: permission denied" == rejected["a/locked.png"]
    assert rejected["a/cut.png"].startswith("truncated or corrupt")
    assert rejected["a/big.png"].startswith("decompression bomb")
    assert rejected["a/text.png"].startswith("not a decodable image")
    assert rejected["a/link.png"] == "symlink, refused"
    by_reason = json.loads((folder / REPORT).read_text())["rejected_by_reason"]
    assert by_reason["truncated or corrupt"] == 1 and sum(by_reason.values()) == 5


def test_a_class_whose_files_all_fail_is_left_out_and_labels_renumbered(tmp_path):
    entries = [item(f"a/{i}.png", encode(noise(i), "PNG")) for i in range(4)] + [item("b/bad.png", b"junk")] + \
              [item(f"c/{i}.png", encode(noise(20 + i), "PNG")) for i in range(4)]
    folder, manifest, dropped = run(entries, ["a", "b", "c"], tmp_path)
    assert dropped == ["b"] and manifest["classes"] == ["a", "c"]
    labels = {r["origin"].split("/")[0]: r["label"] for r in read_items(folder)}
    assert labels == {"a": 0, "c": 1}
    for split in ("train", "test"):
        _, y = load_split(folder, split)
        assert set(y.tolist()) <= {0, 1}
    assert len(manifest["dataset_version"]) == 16


def test_the_dataset_is_the_same_whatever_the_number_of_decode_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "POOL_AFTER", 20)  # small, so that the pool's window fills and drains
    monkeypatch.setattr(stream, "CHUNK", 10)
    count = 20 + 3 * 2 * stream.WINDOW_PER_WORKER * 10 + 5
    entries = [item(f"{'ab'[i % 2]}/{i}.png", encode(noise(i), "PNG")) for i in range(count)]
    one, manifest_one, _ = run(entries, ["a", "b"], tmp_path, processes=1)
    two, manifest_two, _ = run(entries, ["a", "b"], tmp_path, processes=2)
    assert manifest_one["dataset_version"] == manifest_two["dataset_version"]
    assert (one / "items.jsonl").read_bytes() == (two / "items.jsonl").read_bytes()
    for shard in manifest_one["splits"]["train"]["shards"]:
        assert (one / shard).read_bytes() == (two / shard).read_bytes()


def test_files_are_taken_from_the_source_as_they_are_packed_not_all_first(tmp_path, monkeypatch):
    """Streaming: by the time the first shard is written, only a bounded number of files were taken."""
    taken = []

    def source():
        for i in range(600):
            taken.append(i)
            yield item(f"a/{i}.png", encode(noise(i), "PNG"))

    seen_at_first_shard = []
    original = DatasetWriter._flush

    def flush(self, split):
        if self.buffers[split] and not seen_at_first_shard:
            seen_at_first_shard.append(len(taken))
        original(self, split)

    monkeypatch.setattr(DatasetWriter, "_flush", flush)
    monkeypatch.setattr(stream, "POOL_AFTER", 20)  # small, so the pool's window is what is measured
    monkeypatch.setattr(stream, "CHUNK", 10)
    folder, manifest, _ = run(source(), ["a"], tmp_path, cfg=data_cfg(shard_size=50), processes=2)
    assert len(taken) == 600 and len(read_items(folder)) == 600
    # About two shards' worth and the decode window (and one chunk being cut), not all 600.
    assert seen_at_first_shard[0] <= 2 * 50 + 20 + (2 * stream.WINDOW_PER_WORKER + 1) * 10
    assert stream.chunk_files(data_cfg(image_size=256, channels=3)) == 5  # 1 MiB of pixels per task at most


def test_limit_per_split_leaves_the_rest_out_with_a_reason(tmp_path):
    entries = [item(f"a/{i}.png", encode(noise(i), "PNG")) for i in range(20)]
    folder, manifest, _ = run(entries, ["a"], tmp_path, cfg=data_cfg(limit_per_split=3))
    assert manifest["splits"]["train"]["count"] == 3 and manifest["splits"]["test"]["count"] == 3
    left_out = [r for r in read_rejected(folder) if "limit_per_split" in r["reason"]]
    assert len(left_out) == 14


def test_the_split_is_a_function_of_the_pixels():
    assert split_of("0" * 64, 0.5) == "test" and split_of("f" * 64, 0.5) == "train"


def test_the_contact_sheet_shows_each_class(tmp_path):
    entries = [item(f"{c}/{i}.png", encode(noise(10 * k + i), "PNG")) for k, c in enumerate("abc") for i in range(3)]
    folder, manifest, _ = run(entries, ["a", "b", "c"], tmp_path)
    sheet = Image.open(folder / CONTACT_SHEET)
    assert sheet.height == 3 * (16 + 2)  # one row per class
    assert category("truncated or corrupt: image file is truncated (3 bytes)") == "truncated or corrupt"
    assert category("exact duplicate (same bytes) of a/1.png: kept once") == "exact duplicate"


def test_a_decoder_error_costs_its_file_and_a_dead_decode_process_names_its_files(tmp_path, monkeypatch):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from components.data.sources import DataError

    entries = [item(f"a/{i}.png", encode(noise(i), "PNG")) for i in range(12)]
    crafted = {entries[1].read(), entries[4].read()}

    def crash_on_crafted(data, cfg):
        if data in crafted:
            raise RuntimeError("decoder bug")
        return real_decode(data, cfg)

    real_decode = stream.decode_image_bytes
    monkeypatch.setattr(stream, "decode_image_bytes", crash_on_crafted)
    folder, _, _ = run(entries, ["a"], tmp_path)
    crashed = {r["origin"] for r in read_rejected(folder) if r["reason"].startswith("cannot decode: RuntimeError")}
    assert crashed == {"a/1.png", "a/4.png"} and len(read_items(folder)) == 10

    dead, started = Future(), Future()
    dead.set_exception(BrokenProcessPool("a child process terminated abruptly"))
    started.set_result(0)
    with pytest.raises(DataError, match="decode process died while decoding 2 files from a/0.png to a/1.png"):
        list(stream._results(entries[:2], dead, started))


UNGUARDED = """
import io, sys
from functools import partial
sys.path.insert(0, {root!r})
import numpy as np
from PIL import Image
from components.config import DataConfig
from components.data import stream
from components.data.items import FileItem, Listing
from components.data.pack import DatasetWriter
from components.data.report import IngestReport
from components.data.sources import DataError

def png(seed):
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()

stream.POOL_AFTER = 0  # straight to the decode processes
cfg = DataConfig.model_validate({fields!r})
entries = [FileItem(f"a/{{i}}.png", "a", partial(bytes, png(i))) for i in range(8)]
writer = DatasetWriter(sys.argv[1], ["a"], (1, 16, 16), 4)
try:
    stream.ingest_files(Listing(["a"], entries), cfg, writer, IngestReport(sys.argv[1], ["a"]), processes=2)
except DataError as exc:
    print("DataError:", exc)
    sys.exit(3)
"""


def test_an_ingest_from_a_script_without_a_main_guard_says_what_to_do(tmp_path):
    """spawn imports the calling script in each decode process: unguarded, they cannot start."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(UNGUARDED.format(root=root, fields=data_cfg().model_dump(mode="json")))
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the decode processes could not start" in done.stdout
    assert 'if __name__ == "__main__":' in done.stdout


def test_a_source_that_fails_mid_way_stops_the_ingest_and_keeps_the_previous_dataset(tmp_path, monkeypatch):
    from components.data import ingest as ingest_module
    from components.data.items import SOURCES, SourceUnavailable
    from components.data.sources import DataError

    def flaky():
        raise SourceUnavailable("s3://b/p/a/3.png: read failed (SlowDown) after 3 attempts")

    good = [item(f"a/{i}.png", encode(noise(i), "PNG")) for i in range(6)]
    listings = iter([Listing(["a"], good), Listing(["a"], good[:3] + [FileItem("a/3.png", "a", flaky)])])
    monkeypatch.setitem(SOURCES._items, "flaky", lambda cfg: next(listings))
    out = tmp_path / "dataset"
    ingest_module.ingest(data_cfg(source="flaky"), out, log=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"SlowDown.*previous dataset is as it was"):
        ingest_module.ingest(data_cfg(source="flaky"), out, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

"""Packed dataset on disk: .npz shards per split, the manifest (lineage), the items and rejections
(JSON Lines: they scale past a million), the ingest report and summary.json (DVC metrics).

Layout of a dataset folder:
    {split}-{k:03d}.npz   arrays `images` (uint8 N×C×H×W) and `labels` (int64 N), ≤ data.shard_size items
    manifest.json         dataset_version, classes, splits (counts, shards, class counts), source, config
    items.jsonl           one line per item: split, shard, index, label, sha256 of its pixels, origin, ...
    rejected.jsonl        one line per file left out: origin, reason (and duplicate_of for duplicates)
    summary.json          flat counts: items_<split>, rejected, num_classes

Nothing written depends on where the source lay (data.path is left out, origins are relative to it),
so the same data read from another folder packs to the same bytes. dataset_version hashes only the
data itself: image shape, classes, and per split the items' pixel hashes and labels in order.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from json.encoder import encode_basestring_ascii as _json_string  # how json.dumps writes a str
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from components.data.sources import DataError, RawDataset

if TYPE_CHECKING:
    import torch

    from components.config import DataConfig

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
ITEMS = "items.jsonl"  # one line per item: split, shard, index, label, sha256 (pixels), origin, ...
REJECTED = "rejected.jsonl"  # one line per file left out: origin, reason (duplicates: duplicate_of)


def _check(raw: RawDataset, shape: tuple[int, int, int]) -> None:
    for name, split in raw.splits.items():
        if split.images.dtype != np.uint8 or split.images.shape[1:] != shape:
            raise DataError(
                f"split {name!r}: images are {split.images.dtype} {split.images.shape[1:]}, expected uint8 {shape}"
            )
        if not (len(split.images) == len(split.labels) == len(split.origins)):
            raise DataError(f"split {name!r}: images, labels and origins differ in length")
        if len(split.labels) and not (0 <= split.labels.min() and split.labels.max() < len(raw.classes)):
            raise DataError(f"split {name!r}: labels outside 0..{len(raw.classes) - 1}")


class DatasetWriter:
    """Writes a dataset item by item into a folder: each split's items buffered up to one shard, then
    saved, so memory holds at most one shard per split; items.jsonl gets one line per item as its
    shard is written. `finish()` writes the manifest and returns it."""

    def __init__(self, folder: Path, classes: list[str], shape: tuple[int, int, int], shard_size: int,
                 splits: tuple[str, ...] = ("train", "test")):
        self.folder, self.classes, self.shape, self.shard_size = Path(folder), list(classes), shape, shard_size
        self.buffers: dict[str, list[tuple[bytes, int, dict]]] = {name: [] for name in splits}
        self.image_bytes = int(np.prod(shape))
        self.splits = {name: {"count": 0, "shards": [], "class_counts": dict.fromkeys(self.classes, 0)}
                       for name in splits}
        self.digests = {name: hashlib.sha256() for name in splits}  # of what training sees, in order
        self.items = open(self.folder / ITEMS, "w")

    def count(self, split: str) -> int:
        return self.splits[split]["count"] + len(self.buffers[split])

    def add(self, split: str, pixels: np.ndarray | bytes, label: int, item: dict) -> None:
        """One image (uint8 C×H×W, or the bytes of one) of class `label`; `item` holds what the manifest
        records of it (origin, hashes: str or int values); split, shard, index, label and the pixels'
        sha256 are added here."""
        if isinstance(pixels, np.ndarray):
            if pixels.dtype != np.uint8 or pixels.shape != self.shape:
                raise DataError(f"{item.get('origin')}: image is {pixels.dtype} {pixels.shape}, "
                                f"expected uint8 {self.shape}")
            pixels = pixels.tobytes()
        elif len(pixels) != self.image_bytes:
            raise DataError(f"{item.get('origin')}: image is {len(pixels)} bytes, expected {self.image_bytes} "
                            f"(uint8 {self.shape})")
        if not 0 <= label < len(self.classes):
            raise DataError(f"{item.get('origin')}: label {label} outside 0..{len(self.classes) - 1}")
        self.buffers[split].append((pixels, label, item))
        if len(self.buffers[split]) >= self.shard_size:
            self._flush(split)

    def _flush(self, split: str) -> None:
        buffer, info = self.buffers[split], self.splits[split]
        if not buffer:
            return
        shard = f"{split}-{len(info['shards']):03d}.npz"
        images = np.frombuffer(b"".join(pixels for pixels, _, _ in buffer), dtype=np.uint8)
        labels = np.asarray([label for _, label, _ in buffer], dtype=np.int64)
        np.savez(self.folder / shard, images=images.reshape(len(buffer), *self.shape), labels=labels)
        info["shards"].append(shard)
        lines, digest = [], self.digests[split]
        head = f'{{"split": {_json_string(split)}, "shard": {_json_string(shard)}, "index": '
        for index, (pixels, label, item) in enumerate(buffer):
            sha = item.get("sha256") or hashlib.sha256(pixels).hexdigest()
            # json.dumps({"split": .., "shard": .., "index": .., "label": .., "sha256": .., **item}), 3x faster
            lines.append(f'{head}{index}, "label": {label}, "sha256": "{sha}"{_json_fields(item)}}}\n')
            digest.update(f"\n{label} {sha}".encode())
            info["class_counts"][self.classes[label]] += 1
        self.items.write("".join(lines))
        info["count"] += len(buffer)
        buffer.clear()

    def drop_empty_classes(self) -> list[str]:
        """Leave out the classes no item was written for (every file of theirs refused): labels are
        renumbered in the shards and items.jsonl, so no model gets a class without data. Returns
        the names left out. Call once every item is added."""
        for split in self.buffers:
            self._flush(split)
        totals = {name: sum(info["class_counts"][name] for info in self.splits.values()) for name in self.classes}
        empty = [name for name in self.classes if totals[name] == 0]
        if not empty:
            return []
        keep = [name for name in self.classes if totals[name]]
        renumber = np.full(len(self.classes), -1, dtype=np.int64)
        renumber[[self.classes.index(name) for name in keep]] = np.arange(len(keep))
        for info in self.splits.values():
            for shard in info["shards"]:
                with np.load(self.folder / shard, allow_pickle=False) as data:
                    images, labels = data["images"], data["labels"]
                np.savez(self.folder / shard, images=images, labels=renumber[labels])
            info["class_counts"] = {name: info["class_counts"][name] for name in keep}
        self.items.close()
        self.digests = {name: hashlib.sha256() for name in self.splits}
        old = self.folder / ITEMS
        os.replace(old, self.folder / (ITEMS + ".old"))
        with open(self.folder / (ITEMS + ".old")) as lines, open(old, "w") as out:
            for line in lines:
                record = json.loads(line)
                record["label"] = int(renumber[record["label"]])
                out.write(json.dumps(record) + "\n")
                self.digests[record["split"]].update(f"\n{record['label']} {record['sha256']}".encode())
        (self.folder / (ITEMS + ".old")).unlink()
        self.items = open(old, "a")
        self.classes = keep
        return empty

    def finish(self, manifest: dict) -> dict:
        """Write the last shards and manifest.json (`manifest` plus classes, splits, image_shape and the
        dataset_version); return the whole manifest."""
        for split in self.buffers:
            self._flush(split)
        self.items.close()
        manifest = {**manifest, "dataset_version": self.version(), "image_shape": list(self.shape),
                    "classes": self.classes, "splits": self.splits, "items": ITEMS}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    def close(self) -> None:
        self.items.close()

    def version(self) -> str:
        """Hash of what training sees, independent of data.path, origins and data.shard_size: image
        shape, classes, split sizes and, per split in order, each item's label and pixels."""
        digest = hashlib.sha256()
        counts = {name: info["count"] for name, info in self.splits.items()}
        digest.update(json.dumps({"image_shape": list(self.shape), "classes": self.classes, "splits": counts}).encode())
        for name in self.splits:
            digest.update(f"\n{name} {self.digests[name].hexdigest()}".encode())
        return digest.hexdigest()[:16]


def _json_fields(item: dict) -> str:
    """The item's fields but sha256 as json.dumps writes them inside a dict, each after ", "."""
    return "".join(f", {_json_string(key)}: {_json_string(value) if isinstance(value, str) else json.dumps(value)}"
                   for key, value in item.items() if key != "sha256")


def swap_in(tmp: Path, out_dir: Path) -> None:
    """Put the finished tmp folder at out_dir; the old one is deleted only once the new one is in place."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "data")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "data", out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pack_dataset(raw: RawDataset, out_dir: Path, cfg: DataConfig, source_info: dict) -> dict:
    """Write raw (decoded arrays, splits given) into out_dir atomically (all or nothing) and return the
    summary counts."""
    from components.data.report import IngestReport

    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    _check(raw, shape)
    with staged_dir(out_dir, DATASET_MODE) as tmp:
        writer = DatasetWriter(tmp, list(raw.classes), shape, cfg.shard_size, tuple(raw.splits))
        report = IngestReport(tmp, list(raw.classes))
        try:
            for name, split in raw.splits.items():
                for pixels, label, origin in zip(split.images, split.labels, split.origins):
                    writer.add(name, np.ascontiguousarray(pixels), int(label), {"origin": origin})
                    report.accepted(raw.classes[label], pixels, shape)
            for rejection in raw.rejected:
                report.reject(rejection["origin"], rejection["reason"])
            manifest = writer.finish({"name": cfg.name, "source": dict(source_info), "rejected": REJECTED,
                                      "config": cfg.model_dump(mode="json", exclude={"path"})})
        finally:
            writer.close()
            report.close()
        report.write(manifest)
        return write_summary(tmp, manifest, report.rejected)


def write_summary(folder: Path, manifest: dict, rejected: int) -> dict:
    """summary.json, the ingest stage's DVC metrics: flat counts."""
    summary = {f"items_{name}": info["count"] for name, info in manifest["splits"].items()}
    summary |= {"rejected": rejected, "num_classes": len(manifest["classes"])}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


@contextmanager
def staged_dir(out_dir: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder that replaces out_dir only if the block succeeds; out_dir is left as it
    was otherwise. `mode`: the folder's permissions (mkdtemp makes it private).

    Temp names are `.{name}.tmp-*` and `.{name}.old-*` beside out_dir: what a killed run leaves
    there is swept at the next start (components.workspace.sweep_stale).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
        swap_in(tmp, out_dir)  # the old folder goes only once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DATASET_MODE = 0o755  # a dataset folder is readable by all, as a plain mkdir makes it


def read_items(dataset_dir: str | Path) -> list[dict]:
    """Every packed item's record (items.jsonl), in the order they were written."""
    return read_jsonl(Path(dataset_dir) / ITEMS)


def read_rejected(dataset_dir: str | Path) -> list[dict]:
    """Every file the ingest left out, with its reason (rejected.jsonl)."""
    return read_jsonl(Path(dataset_dir) / REJECTED)


def read_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{dataset_dir}: no packed dataset ({MANIFEST} missing); run `genpipe ingest` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run `genpipe ingest` again") from None


def dataset_version(dataset_dir: str | Path) -> str:
    """The packed dataset's content hash (DatasetWriter.version): the one dataset version for lineage."""
    manifest = read_manifest(dataset_dir)
    if "dataset_version" not in manifest:
        raise DataError(
            f"{Path(dataset_dir) / MANIFEST}: no \"dataset_version\" (packed by an older genpipe); "
            "re-run `genpipe ingest`"
        )
    return manifest["dataset_version"]


def load_split(dataset_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of one split: (uint8 N×C×H×W, int64 N) tensors, in manifest order."""
    import torch  # here: the ingest, which only writes datasets, starts without it

    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{dataset_dir}: no split {split!r}; it has: {', '.join(manifest['splits'])}")
    info = manifest["splits"][split]
    images, labels = [], []
    for shard in info["shards"]:
        path = dataset_dir / shard
        if not path.is_file():
            raise DataError(f"{path}: shard missing; run `genpipe ingest` again")
        with np.load(path, allow_pickle=False) as data:
            images.append(data["images"])
            labels.append(data["labels"])
    if not images:
        return torch.zeros((0, *manifest["image_shape"]), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    x, y = np.concatenate(images), np.concatenate(labels)
    if len(x) != info["count"] or len(y) != info["count"]:
        raise DataError(f"{dataset_dir}: split {split!r} has {len(x)} items, manifest says {info['count']}")
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64, copy=False))

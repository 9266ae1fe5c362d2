"""Packed dataset on disk: .npz shards per split, manifest.json (lineage), summary.json (DVC metrics).

Layout of a dataset folder:
    {split}-{k:03d}.npz   arrays `images` (uint8 N×C×H×W) and `labels` (int64 N), ≤ data.shard_size items
    manifest.json         dataset_version, classes, splits, one entry per item (shard, index, sha256, origin),
                          rejections, config
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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from components.data.sources import DataError, RawDataset

if TYPE_CHECKING:
    from components.config import DataConfig

MANIFEST = "manifest.json"
SUMMARY = "summary.json"


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


def _write_json(path: Path, manifest: dict) -> None:
    # One item per line: readable, and a fraction of the size of fully indented JSON for 70k items.
    items = manifest["items"]
    head = json.dumps({k: v for k, v in manifest.items() if k != "items"}, indent=2)
    body = ",\n".join("    " + json.dumps(item) for item in items)
    path.write_text(head[: -len("\n}")] + ',\n  "items": [\n' + body + "\n  ]\n}\n")


def _write_split(tmp: Path, name: str, raw: RawDataset, shard_size: int) -> tuple[dict, list[dict]]:
    split = raw.splits[name]
    shards, items = [], []
    for start in range(0, len(split), shard_size):
        shard = f"{name}-{len(shards):03d}.npz"
        images = np.ascontiguousarray(split.images[start : start + shard_size])
        labels = split.labels[start : start + shard_size].astype(np.int64)
        np.savez(tmp / shard, images=images, labels=labels)
        shards.append(shard)
        for index, (pixels, label) in enumerate(zip(images, labels)):
            items.append({
                "split": name,
                "shard": shard,
                "index": index,
                "label": int(label),
                "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                "origin": split.origins[start + index],
            })
    counts = np.bincount(split.labels, minlength=len(raw.classes))
    info = {
        "count": len(split),
        "shards": shards,
        "class_counts": {c: int(n) for c, n in zip(raw.classes, counts)},
    }
    return info, items


def _content_version(shape: tuple[int, int, int], classes: list[str], splits: dict, items: list[dict]) -> str:
    """Hash of what training sees, independent of data.path, origins and data.shard_size."""
    digest = hashlib.sha256()
    counts = {name: info["count"] for name, info in splits.items()}
    digest.update(json.dumps({"image_shape": list(shape), "classes": classes, "splits": counts}).encode())
    for item in items:  # split by split, in the order load_split returns them
        digest.update(f"\n{item['split']} {item['label']} {item['sha256']}".encode())
    return digest.hexdigest()[:16]


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
    """Write raw into out_dir atomically (all or nothing) and return the summary counts."""
    out_dir = Path(out_dir)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    _check(raw, shape)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset folder should not be
        splits, items = {}, []
        for name in raw.splits:
            splits[name], split_items = _write_split(tmp, name, raw, cfg.shard_size)
            items += split_items
        manifest = {
            "name": cfg.name,
            "dataset_version": _content_version(shape, list(raw.classes), splits, items),
            "source": dict(source_info),
            "image_shape": list(shape),
            "classes": list(raw.classes),
            "splits": splits,
            "rejected": [{"origin": r["origin"], "reason": r["reason"]} for r in raw.rejected],
            "config": cfg.model_dump(mode="json", exclude={"path"}),
            "items": items,
        }
        summary = {f"items_{name}": info["count"] for name, info in splits.items()}
        summary |= {"rejected": len(raw.rejected), "num_classes": len(raw.classes)}
        _write_json(tmp / MANIFEST, manifest)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def read_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{dataset_dir}: no packed dataset ({MANIFEST} missing); run `genpipe ingest` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run `genpipe ingest` again") from None


def dataset_version(dataset_dir: str | Path) -> str:
    """The packed dataset's content hash (see _content_version): the one dataset version for lineage."""
    manifest = read_manifest(dataset_dir)
    if "dataset_version" not in manifest:
        raise DataError(
            f"{Path(dataset_dir) / MANIFEST}: no \"dataset_version\" (packed by an older genpipe); "
            "re-run `genpipe ingest`"
        )
    return manifest["dataset_version"]


def load_split(dataset_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of one split: (uint8 N×C×H×W, int64 N) tensors, in manifest order."""
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

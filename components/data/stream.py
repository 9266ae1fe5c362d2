"""The ingest of file sources, streamed: files read one by one, decoded in a process pool, duplicates
dropped, the split decided by content, and the dataset written shard by shard.

Memory is bounded whatever the number of files: a few shards being filled and the decode window
(WINDOW_PER_WORKER chunks of at most CHUNK_BYTES of pixels per process), and 16 bytes per distinct image for finding
duplicates (seen.py). Results come back in the source's order, so the dataset is the
same whatever the number of processes.

The split is a function of the decoded pixels (their sha256), so pixel-identical files, and
byte-identical ones, always fall in the same split: no duplicate can sit in both train and test.
Each distinct image is kept once, the first in the source's order; the others are reported with
the file they duplicate.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from components.data.items import FileItem, Listing, Skipped, TooLarge
from components.data.seen import SeenImages
from components.data.sources import DataError
from components.data.validate import DecodeRules, ImageRejected, decode_image_bytes

if TYPE_CHECKING:
    from components.config import DataConfig
    from components.data.pack import DatasetWriter
    from components.data.report import IngestReport

CHUNK = 256  # files per task sent to a decode process, at most: fewer tasks, less overhead per file
CHUNK_BYTES = 1 << 20  # of decoded pixels per task, at most: large images make smaller tasks
WINDOW_PER_WORKER = 4  # tasks in flight per process: keeps each busy while bounding memory
POOL_AFTER = 1024  # files decoded in this process before the pool starts (~0.3 s per process)


def decode_processes() -> int:
    """One decode process per core this process may use: the cores it may run on, and no more than
    its container's CPU quota (cgroup v2 cpu.max), which a pod on a large node is held to."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def split_of(pixels_sha256: str, test_fraction: float) -> str:
    """Deterministic by content: the same image lands in the same split on every machine and rerun,
    adding files never moves existing ones, and duplicates never straddle the split."""
    return "test" if int(pixels_sha256[:8], 16) / 2**32 < test_fraction else "train"


_RULES: DecodeRules | None = None  # a decode process's copy of the data params it needs


def _start_decoder(rules: DecodeRules) -> None:
    global _RULES
    _RULES = rules


def decode(data: bytes, cfg: DataConfig | DecodeRules) -> tuple:
    """(bytes sha256, pixels or None, pixels sha256, note, rejection reason) of one file's bytes; the
    pixels as the bytes of a C×H×W uint8 array (a tenth of an array's cost to pass between processes)."""
    bytes_sha = hashlib.sha256(data).hexdigest()
    try:
        pixels, note = decode_image_bytes(data, cfg)
    except ImageRejected as exc:
        return bytes_sha, None, None, None, exc.reason
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one crafted file costs that file, not the ingest
        return bytes_sha, None, None, None, f"cannot decode: {type(exc).__name__}: {exc}"
    return bytes_sha, pixels, hashlib.sha256(pixels).hexdigest(), note, None


def read_and_decode(read, cfg: DataConfig | DecodeRules) -> tuple:
    """decode() of what `read` returns; an unreadable file is a rejection, SourceUnavailable propagates."""
    try:
        data = read()
    except TooLarge as exc:
        return None, None, None, None, str(exc)
    except OSError as exc:
        return None, None, None, None, f"unreadable: {exc}"
    return decode(data, cfg)


def _decode_chunk(reads: list) -> list[tuple]:
    return [read_and_decode(read, _RULES) for read in reads]


def _files(entries: Iterable[FileItem | Skipped], report: IngestReport) -> Iterator[FileItem]:
    """The candidate files, in order; what the source refused goes to the report."""
    for entry in entries:
        if isinstance(entry, Skipped):
            report.reject(entry.origin, entry.reason)
        else:
            yield entry


def chunk_files(cfg: DataConfig) -> int:
    """Files per task: CHUNK, fewer when their pixels would pass CHUNK_BYTES."""
    return max(1, min(CHUNK, CHUNK_BYTES // (cfg.channels * cfg.image_size ** 2)))


def decoded(files: Iterator[FileItem], cfg: DataConfig, processes: int) -> Iterator[list[tuple]]:
    """Chunks of (item, bytes sha256, pixels, pixels sha256, note, reason) per file, in the files' order.
    The decode processes read the files themselves (FileItem.read is picklable), so this process only
    places the results. The first POOL_AFTER files are done here: a small source never pays for the
    processes."""
    files = iter(files)
    size = chunk_files(cfg)
    chunks = iter(lambda: list(islice(files, size)), [])
    for chunk in islice(chunks, -(-POOL_AFTER // size) if processes > 1 else None):
        yield [(item, *read_and_decode(item.read, cfg)) for item in chunk]
    if processes <= 1:
        return
    # spawn: the decode processes start clean, whatever threads (Prefect, MLflow) the parent holds.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_decoder,
                             initargs=(DecodeRules.of(cfg),)) as pool:
        started = pool.submit(int)  # fails only if no process could start
        pending: deque = deque()  # (items, future) per chunk in flight, oldest first
        for chunk in chunks:
            pending.append((chunk, pool.submit(_decode_chunk, [item.read for item in chunk])))
            if len(pending) >= processes * WINDOW_PER_WORKER:
                yield _results(*pending.popleft(), started)
        while pending:
            yield _results(*pending.popleft(), started)


def _results(items: list[FileItem], future, started) -> list[tuple]:
    try:
        results = future.result()
    except BrokenProcessPool:
        if started.exception() is not None:
            raise DataError("the decode processes could not start. They start with multiprocessing's spawn, which "
                            "imports the script that called the ingest: call it under "
                            "`if __name__ == \"__main__\":` (the child's traceback above says more)") from None
        # A decode process died: killed for memory, or a decoder crashed on a file.
        raise DataError(f"a decode process died while decoding {len(items)} files from {items[0].origin} to "
                        f"{items[-1].origin}; if it was killed for memory, give the ingest more, else one of "
                        f"these files crashes the image decoder: remove it") from None
    return [(item, *result) for item, result in zip(items, results)]


def ingest_files(listing: Listing, cfg: DataConfig, writer: DatasetWriter, report: IngestReport,
                 processes: int | None = None) -> None:
    """Every file of the listing into the writer or the report (nothing found is lost)."""
    label_of = {name: k for k, name in enumerate(listing.classes)}
    files = _files(listing.entries, report)
    with tempfile.TemporaryDirectory(prefix="genpipe-ingest-") as scratch:
        seen = SeenImages(Path(scratch))
        try:
            for chunk in decoded(files, cfg, processes or decode_processes()):
                _place(chunk, cfg=cfg, label_of=label_of, seen=seen, writer=writer, report=report)
        finally:
            seen.close()


def _place(chunk: list[tuple], *, cfg: DataConfig, label_of: dict[str, int], seen: SeenImages,
           writer: DatasetWriter, report: IngestReport) -> None:
    """A chunk of decoded files into the dataset, or into the report with why not, in order. One loop,
    no call per file: at a million files every call counts."""
    met = seen.met([pixels_sha for _, _, _, pixels_sha, _, reason in chunk if reason is None])
    firsts = []
    limit = cfg.limit_per_split
    for item, bytes_sha, pixels, pixels_sha, note, reason in chunk:
        if reason is not None:
            report.reject(item.origin, reason)
            continue
        split = split_of(pixels_sha, cfg.test_fraction)
        if limit is not None and writer.count(split) >= limit:
            report.reject(item.origin, f"left out: data.limit_per_split {limit} reached in {split}")
            continue
        if pixels_sha in met:
            _report_duplicate(item, bytes_sha, *met[pixels_sha], report)
            continue
        met[pixels_sha] = (item.origin, bytes_sha, item.label)
        firsts.append((pixels_sha, bytes_sha, item.origin, item.label))
        record = {"origin": item.origin, "sha256": pixels_sha, "bytes_sha256": bytes_sha}
        if note is not None:
            record["note"] = note
            report.note(item.origin, note)
        writer.add(split, pixels, label_of[item.label], record)
        report.accepted(item.label, pixels, writer.shape)
    seen.add(firsts)


def _report_duplicate(item: FileItem, bytes_sha: str, first_origin: str, first_bytes: str, first_label: str,
                      report: IngestReport) -> None:
    kind = "exact duplicate (same bytes)" if first_bytes == bytes_sha else \
        "pixel-identical duplicate (same decoded pixels)"
    conflict = "" if first_label == item.label else f", which is labelled {first_label!r}, not {item.label!r}"
    report.reject(item.origin, f"{kind} of {first_origin}{conflict}: kept once", duplicate_of=first_origin)

"""The distinct images an ingest has met, for finding duplicates: a few bytes of memory per image.

What a duplicate's report needs of the image it duplicates (its pixels' and bytes' sha256, origin,
class) is appended to an SQLite file, in the order met, so every write is an append. In memory
sit only an 8-byte prefix of each image's pixels sha256 and its row in that file, in sorted arrays
merged as they grow (a log-structured merge: O(log n) arrays): 16 bytes per distinct image, where
a B-tree keyed by the hash, or a Python dict, would cost 100 or more and a random write each.
Lookups take a whole chunk of files at once; a prefix match is confirmed on the full hash, so two
images sharing a prefix are still told apart.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

PARAMETERS = 500  # per SQLite query: old builds allow at most 999


def _prefixes(pixels_shas: list[str]) -> np.ndarray:
    return np.fromiter((int(sha[:16], 16) for sha in pixels_shas), dtype=np.uint64, count=len(pixels_shas))


class SeenImages:
    def __init__(self, folder: Path):
        self.db = sqlite3.connect(folder / "seen.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("CREATE TABLE seen (row INTEGER PRIMARY KEY, pixels TEXT, bytes TEXT, origin TEXT, label TEXT)")
        self.db.execute("BEGIN")
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted prefixes, their rows), largest first
        self.count = 0

    def met(self, pixels_shas: list[str]) -> dict[str, tuple[str, str, str]]:
        """Of these pixel hashes, those met before: each with the origin first met with them, its bytes
        sha256 and its class."""
        if not pixels_shas or not self.levels:
            return {}
        prefixes = np.sort(_prefixes(pixels_shas))  # sorted needles: searchsorted walks the array once
        rows = []
        for keys, key_rows in self.levels:
            first = np.searchsorted(keys, prefixes)
            hits = first[keys[np.minimum(first, len(keys) - 1)] == prefixes]
            for start in hits.tolist():  # rare: a duplicate, or two images sharing a prefix
                stop = start
                while stop < len(keys) and keys[stop] == keys[start]:
                    stop += 1
                rows.extend(key_rows[start:stop].tolist())
        wanted, found = set(pixels_shas), {}
        for start in range(0, len(rows), PARAMETERS):
            batch = rows[start:start + PARAMETERS]
            for pixels, first_bytes, origin, label in self.db.execute(
                    f"SELECT pixels, bytes, origin, label FROM seen WHERE row IN ({', '.join('?' * len(batch))})",
                    batch):
                if pixels in wanted:  # not merely the same prefix
                    found[pixels] = (origin, first_bytes, label)
        return found

    def add(self, firsts: list[tuple[str, str, str, str]]) -> None:
        """Record (pixels sha256, bytes sha256, origin, class) of images met for the first time."""
        if not firsts:
            return
        rows = np.arange(self.count, self.count + len(firsts), dtype=np.int64)
        self.db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?, ?)",
                            ((row, *first) for row, first in zip(rows.tolist(), firsts)))
        self.count += len(firsts)
        self.levels.append(self._sorted(_prefixes([pixels for pixels, _, _, _ in firsts]), rows))
        while len(self.levels) > 1 and len(self.levels[-2][0]) <= 2 * len(self.levels[-1][0]):
            (small_keys, small_rows), (keys, key_rows) = self.levels.pop(), self.levels.pop()
            self.levels.append(self._sorted(np.concatenate([keys, small_keys]), np.concatenate([key_rows, small_rows])))

    @staticmethod
    def _sorted(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(keys, kind="stable")
        return keys[order], rows[order]

    def close(self) -> None:
        self.db.close()

"""The ingest step: read the configured source, report what was rejected, pack the rest."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from components.data.pack import MANIFEST, pack_dataset
from components.data.sources import SOURCES, DataError, RawDataset

if TYPE_CHECKING:
    from components.config import DataConfig

SHOWN_REJECTIONS = 10


def _report(raw: RawDataset, cfg: DataConfig, log: Callable[[str], None]) -> None:
    counts = ", ".join(f"{name} {len(split)}" for name, split in raw.splits.items())
    log(f"ingest {cfg.source} from {cfg.path}: {counts} items, {len(raw.classes)} classes, "
        f"{len(raw.rejected)} rejected")
    for item in raw.rejected[:SHOWN_REJECTIONS]:
        log(f"  rejected {item['origin']}: {item['reason']}")
    if len(raw.rejected) > SHOWN_REJECTIONS:
        log(f"  ... and {len(raw.rejected) - SHOWN_REJECTIONS} more")


def ingest(cfg: DataConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Build the dataset described by cfg into out_dir; return the summary counts (also summary.json).

    Raises DataError when the source is unusable or no training image survives validation; out_dir
    is then left as it was.
    """
    out_dir = Path(out_dir)
    raw = SOURCES.get(cfg.source)(cfg)
    _report(raw, cfg, log)
    train = raw.splits.get("train")
    if train is None or len(train) == 0:
        raise DataError(
            f"no valid training images in {cfg.path}; {len(raw.rejected)} rejected, see the report above"
        )
    summary = pack_dataset(raw, out_dir, cfg, {"name": cfg.source})
    log(f"packed {out_dir}")
    if raw.rejected:
        log(f"every rejection with its reason is listed in {out_dir / MANIFEST} under \"rejected\"")
    return summary

"""The ingest step: read the configured source, pack what is usable, report everything else."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from components.data.items import IMAGE_EXTENSIONS, Listing, SourceUnavailable
from components.data.pack import DATASET_MODE, REJECTED, DatasetWriter, pack_dataset, staged_dir, write_summary
from components.data.sources import SOURCES, DataError, RawDataset

if TYPE_CHECKING:
    from components.config import DataConfig


def ingest(cfg: DataConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Build the dataset described by cfg into out_dir; return the summary counts (also summary.json).

    Raises DataError when the source is unusable or no training image survives validation; out_dir
    is then left as it was.
    """
    try:
        source = SOURCES.get(cfg.source)(cfg)
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # the sources' own errors name data.path and what to do
        raise DataError(str(exc)) from None
    if isinstance(source, Listing):
        try:
            return _ingest_files(source, cfg, Path(out_dir), log)
        except SourceUnavailable as exc:
            raise DataError(f"{exc}; nothing was packed, the previous dataset is as it was: run the ingest "
                            f"again") from None
    return _ingest_decoded(source, cfg, Path(out_dir), log)


def _ingest_files(listing: Listing, cfg: DataConfig, out_dir: Path, log: Callable[[str], None]) -> dict:
    from components.data.report import CONTACT_SHEET, REPORT, IngestReport, summary_lines
    from components.data.stream import ingest_files

    if not listing.classes:
        raise DataError(f"{cfg.path}: no class folders holding images; expected one folder (or prefix) per class "
                        f"holding {', '.join(sorted(IMAGE_EXTENSIONS))} files")
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    with staged_dir(out_dir, DATASET_MODE) as tmp:
        writer = DatasetWriter(tmp, listing.classes, shape, cfg.shard_size)
        report = IngestReport(tmp, listing.classes)
        try:
            ingest_files(listing, cfg, writer, report)
            for name in writer.drop_empty_classes():
                report.warn(f"class {name!r}: none of its files could be used; left out of the class list")
            if writer.count("train") == 0:
                raise DataError(f"no valid training images in {cfg.path}; {report.rejected} left out, by reason: "
                                f"{dict(report.by_reason)}")
            manifest = writer.finish({"name": cfg.name, "source": {"name": cfg.source, **listing.source_info},
                                      "rejected": REJECTED,
                                      "config": cfg.model_dump(mode="json", exclude={"path"})})
        finally:
            writer.close()
            report.close()
        summary_report = report.write(manifest)
        summary = write_summary(tmp, manifest, report.rejected)
    for line in summary_lines(cfg.source, cfg.path, manifest, summary_report):
        log(line)
    log(f"packed {out_dir}; every file left out, with its reason: {out_dir / REJECTED}, "
        f"the report: {out_dir / REPORT}, {out_dir / CONTACT_SHEET}")
    return summary


def _ingest_decoded(raw: RawDataset, cfg: DataConfig, out_dir: Path, log: Callable[[str], None]) -> dict:
    counts = ", ".join(f"{name} {len(split)}" for name, split in raw.splits.items())
    log(f"ingest {cfg.source} from {cfg.path}: {counts} items, {len(raw.classes)} classes, "
        f"{len(raw.rejected)} rejected")
    train = raw.splits.get("train")
    if train is None or len(train) == 0:
        raise DataError(f"no valid training images in {cfg.path}; {len(raw.rejected)} rejected")
    summary = pack_dataset(raw, out_dir, cfg, {"name": cfg.source})
    log(f"packed {out_dir}")
    return summary

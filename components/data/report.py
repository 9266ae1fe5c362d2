"""The ingest report, for people: what was left out and why, duplicates, class counts per split, a
contact sheet of accepted images per class; written beside the dataset and summarised in a few lines.

Every file left out goes to rejected.jsonl as it is found (so the report's memory does not grow with
the dataset); the report keeps counts by reason and the first few images of each class.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from components.data.pack import REJECTED

REPORT = "report.json"
CONTACT_SHEET = "contact_sheet.png"
SHEET_PER_CLASS = 8  # images per class on the contact sheet
SHOWN = 10  # rejections and notes listed by name in report.json and on the command line


def category(reason: str) -> str:
    """A reason without its particulars: "truncated or corrupt: image file is truncated" → "truncated or
    corrupt"; what the report counts by."""
    return reason.split(":")[0].split(" (")[0].split(" of ")[0].strip()


class IngestReport:
    def __init__(self, folder: Path, classes: list[str]):
        self.folder, self.classes = Path(folder), list(classes)
        self._rejected = open(self.folder / REJECTED, "w")
        self.by_reason: Counter = Counter()
        self.first_rejected: list[dict] = []
        self.notes: list[dict] = []
        self.note_count = 0
        self.warnings: list[str] = []
        self.sheet: dict[str, list[np.ndarray]] = {name: [] for name in self.classes}

    def reject(self, origin: str, reason: str, duplicate_of: str | None = None) -> None:
        record = {"origin": origin, "reason": reason}
        if duplicate_of is not None:
            record["duplicate_of"] = duplicate_of
        self._rejected.write(json.dumps(record) + "\n")
        self.by_reason[category(reason)] += 1
        if len(self.first_rejected) < SHOWN:
            self.first_rejected.append(record)

    def note(self, origin: str, note: str) -> None:
        """Something a person should know about a file that was kept (which frame was taken)."""
        self.note_count += 1
        if len(self.notes) < SHOWN:
            self.notes.append({"origin": origin, "note": note})

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def accepted(self, label: str, pixels: np.ndarray | bytes, shape: tuple[int, int, int]) -> None:
        """An image kept, as an array or the bytes of a uint8 array of that shape."""
        if len(self.sheet[label]) < SHEET_PER_CLASS:
            self.sheet[label].append(np.frombuffer(pixels, dtype=np.uint8).reshape(shape)
                                     if isinstance(pixels, bytes) else pixels)

    @property
    def rejected(self) -> int:
        return sum(self.by_reason.values())

    def close(self) -> None:
        self._rejected.close()

    def write(self, manifest: dict) -> dict:
        """report.json and contact_sheet.png into the dataset folder; returns the report."""
        self.close()
        duplicates = sum(n for reason, n in self.by_reason.items() if "duplicate" in reason)
        report = {
            "classes": manifest["classes"],
            "class_counts": {split: info["class_counts"] for split, info in manifest["splits"].items()},
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
            "duplicates": duplicates,
            "first_rejected": self.first_rejected,
            "notes": self.note_count,
            "first_notes": self.notes,
            "warnings": self.warnings,
            "every_rejection": REJECTED,
            "contact_sheet": CONTACT_SHEET,
        }
        (self.folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        contact_sheet({name: self.sheet.get(name, []) for name in manifest["classes"]}).save(self.folder / CONTACT_SHEET)
        return report


def contact_sheet(per_class: dict[str, list[np.ndarray]], pad: int = 2, label_width: int = 110) -> Image.Image:
    """One row per class: its name, then its images (uint8 C×H×W) side by side."""
    shapes = [image.shape for images in per_class.values() for image in images]
    channels, h, w = shapes[0] if shapes else (1, 28, 28)
    mode = "L" if channels == 1 else "RGB"
    rows = max(1, len(per_class))
    sheet = Image.new(mode, (label_width + SHEET_PER_CLASS * (w + pad), rows * (h + pad)), 255 if mode == "L" else (255,) * 3)
    draw = ImageDraw.Draw(sheet)
    for row, (name, images) in enumerate(per_class.items()):
        top = row * (h + pad)
        draw.text((2, top + max(0, h // 2 - 6)), name[:18], fill=0 if mode == "L" else (0, 0, 0))
        for col, image in enumerate(images):
            tile = Image.fromarray(image[0] if channels == 1 else image.transpose(1, 2, 0), mode)
            sheet.paste(tile, (label_width + col * (w + pad), top))
    return sheet


def summary_lines(source: str, path: str, manifest: dict, report: dict) -> list[str]:
    """The ingest on the command line: counts, the main reasons, the first few files left out."""
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    lines = [f"ingest {source} from {path}: {counts} items, {len(manifest['classes'])} classes, "
             f"{report['rejected']} left out ({report['duplicates']} duplicates)"]
    for reason, n in report["rejected_by_reason"].items():
        lines.append(f"  {n:>7}  {reason}")
    for item in report["first_rejected"]:
        lines.append(f"  left out {item['origin']}: {item['reason']}")
    if report["rejected"] > len(report["first_rejected"]):
        lines.append(f"  ... and {report['rejected'] - len(report['first_rejected'])} more")
    for item in report["first_notes"]:
        lines.append(f"  note {item['origin']}: {item['note']}")
    lines += [f"  warning: {text}" for text in report["warnings"]]
    return lines

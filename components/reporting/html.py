"""A self-contained HTML page: every picture is embedded as a data: URI and every chart is inline
SVG, so the one file opens anywhere, offline, and can be attached or logged as it is."""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 10px; text-align: left; }
tr:nth-child(even) { background: #f5f5f5; } .note { color: #666; font-size: 0.9em; }
figure { display: inline-block; margin: 0 1.5em 1em 0; vertical-align: top; }
figure img { image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; color: #444; max-width: 520px; }
"""


@dataclass
class Picture:
    caption: str
    png: bytes
    width: int  # display width in CSS pixels (small images are scaled up, pixelated)


@dataclass
class Section:
    title: str
    note: str = ""
    table: list[tuple[str, str]] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)
    charts: list[tuple[str, dict[str, list[tuple[float, float]]]]] = field(default_factory=list)


def render(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            body.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.table:
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in section.table)
            body.append(f"<table>{rows}</table>")
        for picture in section.pictures:
            data = base64.b64encode(picture.png).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" width="{picture.width}" '
                        f'alt="{html.escape(picture.caption)}"><figcaption>{html.escape(picture.caption)}'
                        f"</figcaption></figure>")
        for name, series in section.charts:
            body.append(f"<figure>{line_chart(series)}<figcaption>{html.escape(name)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def line_chart(series: dict[str, list[tuple[float, float]]], width: int = 480, height: int = 220) -> str:
    """Inline SVG: one polyline per named series of (x, y) points, on shared axes with their ranges
    written at the corners; non-finite points are left out."""
    points = {name: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for name, pts in series.items()}
    every = [p for pts in points.values() for p in pts]
    if not every:
        return f'<svg width="{width}" height="{height}"><text x="10" y="20">no data</text></svg>'
    x0, x1 = min(x for x, _ in every), max(x for x, _ in every)
    y0, y1 = min(y for _, y in every), max(y for _, y in every)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 56  # room for the axis numbers

    def at(x: float, y: float) -> str:
        return f"{pad + (x - x0) / (x1 - x0) * (width - 2 * pad):.1f},{height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad):.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#bbb"/>',
             f'<text x="{pad}" y="{height - pad + 14}">{x0:.4g}</text>',
             f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="end">{x1:.4g}</text>',
             f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{y0:.4g}</text>',
             f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.4g}</text>']
    for i, (name, pts) in enumerate(points.items()):
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                     f'points="{" ".join(at(x, y) for x, y in pts)}"/>')
        parts.append(f'<text x="{pad + 6 + 110 * i}" y="{pad - 8}" fill="{colour}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"

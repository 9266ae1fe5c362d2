"""Decode one image file as a uint8 C×H×W array, or reject it with a reason a person can act on.

PNG, JPEG, GIF, BMP, WebP and TIFF decode alike. A file of several frames (an animated GIF or
WebP, a multi-page TIFF) gives its first frame, and says so. Checks, in order: the header decodes; width*height from the header is at most data.max_pixels
(checked before any pixel is decoded, so a decompression bomb costs nothing); the file is complete
(PIL's verify() on one open, then a full load() on a fresh one; a plain PNG is checked
and decoded in one pass instead, see png.py); the EXIF orientation is applied;
the mode and size rules below. Any error while converting rejects that one image.

Mode rule: the result has data.channels channels, "L" (grayscale) for 1 and "RGB" for 3. Images
with an alpha channel are composited on black first; palette images go through RGB (or RGBA when
the palette has transparency), so a transparent palette entry also ends up black. 16-bit grayscale
is scaled to 8 bits (value >> 8); PIL's own conversion would clip it.

Size rule: an image must be data.image_size × data.image_size. With data.resize true, other sizes
are scaled (bicubic) so the shorter side equals image_size and then centre-cropped; with
data.resize false they are rejected.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from components.data.png import CorruptPng, decode_plain_png

if TYPE_CHECKING:
    from components.config import DataConfig

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
EXIF_FORMATS = {"JPEG", "MPO", "TIFF", "WEBP"}  # formats whose orientation may sit outside img.info["exif"]


class DecodeRules(NamedTuple):
    """The data params decoding follows (DataConfig has them too): a decode process gets only these,
    so it never imports the config's modules."""
    max_pixels: int
    channels: int
    image_size: int
    resize: bool

    @classmethod
    def of(cls, cfg: DataConfig) -> DecodeRules:
        return cls(cfg.max_pixels, cfg.channels, cfg.image_size, cfg.resize)


class ImageRejected(Exception):
    """An image that cannot be used; `reason` says why, in words meant for the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _open(path: Path | io.BytesIO) -> Image.Image:
    # PIL's own bomb check runs inside Image.open; turn its warning into an error so both
    # its levels (warning above MAX_IMAGE_PIXELS, error above twice that) become a rejection.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(f"decompression bomb: {exc}") from None
        except Image.UnidentifiedImageError:  # its message names the file object, which says nothing
            raise ImageRejected("not a decodable image: no image format recognised") from None
        except Exception as exc:  # OSError, SyntaxError from broken headers
            raise ImageRejected(f"not a decodable image: {exc}") from None


def _check_header(data: bytes, max_pixels: int) -> None:
    with _open(io.BytesIO(data)) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageRejected(f"decompression bomb: {w}x{h} = {w * h} pixels > data.max_pixels {max_pixels}")
        if w == 0 or h == 0:
            raise ImageRejected(f"not a decodable image: empty size {w}x{h}")
        try:
            img.verify()
        except Exception as exc:
            raise ImageRejected(f"truncated or corrupt: {exc}") from None


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grayscale PNGs open as I;16 or I
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    elif img.mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (0, 0, 0))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img.convert("L" if channels == 1 else "RGB")


def _fit(img: Image.Image, size: int, resize: bool) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if not resize:
        raise ImageRejected(f"size {w}x{h}, expected {size}x{size} (set data.resize: true to resize)")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: str | Path, cfg: DataConfig | DecodeRules) -> np.ndarray:
    """Decode, check and convert one image file; raise ImageRejected with the reason if unusable."""
    return decode_image(Path(path).read_bytes(), cfg)[0]


def decode_image(data: bytes, cfg: DataConfig | DecodeRules) -> tuple[np.ndarray, str | None]:
    """(pixels, note): the checked and converted image of a file's bytes, and which frame was taken
    when it has several (None otherwise); raise ImageRejected with the reason if unusable."""
    pixels, note = decode_image_bytes(data, cfg)
    return np.frombuffer(pixels, dtype=np.uint8).reshape(cfg.channels, cfg.image_size, cfg.image_size).copy(), note


def decode_image_bytes(data: bytes, cfg: DataConfig | DecodeRules) -> tuple[bytes, str | None]:
    """decode_image's pixels as the bytes of the C×H×W uint8 array (what the ingest passes on)."""
    try:
        plain = decode_plain_png(data, cfg.max_pixels)
    except CorruptPng as exc:
        raise ImageRejected(f"truncated or corrupt: {exc}") from None
    if plain is not None:
        return _pixels(plain, cfg), None
    _check_header(data, cfg.max_pixels)
    note = None
    with _open(io.BytesIO(data)) as img:
        try:
            frames = getattr(img, "n_frames", 1)  # counting them reads every frame: a cut file fails here
            img.seek(0)
            img.load()
        except Exception as exc:
            raise ImageRejected(f"truncated or corrupt: {type(exc).__name__}: {exc}") from None
        if frames > 1:
            note = f"{img.format} of {frames} frames: the first taken"
        try:
            if img.format in EXIF_FORMATS or "exif" in img.info:  # parsing absent EXIF costs ~30 % of a small PNG
                img = ImageOps.exif_transpose(img)  # the picture as a viewer shows it, before the size rule
        except Exception as exc:  # broken metadata costs this file, not the ingest
            raise ImageRejected(f"cannot convert: {type(exc).__name__}: {exc}") from None
        return _pixels(img, cfg), note


def _pixels(img: Image.Image, cfg: DataConfig | DecodeRules) -> bytes:
    """The bytes of the C×H×W uint8 array of a loaded image, after the mode and size rules."""
    if (img.mode == ("L" if cfg.channels == 1 else "RGB") and img.size == (cfg.image_size, cfg.image_size)
            and "transparency" not in img.info):  # the commonest case, without an array (asarray() costs 2x)
        if cfg.channels == 1:
            return img.tobytes()
        return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(*img.size[::-1], 3).transpose(2, 0, 1).tobytes()
    try:
        pixels = np.asarray(_fit(_to_mode(img, cfg.channels), cfg.image_size, cfg.resize), dtype=np.uint8)
    except ImageRejected:
        raise
    except Exception as exc:  # an odd mode costs this file, not the ingest
        raise ImageRejected(f"cannot convert: {type(exc).__name__}: {exc}") from None
    return (pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)).tobytes()

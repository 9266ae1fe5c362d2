"""A fast path for the commonest image file: an 8-bit grey or RGB, non-interlaced PNG with no
palette, transparency, EXIF or animation (what a dataset export writes).

PIL's general path opens such a file twice (verify() must run on a fresh open) and probes it as
every format; for a 28×28 image that is most of the ingest's time. Here the chunks are walked once,
each CRC checked and IEND required (what verify() checks), and the IDAT stream goes to PIL's own
PNG decoder (its "zip" decoder, the one PngImagePlugin uses), so the pixels are PIL's bit for bit.
Anything else, a chunk this path does not know included, returns None: the general path decides.
Stricter than PIL in one way only: an IEND whose CRC is wrong is refused (PIL does not read it).
"""
from __future__ import annotations

import struct
import zlib

from PIL import Image, PngImagePlugin

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODES = {0: "L", 2: "RGB"}  # colour type -> mode, at bit depth 8
# Chunks that do not change the pixels PIL returns and that PIL checks no further; any other (PLTE,
# tRNS, eXIf, acTL, and the compressed zTXt/iTXt/iCCP, whose size PIL bounds) -> general path.
PASSIVE = {b"tEXt", b"pHYs", b"tIME", b"gAMA", b"cHRM", b"sRGB"}


class CorruptPng(Exception):
    """A PNG that fails the checks verify() makes; the message says which."""


def decode_plain_png(data: bytes, max_pixels: int) -> Image.Image | None:
    """The loaded image of a plain PNG (see the module docstring), None when `data` is not one.
    CorruptPng when a chunk is cut or its CRC is wrong, or the pixel data is short or broken. A size
    above max_pixels is left to the general path, before any pixel is decompressed."""
    if not data.startswith(SIGNATURE):
        return None
    view, pos, end = memoryview(data), len(SIGNATURE), len(data)
    header, idat, previous = None, [], b""
    while True:
        if pos + 8 > end:
            raise CorruptPng("truncated: the file ends before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        body_end = pos + 8 + length
        if body_end + 4 > end:
            raise CorruptPng(f"truncated: the file ends inside its {kind!r} chunk")
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(view[pos + 4:body_end]) != crc:
            raise CorruptPng(f"broken PNG: CRC mismatch in its {kind!r} chunk")
        body = view[pos + 8:body_end]
        pos = body_end + 4
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            header = struct.unpack(">IIBBBBB", body)
            width, height, depth, colour, compression, filtering, interlace = header
            if (depth != 8 or colour not in MODES or compression or filtering or interlace
                    or not width or not height):
                return None
            if width * height > min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
                return None  # the general path rejects it as a bomb, with its message
        elif kind == b"IDAT":
            if idat and previous != b"IDAT":  # PIL reads one run of IDAT chunks: the rest is its call
                return None
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind not in PASSIVE or length > PngImagePlugin.MAX_TEXT_CHUNK:
            return None
        previous = kind
    mode = MODES[colour]
    try:
        return Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode)
    except (ValueError, OSError) as exc:  # "not enough image data", "cannot decode image data", zlib errors
        raise CorruptPng(f"broken PNG pixel data: {exc}") from None

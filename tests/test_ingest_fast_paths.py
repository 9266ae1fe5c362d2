"""The ingest's fast paths give what the general ones give: a plain PNG decodes to PIL's own pixels
and fails the checks verify() makes, anything else goes the general way; the duplicate index finds
every image met, across its merges, and tells apart two images that share a hash prefix."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from components.data import validate
from components.data.png import CorruptPng, decode_plain_png
from components.data.seen import SeenImages
from components.data.validate import DecodeRules, ImageRejected, decode_image

RULES = DecodeRules(max_pixels=10_000, channels=1, image_size=16, resize=True)


def png(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


def general_path(data: bytes, rules: DecodeRules) -> np.ndarray:
    """decode_image with the fast path switched off."""
    original = validate.decode_plain_png
    validate.decode_plain_png = lambda data, max_pixels: None
    try:
        return decode_image(data, rules)[0]
    finally:
        validate.decode_plain_png = original


def images(seed: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    smooth = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 7  # rows PNG filters differently
    return {"grey noise": Image.fromarray(grey, "L"), "grey smooth": Image.fromarray(smooth, "L"),
            "rgb": Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB"),
            "large rgb": Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8), "RGB")}


@pytest.mark.parametrize("options", [{}, {"compress_level": 0}, {"compress_level": 9}, {"optimize": True}])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_plain_png_decodes_to_the_general_paths_pixels(options, channels):
    rules = RULES._replace(channels=channels)
    for seed in range(3):
        for name, image in images(seed).items():
            data = png(image, **options)
            assert decode_plain_png(data, rules.max_pixels) is not None, name  # the fast path was taken
            fast, note = decode_image(data, rules)
            assert note is None
            np.testing.assert_array_equal(fast, general_path(data, rules), err_msg=name)


def test_text_chunks_and_a_cut_across_several_idat_chunks_stay_on_the_fast_path():
    image = images(0)["grey noise"]
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made by a test")
    data = png(image, pnginfo=info)
    # Split the one IDAT chunk in two, as large files are written.
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    body = data[start + 8:start + 8 + length]
    halves = b"".join(struct.pack(">I", len(part)) + b"IDAT" + part + struct.pack(">I", zlib.crc32(b"IDAT" + part))
                      for part in (body[:10], body[10:]))
    split = data[:start] + halves + data[start + 12 + length:]
    np.testing.assert_array_equal(np.asarray(decode_plain_png(split, 10_000)), np.asarray(image))


@pytest.mark.parametrize("kind", ["palette", "transparency", "16-bit", "interlaced", "grey+alpha", "jpeg"])
def test_other_files_go_the_general_way(kind):
    image = images(1)["rgb"]
    data = {"palette": lambda: png(image.convert("P")),
            "transparency": lambda: png(image.convert("L"), transparency=7),
            "16-bit": lambda: png(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))),
            "interlaced": lambda: _interlaced(image),
            "grey+alpha": lambda: png(image.convert("LA")),
            "jpeg": lambda: _jpeg(image)}[kind]()
    assert decode_plain_png(data, 10_000) is None
    if kind != "interlaced":  # its flag was set on non-interlaced data: only the way it goes is checked
        np.testing.assert_array_equal(decode_image(data, RULES)[0], general_path(data, RULES))


def _interlaced(image: Image.Image) -> bytes:
    data = bytearray(png(image))
    data[28] = 1  # the IHDR's interlace byte: the flag alone is enough to leave the fast path
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


def test_a_bomb_is_left_to_the_general_path_which_rejects_it_before_decoding():
    data = png(Image.new("L", (200, 200)))
    assert decode_plain_png(data, max_pixels=100 * 100) is None
    with pytest.raises(ImageRejected, match="decompression bomb: 200x200 = 40000 pixels > data.max_pixels 10000"):
        decode_image(data, RULES)


@pytest.mark.parametrize("damage, words", [
    (lambda d: d[:-12], "the file ends before its IEND chunk"),
    (lambda d: d[:d.index(b"IDAT") + 20], "the file ends inside its b'IDAT' chunk"),
    (lambda d: d[:d.index(b"IDAT") + 10] + bytes([d[d.index(b"IDAT") + 10] ^ 1]) + d[d.index(b"IDAT") + 11:],
     "CRC mismatch in its b'IDAT' chunk"),
])
def test_a_cut_or_damaged_png_is_rejected_as_verify_would(damage, words):
    data = damage(png(images(2)["grey noise"]))
    with pytest.raises(CorruptPng, match=words):
        decode_plain_png(data, 10_000)
    with pytest.raises(ImageRejected, match=f"truncated or corrupt: .*{words}"):
        decode_image(data, RULES)


def test_pixel_data_that_does_not_fill_the_image_is_rejected():
    image = images(2)["grey noise"]
    short = zlib.compress(b"\x00" + bytes(16) * 3)  # 3 rows of 16
    ihdr = struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0)
    chunks = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                      for kind, body in ((b"IHDR", ihdr), (b"IDAT", short), (b"IEND", b"")))
    with pytest.raises(CorruptPng, match="broken PNG pixel data"):
        decode_plain_png(b"\x89PNG\r\n\x1a\n" + chunks, 10_000)
    assert decode_plain_png(png(image), 10_000) is not None


def _sha(prefix: int, rest: int) -> str:
    return f"{prefix:016x}{rest:048x}"


def test_the_duplicate_index_finds_every_image_met_across_its_merges(tmp_path):
    seen = SeenImages(tmp_path)
    met = [hashlib.sha256(str(k).encode()).hexdigest() for k in range(3000)]  # prefixes over all of 0..2^64
    for start in range(0, len(met), 100):
        chunk = met[start:start + 100]
        assert seen.met(chunk) == {}  # none met before
        seen.add([(sha, f"{k:064x}", f"a/{start + k}.png", "a") for k, sha in enumerate(chunk)])
    assert len(seen.levels) < 12  # merged as it grew
    again = seen.met(met[::7] + [_sha(5, 5)])
    assert set(again) == set(met[::7])
    assert again[met[14]] == ("a/14.png", f"{14 % 100:064x}", "a")
    seen.close()


def test_two_images_sharing_a_hash_prefix_are_told_apart(tmp_path):
    seen = SeenImages(tmp_path)
    first, twin = _sha(42, 1), _sha(42, 2)  # the same 8-byte prefix, different hashes
    seen.add([(first, "b1", "a/1.png", "a")])
    assert seen.met([twin]) == {}
    seen.add([(twin, "b2", "b/2.png", "b")])
    for _ in range(5):  # pushed through merges
        seen.add([(_sha(int(x), 0), "x", "c/x.png", "c") for x in np.random.default_rng(_).integers(0, 2**62, 50)])
    assert seen.met([first, twin]) == {first: ("a/1.png", "b1", "a"), twin: ("b/2.png", "b2", "b")}
    seen.close()


def test_items_jsonl_lines_are_what_json_dumps_writes(tmp_path):
    from components.data.pack import DatasetWriter

    writer = DatasetWriter(tmp_path, ["a", "b"], (1, 2, 2), shard_size=2)
    odd = ['caf\u00e9/"quoted".png', "a/new\nline\\.png", "b/\u2603 tab\t.png"]
    for k, origin in enumerate(odd):
        item = {"origin": origin, "bytes_sha256": f"{k:064x}", "note": "GIF of 2 frames: the first taken"}
        writer.add("train", bytes([k]) * 4, k % 2, item)
    writer.finish({})
    lines = (tmp_path / "items.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["origin"] for line in lines] == odd
    for line in lines:
        record = json.loads(line)
        assert list(record)[:5] == ["split", "shard", "index", "label", "sha256"]
        assert line == json.dumps(record) + "\n"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        out.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _rebuild(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(kind, body) for kind, body in chunks)


def _odd_pngs() -> dict[str, bytes]:
    chunks = _chunks(png(images(3)["grey noise"]))
    (ihdr,), idat = [c for c in chunks if c[0] == b"IHDR"], [c for c in chunks if c[0] == b"IDAT"][0][1]
    split_by_text = [ihdr, (b"IDAT", idat[:20]), (b"tEXt", b"k\x00v"), (b"IDAT", idat[20:]), (b"IEND", b"")]
    filtered = [(b"IHDR", ihdr[1][:11] + b"\x01" + ihdr[1][12:])] + chunks[1:]  # filter method 1: none such
    ztxt = [ihdr, (b"zTXt", b"k\x00\x00" + zlib.compress(b"x" * 100))] + chunks[1:]
    return {"IDAT runs split by another chunk": _rebuild(split_by_text), "unknown filter method": _rebuild(filtered),
            "compressed text": _rebuild(ztxt)}


@pytest.mark.parametrize("name", list(_odd_pngs()))
def test_files_the_fast_path_does_not_judge_get_the_general_paths_verdict(name):
    data = _odd_pngs()[name]
    assert decode_plain_png(data, 10_000) is None
    try:
        expected = general_path(data, RULES)
    except ImageRejected:
        with pytest.raises(ImageRejected):
            decode_image(data, RULES)
    else:
        np.testing.assert_array_equal(decode_image(data, RULES)[0], expected)

"""A tiny corpus of good, odd and broken image files, for the validation and loader tests.

`make_corpus(dir)` writes the files (about 32x24 each, a few KB in all) and returns
``{name: (path, expected)}`` with expected one of "ok" (plain: both decoders read it as is), "converted"
(decodable, rewritten as an 8-bit RGB PNG) or "skipped" (unusable). The "missing_file" entry's path does not exist.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 32, 24


def rgb_array(seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise: [H, W, 3] uint8 (noise keeps JPEG scans long enough to cut in half)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], -1)
    return np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height, with a few bytes of data (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def huge_jpeg_header(width: int = 20000, height: int = 20000) -> bytes:
    """A small baseline JPEG with its SOF0 dimensions patched to width x height."""
    data = bytearray(encode(Image.fromarray(rgb_array(1)), "JPEG", quality=75))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def make_corpus(dir: Path) -> dict[str, tuple[Path, str]]:
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(rgb_array(0))
    grey = rgb.convert("L")
    good_jpeg = encode(rgb, "JPEG", quality=95)
    g16 = (rgb_array(2)[..., 0].astype(np.uint16) * 257 + np.arange(W, dtype=np.uint16)[None, :])  # > 255, not *257
    files: dict[str, tuple[str, bytes, str]] = {
        "rgb_jpeg": ("rgb.jpg", good_jpeg, "ok"),
        "grey_jpeg": ("grey.jpg", encode(grey, "JPEG", quality=95), "ok"),
        "progressive_jpeg": ("progressive.jpg", encode(rgb, "JPEG", quality=90, progressive=True), "ok"),
        "truncated_jpeg": ("truncated.jpg", good_jpeg[:len(good_jpeg) // 2], "skipped"),
        "zero_byte_jpeg": ("empty.jpg", b"", "skipped"),
        "rgb_png": ("rgb.png", encode(rgb, "PNG"), "ok"),
        "grey_png": ("grey.png", encode(grey, "PNG"), "ok"),
        "rgba_png": ("rgba.png", encode(rgb.convert("RGBA"), "PNG"), "ok"),
        "palette_png": ("palette.png", encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "converted"),
        "la_png": ("grey_alpha.png", encode(grey.convert("LA"), "PNG"), "converted"),
        "grey16_png": ("grey16.png", encode(Image.fromarray(g16), "PNG"), "converted"),
        "truncated_png": ("truncated.png", encode(rgb, "PNG")[:-200], "skipped"),
        "bmp": ("image.bmp", encode(rgb, "BMP"), "converted"),
        "cmyk_jpeg": ("cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG", quality=95), "converted"),
        "tiff": ("image.tif", encode(rgb, "TIFF"), "converted"),
        "huge_png_header": ("huge.png", huge_png_header(), "skipped"),
        "huge_jpeg_header": ("huge.jpg", huge_jpeg_header(), "skipped"),
        "text_as_jpeg": ("notes.jpg", b"lesion_id,dx\nHAM_0001,nv\n", "skipped"),
    }
    out = {}
    for name, (fname, data, expected) in files.items():
        p = dir / fname
        p.write_bytes(data)
        out[name] = (p, expected)
    out["missing_file"] = (dir / "missing.jpg", "skipped")
    return out

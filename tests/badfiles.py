"""Generators for the hostile-input corpus: every file is synthesised at test time.

Each function returns the bytes of one file; ``bad_corpus`` writes a folder of them with
the reason code (or "ok") each one must end up with.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import draw_image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A 68-byte PNG whose header claims ``width`` × ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 10)) + png_chunk(b"IEND", b""))


def png16(arr: np.ndarray) -> bytes:
    """A real 16-bit PNG (grey, grey+alpha, RGB or RGBA from the last axis), written by hand
    because Pillow cannot write every 16-bit colour type."""
    arr = np.asarray(arr, np.uint16)
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def good_jpeg(seed: int = 1, cls: str = "red") -> bytes:
    return encode(draw_image(cls, seed), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = good_jpeg(7)
    return data[: len(data) // 2]


def asymmetric_photo(size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A picture that looks different under every rotation: blue left band, red top band."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8) + np.array([230, 230, 230], np.uint8)
    arr[:, : w // 4] = (20, 40, 220)
    arr[: h // 5, :] = (220, 30, 30)
    arr[h // 2:, w // 2:] = (30, 160, 40)
    return Image.fromarray(arr, "RGB")


def exif_rotated_jpeg(orientation: int = 6) -> tuple[bytes, bytes]:
    """(JPEG stored sideways with an EXIF orientation tag, the physically rotated copy)."""
    img = asymmetric_photo()
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOpsTranspose[orientation](img)
    return tagged, encode(upright, "JPEG", quality=95)


ImageOpsTranspose = {
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_270),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_90),
}


def rgba_hidden_red() -> bytes:
    """Left half: fully transparent pixels whose hidden colour is pure red; right: opaque blue."""
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[:, :32] = (255, 0, 0, 0)
    arr[:, 32:] = (0, 0, 255, 255)
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def palette_alpha(fmt: str = "PNG") -> bytes:
    """Palette image: index 0 (red) is transparent, index 1 (green) is opaque."""
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    img.paste(1, (16, 0, 32, 32))
    return encode(img, fmt, transparency=0)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 48), c) for c in ((200, 20, 20), (20, 200, 20), (20, 20, 200))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def grey16() -> bytes:
    """A 16-bit grey ramp from 0 to 65535 across the width (mean about mid-grey)."""
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    return png16(np.tile(ramp, (48, 1)))


SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
       b'height="10"><rect width="10" height="10" fill="red"/></svg>\n')
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>\n"


def bad_corpus(folder: Path) -> dict[str, str]:
    """Write every hostile image (plus two good ones) into ``folder``.

    Returns {file name: expected status}: "ok" or the reason code it must be skipped with.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tagged, _ = exif_rotated_jpeg()
    files: dict[str, tuple[bytes, str]] = {
        "good_1.jpg": (good_jpeg(1), "ok"),
        "good_2.png": (encode(draw_image("blue", 2), "PNG"), "ok"),
        "truncated.jpg": (truncated_jpeg(), "truncated"),
        "empty.jpg": (b"", "empty_file"),
        "text.jpg": (b"just some text, saved with the wrong extension\n" * 3, "not_an_image"),
        "page.jpg": (HTML, "not_an_image"),
        "vector.jpg": (SVG, "unsupported_format"),
        "vector.svg": (SVG, "unsupported_format"),
        "bomb.png": (png_bomb(), "too_many_pixels"),
        "grey16.png": (grey16(), "ok"),
        "rgba.png": (rgba_hidden_red(), "ok"),
        "palette_alpha.png": (palette_alpha("PNG"), "ok"),
        "palette_alpha.gif": (palette_alpha("GIF"), "ok"),
        "cmyk.jpg": (cmyk_jpeg(), "ok"),
        "rotated.jpg": (tagged, "ok"),
        "animated.gif": (animated_gif(), "ok"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: status for name, (_, status) in files.items()}


def many_scan_jpeg(side: int = 6000, scans: int = 2000) -> bytes:
    """A small progressive JPEG whose last scan is repeated ``scans`` times: ~0.3 MB that
    costs libjpeg about 1 ns per pixel per scan (minutes at 6000×6000) to decode."""
    data = encode(Image.new("RGB", (side, side), (120, 60, 200)), "JPEG", progressive=True,
                  quality=50)
    last_scan = data[data.rfind(b"\xff\xda"):-2]
    return data[:-2] + last_scan * scans + b"\xff\xd9"

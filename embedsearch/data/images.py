"""Safe image decoding: failures are returned as data with a reason code, never raised.

Pillow traps handled here (see DESIGN.md): truncated files that only fail at ``load()``,
decompression bombs (checked from the header, before any pixel is decoded), 16-bit images
that ``convert("RGB")`` would saturate to white, transparent pixels hiding colours, EXIF
orientation, CMYK and palette images, and reduce-on-decode for large JPEGs.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Formats Pillow may open. Everything else (EPS via Ghostscript, PSD, ...) is refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: Above this many pixels (width × height, from the header) an image is refused undecoded.
DEFAULT_MAX_PIXELS = 100_000_000
#: Transparent pixels are composited onto this colour.
BACKGROUND = (255, 255, 255)

# Reason codes, stable strings used in reports and tests.
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image and facts about its source file."""

    image: Image.Image
    width: int
    height: int
    format: str
    sha256: str
    size: int


@dataclass(frozen=True)
class LoadFailure:
    """Why an image could not be used."""

    reason: str
    detail: str
    sha256: str | None = None
    size: int | None = None


def read_bytes(path: Path) -> bytes | LoadFailure:
    """Read a whole file, turning OS errors into a failure record."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return LoadFailure(UNREADABLE, exc.strerror or str(exc))


def load_image(
    source: Path | bytes,
    *,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage | LoadFailure:
    """Decode ``source`` (a path or the file's bytes) to an 8-bit RGB image.

    ``target_size`` lets JPEGs decode at 1/2, 1/4 or 1/8 scale while both sides stay at
    least that large, which is all the encoder's resize needs.
    """
    data = read_bytes(source) if isinstance(source, Path) else source
    if isinstance(data, LoadFailure):
        return data
    digest = hashlib.sha256(data).hexdigest()
    size = len(data)
    if size == 0:
        return LoadFailure(EMPTY_FILE, "the file is empty", digest, size)
    result = _decode(data, target_size, max_pixels)
    if isinstance(result, LoadFailure):
        return LoadFailure(result.reason, result.detail, digest, size)
    image, width, height, fmt = result
    return LoadedImage(image, width, height, fmt, digest, size)


def _decode(
    data: bytes, target_size: int | None, max_pixels: int
) -> tuple[Image.Image, int, int, str] | LoadFailure:
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that; we decide
            # from the header ourselves below, so the warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        return LoadFailure(*_identify_failure(data))
    except Image.DecompressionBombError as exc:
        return LoadFailure(TOO_MANY_PIXELS, str(exc))
    except (OSError, ValueError, SyntaxError) as exc:
        return LoadFailure(DECODE_ERROR, str(exc) or type(exc).__name__)
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            return LoadFailure(DECODE_ERROR, f"invalid size {width}x{height}")
        if width * height > max_pixels:
            return LoadFailure(
                TOO_MANY_PIXELS, f"{width}x{height} is over the limit of {max_pixels:,} pixels"
            )
        fmt = img.format or "?"
        if fmt == "JPEG" and target_size and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            img.draft("RGB" if img.mode != "CMYK" else "CMYK", (target_size, target_size))
        # Force the whole decode inside the try: truncated files only fail here.
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img), width, height, fmt
    except Image.DecompressionBombError as exc:
        return LoadFailure(TOO_MANY_PIXELS, str(exc))
    except OSError as exc:
        text = str(exc)
        reason = TRUNCATED if "truncated" in text.lower() or "broken" in text.lower() else DECODE_ERROR
        return LoadFailure(reason, text)
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError) as exc:
        return LoadFailure(DECODE_ERROR, str(exc) or type(exc).__name__)


def _identify_failure(data: bytes) -> tuple[str, str]:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        return UNSUPPORTED_FORMAT, "SVG (vector) images are not decoded"
    if head.startswith((b"<!doctype html", b"<html")):
        return NOT_AN_IMAGE, "an HTML page, not an image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = Image.open(io.BytesIO(data))
        return UNSUPPORTED_FORMAT, f"{other.format} images are not allowed"
    except Exception:
        return NOT_AN_IMAGE, "not a recognised image format"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without the usual traps."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow maps 16-bit values straight onto 0..255 (saturating); scale instead.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr8 = ((arr - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        # Composite so colours stored under fully transparent pixels never leak in.
        background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    if img.mode == "CMYK":
        # JPEG CMYK from Adobe tools is stored inverted; Pillow's converter handles the
        # usual case. An embedded ICC profile would be more exact but needs littleCMS data.
        return img.convert("RGB")
    return img.convert("RGB")


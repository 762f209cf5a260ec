"""Safe image decoding: failures are returned as data with a reason code, never raised.

Pillow traps handled here (see DESIGN.md): truncated files that only fail at ``load()``,
decompression bombs (checked from the header, before any pixel is decoded), 16-bit images
that ``convert("RGB")`` would saturate to white, transparent pixels hiding colours, EXIF
orientation, CMYK and palette images, and reduce-on-decode for large JPEGs.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from embedsearch.data.jpeg_guard import scan_work_problem
from embedsearch.store.io import open_for_reading

#: Formats Pillow may open. Everything else (EPS via Ghostscript, PSD, ...) is refused.
#: PPM covers the Netpbm family (.ppm/.pgm/.pbm/.pnm). A camera's multi-picture JPEG (MPO)
#: opens through the JPEG plugin.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
#: Above this many pixels (width × height, from the header) an image is refused undecoded.
DEFAULT_MAX_PIXELS = 100_000_000
#: Files larger than this are not read at all (a video or disk image renamed to .jpg).
MAX_FILE_BYTES = 512 * 1024 * 1024
#: Wider (or taller) images are centre-cropped to this ratio after decoding. Encoders resize
#: the shorter side and keep a centre square, so nothing they see is lost; without it a
#: 1-KB PNG of 300000×1 pixels is resized to gigabytes before the crop.
MAX_ASPECT_RATIO = 10
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
NOT_A_FILE = "not_a_regular_file"
TOO_LARGE = "file_too_large"
TOO_MANY_SCANS = "too_many_scans"


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


def sniff_format(path: Path) -> str | None:
    """The image format Pillow reads from a file's header (no pixels decoded), or None when
    it is not an image. Used for files whose extension says nothing (or something wrong)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_for_reading(path) as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    return None
                with Image.open(fh) as img:
                    return "JPEG" if img.format == "MPO" else img.format
    except Exception:  # not an image, unreadable, or a plugin choking on the header
        return None


def read_bytes(path: Path) -> bytes | LoadFailure:
    """Read a whole file, turning OS errors into a failure record."""
    try:
        with open_for_reading(path) as fh:  # a FIFO must not block the open
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                # Reading a FIFO or a device would block or never end.
                return LoadFailure(NOT_A_FILE, "a FIFO, socket or device, not a file")
            if st.st_size > MAX_FILE_BYTES:
                return LoadFailure(TOO_LARGE, f"{st.st_size:,} bytes is over the limit of "
                                   f"{MAX_FILE_BYTES:,}", size=st.st_size)
            return fh.read()
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
    with warnings.catch_warnings():
        # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that, and about
        # corrupt EXIF or TIFF tags; we decide from the header ourselves and record real
        # failures, so the warnings are noise (one per file, from every worker).
        warnings.simplefilter("ignore")
        try:
            return _decode_unchecked(data, target_size, max_pixels)
        except MemoryError:
            return LoadFailure(DECODE_ERROR, "out of memory while decoding")
        except Exception as exc:
            # A crafted file can raise anything from a plugin (struct.error, KeyError…);
            # one bad file must never stop a run of hours.
            return LoadFailure(DECODE_ERROR, f"{type(exc).__name__}: {exc}")


def _decode_unchecked(
    data: bytes, target_size: int | None, max_pixels: int
) -> tuple[Image.Image, int, int, str] | LoadFailure:
    try:
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
        if fmt == "JPEG" or (fmt == "TIFF" and "jpeg" in str(img.info.get("compression"))):
            costly = scan_work_problem(data, width * height)
            if costly is not None:
                return LoadFailure(TOO_MANY_SCANS, costly)
        if fmt == "JPEG" and target_size and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            img.draft("RGB" if img.mode != "CMYK" else "CMYK", (target_size, target_size))
        # Force the whole decode inside the try: truncated files only fail here.
        img.load()
        img, width, height = _apply_orientation(img, width, height)
        return limit_aspect(to_rgb(img)), width, height, fmt
    except Image.DecompressionBombError as exc:
        return LoadFailure(TOO_MANY_PIXELS, str(exc))
    except OSError as exc:
        text = str(exc)
        broken = "truncated" in text.lower() or "broken" in text.lower()
        reason = TRUNCATED if broken else DECODE_ERROR
        return LoadFailure(reason, text)
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError) as exc:
        return LoadFailure(DECODE_ERROR, str(exc) or type(exc).__name__)


def _apply_orientation(img: Image.Image, width: int, height: int
                       ) -> tuple[Image.Image, int, int]:
    """Turn the pixels as the EXIF orientation tag says; report the size as displayed."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)
        turned = ImageOps.exif_transpose(img) or img
    except Exception:  # damaged EXIF must not cost a photo whose pixels decoded fine
        return img, width, height
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return turned, width, height


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


def limit_aspect(img: Image.Image, ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crop an extremely wide or tall image to ``ratio`` : 1."""
    w, h = img.size
    if w > ratio * h:
        keep = max(1, round(ratio * h))
        left = (w - keep) // 2
        return img.crop((left, 0, left + keep, h))
    if h > ratio * w:
        keep = max(1, round(ratio * w))
        top = (h - keep) // 2
        return img.crop((0, top, w, top + keep))
    return img


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
        arr = np.where(np.isfinite(arr), arr, 0.0)  # NaN/inf would cast to arbitrary bytes
        lo, hi = float(arr.min()), float(arr.max())
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


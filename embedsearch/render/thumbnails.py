"""The one thumbnail maker: decode an image at about the size it is shown at, shrink it,
and hand it back as a PIL image, JPEG bytes, a ``data:`` URI or a padded square array.

Decoding goes through :func:`embedsearch.data.images.load_image` (JPEGs decode at 1/2, 1/4
or 1/8 scale, so a large photo never costs its full-size decode; the pixel limit holds).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.data.images import DEFAULT_MAX_PIXELS, LoadedImage, LoadFailure, load_image

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: Side of the thumbnails in the dedupe and leakage pages.
THUMB = 160
#: JPEG quality of the thumbnails embedded in report pages.
PAGE_QUALITY = 80


def make_thumbnail(source: Path | bytes, size: int, *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage | LoadFailure:
    """``source`` decoded and shrunk in place to fit ``size`` × ``size`` (aspect kept,
    never enlarged); the failure record when it cannot be read. The returned
    :class:`LoadedImage` keeps the source's full width and height."""
    loaded = load_image(source, target_size=size, max_pixels=max_pixels)
    if isinstance(loaded, LoadedImage):
        loaded.image.thumbnail((size, size))  # decoded for us alone: no copy
    return loaded


def jpeg_bytes(image: Image.Image, quality: int = PAGE_QUALITY) -> bytes:
    """``image`` as JPEG file bytes."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_data_uri(path: Path, size: int = THUMB) -> str | None:
    """A small JPEG of the image as a ``data:`` URI, or None when it cannot be read."""
    loaded = make_thumbnail(path, size)
    if isinstance(loaded, LoadFailure):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(loaded.image)).decode(
        "ascii")


def thumbnail_square(path: Path, size: int) -> np.ndarray:
    """The image scaled to fit ``size`` × ``size`` (small ones enlarged, so a gallery's
    cells match), centred on white, as an RGB array; plain grey when it cannot be read."""
    import numpy as np
    from PIL import Image, ImageOps

    loaded = load_image(path, target_size=size)
    if not isinstance(loaded, LoadedImage):
        return np.full((size, size, 3), 200, np.uint8)
    img = ImageOps.contain(loaded.image, (size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas)


__all__ = ["PAGE_QUALITY", "THUMB", "jpeg_bytes", "make_thumbnail", "thumbnail_data_uri",
           "thumbnail_square"]

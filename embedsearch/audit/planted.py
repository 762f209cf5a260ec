"""Planted problems, to check an audit on a collection whose faults are known.

:func:`spurious_images` draws one or more images of every low-information category the
audit looks for (a flat colour, pixel noise, one texture everywhere, text only, very dark,
very bright, blurred, tiny, extreme aspect ratio); :func:`flip_labels` flips a seeded share
of labels to another class. The benchmark (``benchmarks/audit.py``) and the tests plant
these into real and generated folders and check that each lands at the top of its ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

_WORDS = ("SALE", "new collection", "free shipping", "size chart", "lorem ipsum dolor",
          "sit amet", "100% cotton", "machine wash", "return policy", "order now")


def spurious_images(photos: Sequence[Image.Image], seed: int = 0
                    ) -> list[tuple[str, Image.Image]]:
    """(category, image) pairs: for each category, one image per photo (photo-based
    categories) or per photo index (drawn ones), so ``len(photos)`` of each."""
    from PIL import Image as PILImage
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    out: list[tuple[str, PILImage.Image]] = []
    for n, photo in enumerate(photos):
        photo = photo.convert("RGB")
        w, h = photo.size
        side = 320
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        out.append(("uniform", PILImage.new("RGB", (side, side), colour)))
        noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8) if n % 2 == 0 else \
            np.clip(rng.normal(128, 60, (side, side, 3)), 0, 255).astype(np.uint8)
        out.append(("noise", PILImage.fromarray(noise, "RGB")))
        out.append(("texture", _texture(rng, side, n)))
        out.append(("text", _text_image(rng, side, n)))
        arr = np.asarray(photo, np.float32)
        out.append(("dark", PILImage.fromarray((arr * 0.06).astype(np.uint8), "RGB")))
        out.append(("bright", PILImage.fromarray((255 - (255 - arr) * 0.06).astype(np.uint8),
                                                  "RGB")))
        out.append(("blurry", photo.filter(ImageFilter.GaussianBlur(max(w, h) / 60))))
        out.append(("tiny", photo.resize((max(8, w * 40 // max(w, h)),
                                          max(8, h * 40 // max(w, h))))))
        strip = photo.resize((w, max(8, w // 6))) if n % 2 == 0 else \
            photo.resize((max(8, h // 6), h))
        out.append(("aspect", strip))
    return out


def _texture(rng: np.random.Generator, side: int, n: int) -> Image.Image:
    """One pattern repeated over the whole image: a random tile, stripes or a checkerboard."""
    from PIL import Image as PILImage

    kind = n % 3
    if kind == 0:
        tile = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        arr = np.tile(tile, (side // 16, side // 16, 1))
    elif kind == 1:
        y = np.arange(side)[:, None, None]
        c1 = rng.integers(0, 256, 3)
        c2 = (c1 + 128) % 256  # a contrasting second colour
        arr = np.where((y // 6) % 2 == 0, c1, c2).repeat(side, axis=1).astype(np.uint8)
    else:
        y, x = np.mgrid[:side, :side]
        c1 = rng.integers(0, 256, 3)
        c2 = (c1 + 128) % 256
        arr = np.where(((y // 10 + x // 10) % 2 == 0)[..., None], c1, c2).astype(np.uint8)
    return PILImage.fromarray(arr, "RGB")


def _text_image(rng: np.random.Generator, side: int, n: int) -> Image.Image:
    """Text on a plain background: lines of small dark text (a label, a size chart), one
    big word, light text on black, or coloured text on a coloured ground, by ``n``."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    kind = n % 4
    bg, fg, size = [((255, 255, 255), (20, 20, 20), 22), ((250, 250, 245), (10, 10, 10), 90),
                    ((0, 0, 0), (255, 255, 255), 30), ((200, 30, 30), (255, 230, 0), 40)][kind]
    img = PILImage.new("RGB", (side, side), bg)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)
    y = 8
    while y < side - size:
        words = " ".join(rng.choice(_WORDS, 2)) if kind != 1 else "SALE"
        d.text((8, y), words, fill=fg, font=font)
        y += int(size * 1.3)
        if kind == 1:
            break
    return img


def flip_labels(labels: Sequence[str] | np.ndarray, rate: float, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``rate`` of the labels (chosen at random, seeded) to another class drawn
    uniformly. Returns (new labels, boolean mask of the flipped rows)."""
    y = np.asarray(labels).astype(str)
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    n_flip = round(rate * len(y))
    rows = rng.choice(len(y), n_flip, replace=False)
    idx = np.searchsorted(classes, y[rows])
    shift = rng.integers(1, len(classes), n_flip)
    out = y.copy()
    out[rows] = classes[(idx + shift) % len(classes)]
    flipped = np.zeros(len(y), bool)
    flipped[rows] = True
    return out, flipped

"""The second signal for borderline pairs: a mirror-invariant perceptual hash of each image.

What the embedding misses is mostly *photometric and geometric normalisation*: a greyscale
copy, a quarter-size thumbnail, a squashed resize or a mirrored copy can fall to a cosine
of 0.7–0.85 with its original while look-alike photos reach 0.9. The hash below is built
to be blind to exactly those edits:

- computed on luminance → greyscale copies hash like their originals;
- only the central 80 % of each side is hashed → borders, transparent margins and the
  black corners of rotated copies weigh nothing (on the whole image, rotated copies of
  *different* posters matched each other through their corners);
- the image is resized to 32×32 regardless of its size and aspect ratio → tiny, half-size
  and squashed copies hash alike;
- bits are the signs of the 63 lowest-frequency DCT coefficients (the DC term left out);
  small local edits (watermarks, JPEG blocking) barely move them;
- a horizontal mirror negates exactly the coefficients of odd horizontal frequency, so the
  hash of the mirrored image is the hash with those bits inverted: the distance used is
  the smaller of the two, at no extra decoding.

Measured on planted copies (benchmarks/results/dedupe_generalisation.md): greyscale, half,
tiny, squash, mirror and JPEG copies sit at ≤ 6 of 63 bits from their original, while the
nearest *distinct* image of 99 % of real photos is at ≥ 7. The hash alone would still
confuse flat look-alikes, so it only confirms pairs whose embeddings are already close
(see :mod:`embedsearch.dedupe.group`). Crops and rotations move every coefficient: those
stay with the embedding.

Hashes cost about 1–2 ms of CPU per image (JPEG draft decoding at 1/8 scale) and are only
computed for images in borderline pairs; :func:`bundle_hashes` caches them in the bundle
(``dedupe/hashes.parquet``, keyed by id and sha256), so a second run decodes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from embedsearch.bundle import Bundle

log = logging.getLogger(__name__)

#: Side of the DCT block whose signs form the hash (K*K - 1 bits, DC left out).
HASH_SIDE = 8
HASH_BITS = HASH_SIDE * HASH_SIDE - 1
#: Side the luminance is resized to before the DCT.
HASH_INPUT = 32
#: Share of each side, centred, that is hashed.
HASH_CENTRE = 0.8
#: Rotations tried to turn a copy with filled corners back (every 5° up to 45° each way:
#: not tuned to one angle), and the central share of each side compared then.
ANGLES = tuple(a for a in range(-45, 46, 5) if a)
ROTATION_CENTRE = 0.5
#: Longest side (px) an image is scaled to before it is turned back (:func:`rotation_hashes`).
ROTATION_INPUT = 128
#: Bits whose value a horizontal mirror inverts (odd horizontal frequency).
_U = np.tile(np.arange(HASH_SIDE), HASH_SIDE)[1:]
MIRROR_MASK = np.uint64(sum(1 << b for b in range(HASH_BITS) if _U[b] % 2 == 1))
#: Value stored for images that could not be hashed (never matches anything).
NO_HASH = np.uint64(0)
CACHE_FILE = Path("dedupe") / "hashes.parquet"


def _hash(image: Image.Image, frac: float) -> tuple[int, np.ndarray]:
    """(hash of the central ``frac`` of each side, its 32×32 RGB pixels)."""
    from PIL import Image
    from scipy.fft import dctn

    w, h = image.size
    mx, my = w * (1 - frac) / 2, h * (1 - frac) / 2
    centre = image.convert("RGB").resize((HASH_INPUT, HASH_INPUT), Image.BILINEAR,
                                          box=(mx, my, w - mx, h - my))
    rgb = np.asarray(centre, np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    bits = dctn(luma, norm="ortho")[:HASH_SIDE, :HASH_SIDE].ravel()[1:] > 0
    # bit 63 is set on every real hash, so a stored 0 (NO_HASH) is never taken for one
    return sum(1 << k for k in np.flatnonzero(bits).tolist()) | (1 << 63), rgb


def dct_hash(image: Image.Image) -> tuple[int, bool]:
    """(63-bit hash, is the image greyscale) of a decoded image."""
    value, rgb = _hash(image, HASH_CENTRE)
    grey = bool(np.abs(rgb[..., 0] - rgb[..., 1]).max() < 3
                and np.abs(rgb[..., 1] - rgb[..., 2]).max() < 3)
    return value, grey


def filled_corners(image: Image.Image) -> bool:
    """Whether at least two corners are flat and dark: the fill a rotation leaves."""
    a = np.asarray(image.convert("L").resize((HASH_INPUT, HASH_INPUT)), np.float32)
    corners = (a[:3, :3], a[:3, -3:], a[-3:, :3], a[-3:, -3:])
    return sum(float(c.std()) < 4 and float(c.mean()) < 20 for c in corners) >= 2


def rotation_hashes(image: Image.Image) -> list[int]:
    """Hashes of the central :data:`ROTATION_CENTRE` of the image turned back by each of
    :data:`ANGLES` (degrees). The centre of a rotated copy, turned back, *is* the centre of
    its original whatever the angle (no fill reaches it up to 45°), so one of these
    matches the original's :func:`centre_hash` when the angle is within a few degrees.

    The image is first scaled to :data:`ROTATION_INPUT` px on its longest side: the hash
    reads 32×32 pixels of the central half, so larger turns only cost time (18 rotations
    were half of all hashing on planted photos). Planted 30° copies whose turned-back
    centre matches within :data:`~embedsearch.dedupe.links.ROTATION_MAX_BITS` bits:
    posters 146 of 150 either way, photos 99 of 100 (100 at full size)."""
    from PIL import Image

    w, h = image.size
    scale = ROTATION_INPUT / max(w, h, 1)
    if scale < 1:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.BILINEAR)
    return [_hash(image.rotate(-a, Image.BILINEAR), ROTATION_CENTRE)[0] for a in ANGLES]


def centre_hash(image: Image.Image) -> int:
    """Hash of the central :data:`ROTATION_CENTRE` of the image, as it is."""
    return _hash(image, ROTATION_CENTRE)[0]


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], np.int64)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (a byte table: np.bitwise_count needs numpy 2)."""
    x = np.ascontiguousarray(x, np.uint64)
    return _BYTE_BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def hash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between hashes ``a`` and ``b`` (elementwise), the smaller of the
    direct and the mirrored comparison; HASH_BITS + 1 where either hash is missing."""
    a = np.asarray(a, np.uint64)
    b = np.asarray(b, np.uint64)
    direct = _popcount(a ^ b)
    mirrored = _popcount(a ^ b ^ MIRROR_MASK)
    d = np.minimum(direct, mirrored)
    return np.where((a == NO_HASH) | (b == NO_HASH), HASH_BITS + 1, d)


@dataclass
class ImageViews:
    """Per item: the hash, greyscale flag, centre hash and, for images with filled corners
    (rotated copies), the hashes of the centre turned back by each of ANGLES (else
    NO_HASH)."""

    hash: np.ndarray
    grey: np.ndarray
    centre: np.ndarray
    rotated: np.ndarray

    @property
    def edited(self) -> np.ndarray:
        """Greyscale or rotated (filled corners): an edit of a same-size copy, never the
        reverse, so the keep policy prefers the other."""
        return self.grey | (self.rotated[:, 0] != NO_HASH)

    @classmethod
    def empty(cls, n: int) -> ImageViews:
        return cls(np.full(n, NO_HASH, np.uint64), np.zeros(n, bool),
                   np.full(n, NO_HASH, np.uint64), np.full((n, len(ANGLES)), NO_HASH, np.uint64))


def image_views(image: Image.Image) -> tuple[int, bool, int, list[int]]:
    """(hash, greyscale, centre hash, rotation hashes or []) of a decoded image."""
    value, grey = dct_hash(image)
    turned = rotation_hashes(image) if filled_corners(image) else []
    return value, grey, centre_hash(image), turned


def hash_files(paths: Sequence[Path]) -> ImageViews:
    """The views of image files; NO_HASH where a file cannot be decoded."""
    from concurrent.futures import ThreadPoolExecutor

    from embedsearch.data.images import LoadFailure, load_image
    from embedsearch.embed import default_workers

    def one(path: Path) -> tuple[int, bool, int, list[int]]:
        loaded = load_image(Path(path), target_size=HASH_INPUT * 4)
        if isinstance(loaded, LoadFailure):
            return 0, False, 0, []
        return image_views(loaded.image)

    with ThreadPoolExecutor(default_workers()) as pool:
        out = list(pool.map(one, paths))
    views = ImageViews.empty(len(out))
    for k, (h, g, c, turned) in enumerate(out):
        views.hash[k], views.grey[k], views.centre[k] = h, g, c
        if turned:
            views.rotated[k] = turned
    return views


def _signed(x: np.ndarray) -> list[int]:
    return np.asarray(x, np.uint64).view(np.int64).tolist()  # parquet has no uint64


def bundle_hashes(bundle: Bundle, rows: np.ndarray) -> ImageViews:
    """The views of a bundle's items, computed for ``rows`` (item indices) where not cached
    yet; other rows get NO_HASH unless cached.

    The cache (``dedupe/hashes.parquet`` in the bundle) is keyed by id and sha256, so an
    edited file is hashed again; a read-only bundle just is not cached into.
    """
    import pandas as pd

    from embedsearch.store.io import read_parquet, write_parquet

    items = bundle.items
    n = len(items)
    views = ImageViews.empty(n)
    key = items["id"].astype(str) + "\0" + items["sha256"].fillna("").astype(str)
    cache_path = bundle.path / CACHE_FILE
    cached = pd.DataFrame(columns=["key", "hash", "grey", "centre", "rotated"])
    if cache_path.exists():
        try:
            cached = read_parquet(cache_path)
        except Exception as exc:  # a damaged cache is recomputed, never trusted
            log.warning("ignoring the hash cache %s: %s", cache_path, exc)
    known = {k: r for k, r in zip(cached["key"], cached.itertuples(index=False), strict=True)}
    todo = []
    for r in np.unique(np.asarray(rows, np.int64)).tolist():
        hit = known.get(key.iat[r])
        if hit is None:
            todo.append(r)
            continue
        views.hash[r] = np.int64(hit.hash).view(np.uint64)
        views.grey[r] = bool(hit.grey)
        views.centre[r] = np.int64(hit.centre).view(np.uint64)
        if len(hit.rotated):
            views.rotated[r] = np.asarray(hit.rotated, np.int64).view(np.uint64)
    if todo:
        root = items_root(bundle)
        fresh = hash_files([root / str(items["id"].iat[r]) for r in todo])
        views.hash[todo], views.grey[todo] = fresh.hash, fresh.grey
        views.centre[todo], views.rotated[todo] = fresh.centre, fresh.rotated
        new = pd.DataFrame({
            "key": key.iloc[todo].to_numpy(), "hash": _signed(fresh.hash), "grey": fresh.grey,
            "centre": _signed(fresh.centre),
            "rotated": [_signed(r) if r[0] != NO_HASH else [] for r in fresh.rotated]})
        merged = pd.concat([cached, new] if len(cached) else [new], ignore_index=True)
        merged = merged.drop_duplicates("key", keep="last")
        try:
            cache_path.parent.mkdir(exist_ok=True)
            write_parquet(cache_path, merged)
        except OSError as exc:
            log.info("hashes not cached (%s): the bundle is read-only", exc)
    return views


def items_root(bundle: Bundle) -> Path:
    """The folder that a bundle's item ids are relative to."""
    src = bundle.manifest.get("source", {})
    path = Path(src.get("path", "."))
    return path if src.get("kind", "folder") == "folder" else path.parent

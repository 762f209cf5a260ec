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
#: Bits whose value a horizontal mirror inverts (odd horizontal frequency).
_U = np.tile(np.arange(HASH_SIDE), HASH_SIDE)[1:]
MIRROR_MASK = np.uint64(sum(1 << b for b in range(HASH_BITS) if _U[b] % 2 == 1))
#: Value stored for images that could not be hashed (never matches anything).
NO_HASH = np.uint64(0)
CACHE_FILE = Path("dedupe") / "hashes.parquet"


def dct_hash(image: Image.Image) -> tuple[int, bool]:
    """(63-bit hash, is the image greyscale) of a decoded image."""
    from PIL import Image
    from scipy.fft import dctn

    w, h = image.size
    mx, my = w * (1 - HASH_CENTRE) / 2, h * (1 - HASH_CENTRE) / 2
    centre = image.convert("RGB").resize((HASH_INPUT, HASH_INPUT), Image.BILINEAR,
                                          box=(mx, my, w - mx, h - my))
    rgb = np.asarray(centre, np.float32)
    grey = bool(np.abs(rgb[..., 0] - rgb[..., 1]).max() < 3
                and np.abs(rgb[..., 1] - rgb[..., 2]).max() < 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    bits = dctn(luma, norm="ortho")[:HASH_SIDE, :HASH_SIDE].ravel()[1:] > 0
    # bit 63 is set on every real hash, so a stored 0 (NO_HASH) is never taken for one
    return sum(1 << k for k in np.flatnonzero(bits).tolist()) | (1 << 63), grey


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


def hash_files(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, greyscale flags) of image files; NO_HASH where a file cannot be decoded."""
    from concurrent.futures import ThreadPoolExecutor

    from embedsearch.data.images import LoadFailure, load_image
    from embedsearch.embed import default_workers

    def one(path: Path) -> tuple[int, bool]:
        loaded = load_image(Path(path), target_size=HASH_INPUT * 2)
        if isinstance(loaded, LoadFailure):
            return 0, False
        return dct_hash(loaded.image)

    with ThreadPoolExecutor(default_workers()) as pool:
        out = list(pool.map(one, paths))
    hashes = np.fromiter((h for h, _ in out), np.uint64, len(out))
    grey = np.fromiter((g for _, g in out), bool, len(out))
    return hashes, grey


def bundle_hashes(bundle: Bundle, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes and greyscale flags for all of a bundle's items, computed for ``rows`` (item
    indices) where not cached yet; other rows get NO_HASH unless cached.

    The cache (``dedupe/hashes.parquet`` in the bundle) is keyed by id and sha256, so an
    edited file is hashed again; a read-only bundle just is not cached into.
    """
    import pandas as pd

    from embedsearch.dedupe.bundles import items_root
    from embedsearch.store.io import read_parquet, write_parquet

    items = bundle.items
    n = len(items)
    hashes = np.full(n, NO_HASH, np.uint64)
    grey = np.zeros(n, bool)
    key = items["id"].astype(str) + "\0" + items["sha256"].fillna("").astype(str)
    cache_path = bundle.path / CACHE_FILE
    cached = pd.DataFrame({"key": pd.Series(dtype=str), "hash": pd.Series(dtype=np.int64),
                           "grey": pd.Series(dtype=bool)})
    if cache_path.exists():
        try:
            cached = read_parquet(cache_path)
        except Exception as exc:  # a damaged cache is recomputed, never trusted
            log.warning("ignoring the hash cache %s: %s", cache_path, exc)
    known = dict(zip(cached["key"], zip(cached["hash"], cached["grey"], strict=True),
                     strict=True))
    todo = []
    for r in np.unique(np.asarray(rows, np.int64)).tolist():
        hit = known.get(key.iat[r])
        if hit is None:
            todo.append(r)
        else:
            hashes[r] = np.int64(hit[0]).view(np.uint64)  # stored as int64: parquet has no u64
            grey[r] = bool(hit[1])
    if todo:
        root = items_root(bundle)
        paths = [root / str(items["id"].iat[r]) for r in todo]
        h, g = hash_files(paths)
        hashes[todo], grey[todo] = h, g
        fresh = pd.DataFrame({"key": key.iloc[todo].to_numpy(), "hash": h.view(np.int64),
                              "grey": g})
        merged = pd.concat([cached, fresh], ignore_index=True).drop_duplicates("key", keep="last")
        try:
            cache_path.parent.mkdir(exist_ok=True)
            write_parquet(cache_path, merged)
        except OSError as exc:
            log.info("hashes not cached (%s): the bundle is read-only", exc)
    return hashes, grey

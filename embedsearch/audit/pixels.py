"""Cheap per-image pixel statistics, and the "low-information / spurious image" scores
built from them.

The statistics are computed once, at decode time, on a small copy of the decoded image
(:func:`pixel_stats`, called by the build's decoder) and stored as ``px_*`` columns of the
bundle's items table, so an audit never decodes an image again. Bundles built before these
columns existed (or by the Ray engine) are still auditable: :func:`stats_for_items` decodes
the files once to fill the missing rows, and says how many it had to read.

Every statistic is scale-free (computed on a copy whose longer side is :data:`STATS_SIDE`
pixels, values in 0..1 or ratios), so one threshold works for a 300-pixel thumbnail and a
24-megapixel photo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

log = logging.getLogger(__name__)

#: Longer side of the copy the statistics are computed on.
STATS_SIDE = 160
#: Columns stored in the items table, in this order.
STAT_COLUMNS = ("px_brightness", "px_contrast", "px_colour_std", "px_saturation",
                "px_sharpness", "px_tile_share", "px_two_tone", "px_top_colour", "px_edges",
                "px_isotropy")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
#: Gradient (luminance units per pixel of the small copy) that counts as an edge.
EDGE_STEP = 0.08
TILES = 4
#: Below this shorter side (pixels) only the size is judged, not the texture.
MIN_SIDE_FOR_STATS = 48


def pixel_stats(image: Image.Image) -> dict[str, float]:
    """Statistics of an RGB image (about 1 ms; the image is not modified).

    - ``px_brightness``: mean luminance (0 black … 1 white);
    - ``px_contrast``: standard deviation of luminance;
    - ``px_colour_std``: root-mean-square over the channels of each channel's standard
      deviation (0 for a single flat colour, whatever the colour);
    - ``px_saturation``: mean HSV-style saturation (0 for grey-only images such as scans);
    - ``px_sharpness``: gradient energy (sum of squared luminance steps) at full resolution
      over the same at half resolution: 2 for sharp edges (a step is one pixel wide at
      either resolution, and there are twice as many pixels along it), 1 for a blurred
      image (a ramp wider than two pixels holds the same energy at both), more for pixel
      noise (averaging removes it). Strong edges dominate the energy, so a few sharp
      contours decide it even on a plain background;
    - ``px_tile_share``: share of the colour variance that lies *between* the cells of a
      4 × 4 grid: near 0 when every part of the picture looks alike (one texture, noise, a
      flat colour), large when the picture has an object and a background;
    - ``px_two_tone``: share of pixels in the two most common of 64 coarse colours (near 1
      for text on a plain background or a flat colour; photos spread over many colours);
    - ``px_top_colour``: share of pixels in the most common coarse colour (the background
      of a plain-background picture), so ``1 − px_top_colour`` is the "ink";
    - ``px_edges``: share of pixels on a luminance edge (thin strokes of text: most of the
      ink is edge; a garment on a white background: little of it);
    - ``px_isotropy``: horizontal over vertical gradient energy, the smaller over the
      larger (letters have both; stripes, one).
    """
    from PIL import Image as PILImage

    small = image if image.mode == "RGB" else image.convert("RGB")
    if max(small.size) > STATS_SIDE:
        small = small.copy()
        small.thumbnail((STATS_SIDE, STATS_SIDE), PILImage.Resampling.BILINEAR)
    a = np.asarray(small, np.float32) / 255.0
    return stats_from_array(a)


def stats_from_array(a: np.ndarray) -> dict[str, float]:
    """:func:`pixel_stats` of an (h, w, 3) float array in 0..1."""
    h, w = a.shape[:2]
    lum = a @ _LUMA
    channel_var = a.reshape(-1, 3).var(axis=0)
    mx, mn = a.max(axis=2), a.min(axis=2)
    saturation = np.where(mx > 1e-3, (mx - mn) / np.maximum(mx, 1e-3), 0.0)
    grad = _gradient(lum)
    if h >= 4 and w >= 4:
        half = lum[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        e_full, e_half = float((grad ** 2).sum()), float((_gradient(half) ** 2).sum())
        sharpness = e_full / e_half if e_half > 1e-6 else 1.0
    else:
        sharpness = 1.0
    total = float(channel_var.sum())
    if total > 1e-6 and h >= TILES and w >= TILES:
        hs, ws = h // TILES * TILES, w // TILES * TILES
        tiles = a[:hs, :ws].reshape(TILES, hs // TILES, TILES, ws // TILES, 3).mean(axis=(1, 3))
        tile_share = float(tiles.reshape(-1, 3).var(axis=0).sum() / total)
    else:
        tile_share = 0.0
    q = np.minimum((a * 4).astype(np.int32), 3)
    codes = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    counts = np.sort(np.bincount(codes.ravel(), minlength=64))[::-1]
    return {
        "px_brightness": float(lum.mean()),
        "px_contrast": float(lum.std()),
        "px_colour_std": float(np.sqrt(channel_var.mean())),
        "px_saturation": float(saturation.mean()),
        "px_sharpness": float(min(sharpness, 10.0)),
        "px_tile_share": min(tile_share, 1.0),
        "px_two_tone": float(counts[:2].sum() / codes.size),
        "px_top_colour": float(counts[0] / codes.size),
        "px_edges": float((grad > EDGE_STEP).mean()),
        "px_isotropy": _isotropy(lum),
    }


def _isotropy(lum: np.ndarray) -> float:
    ex = float((np.diff(lum, axis=1) ** 2).sum()) if lum.shape[1] > 1 else 0.0
    ey = float((np.diff(lum, axis=0) ** 2).sum()) if lum.shape[0] > 1 else 0.0
    return min(ex, ey) / max(ex, ey) if max(ex, ey) > 1e-9 else 1.0


def _gradient(lum: np.ndarray) -> np.ndarray:
    """Gradient magnitude by forward differences (cropped to a common shape)."""
    if lum.shape[0] < 2 or lum.shape[1] < 2:
        return np.zeros(1, np.float32)
    gx = lum[:-1, 1:] - lum[:-1, :-1]
    gy = lum[1:, :-1] - lum[:-1, :-1]
    return np.sqrt(gx * gx + gy * gy)


def stats_from_file(path: Path, target_size: int = 2 * STATS_SIDE) -> dict[str, float] | None:
    """Statistics of one image file (None when it cannot be decoded). ``target_size`` is
    the JPEG reduce-on-decode size, as the build's decoder used (the encoder's resize)."""
    from embedsearch.data.images import LoadFailure, load_image

    loaded = load_image(path, target_size=target_size)
    if isinstance(loaded, LoadFailure):
        return None
    return pixel_stats(loaded.image)


def stats_for_items(items: pd.DataFrame, root: Path,
                    progress: Callable[[int, int], Callable[[int], None]] | None = None,
                    num_workers: int | None = None, target_size: int = 2 * STATS_SIDE
                    ) -> tuple[pd.DataFrame, int]:
    """The ``px_*`` columns for every row of ``items``; rows without them (a bundle built
    before they existed) are computed from the files under ``root``.

    Returns (a frame with one column per :data:`STAT_COLUMNS`, in the items' order, and
    the number of images that had to be decoded). ``progress(total, done)`` may return a
    callback that receives image counts while they decode. ``target_size``: the bundle
    encoder's resize, so large JPEGs decode at the scale the build decoded them.
    """
    import pandas as pd

    stats = pd.DataFrame({c: (items[c].astype("float64") if c in items else np.nan)
                          for c in STAT_COLUMNS}, index=items.index)
    missing = stats.isna().any(axis=1).to_numpy()
    todo = items.index[missing]
    if len(todo):
        log.info("%d images have no stored pixel statistics; decoding them once", len(todo))
        paths = [_resolve(root, str(i)) for i in items.loc[todo, "id"]]
        tick = progress(len(todo), 0) if progress is not None else None
        workers = num_workers if num_workers is not None else max(1, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            found = pool.map(lambda p: stats_from_file(p, target_size), paths)
            for idx, st in zip(todo, found, strict=True):
                if st is not None:
                    stats.loc[idx, list(STAT_COLUMNS)] = [st[c] for c in STAT_COLUMNS]
                if tick is not None:
                    tick(1)
    return stats, len(todo)


def _resolve(root: Path, item_id: str) -> Path:
    p = Path(item_id)
    return p if p.is_absolute() else root / p


# -- spurious-image categories ----------------------------------------------------------
#: Category → (score from the statistics and sizes: higher is worse, flag threshold on
#: that score, what the flag means). Thresholds: see benchmarks/results/audit.md, where
#: generated examples of each category and the real photos of clothing-small are scored.
def spurious_scores(stats: pd.DataFrame, width: np.ndarray, height: np.ndarray,
                    input_size: int = 224) -> pd.DataFrame:
    """One score column per category (higher = more of it) plus ``flags`` per category.

    Returns a frame with ``spurious_<category>`` scores and a ``spurious`` column naming the
    flagged categories of each image ("" when none).
    """
    import pandas as pd

    s = {c: stats[c].to_numpy(np.float64) for c in STAT_COLUMNS}
    w = np.asarray(width, np.float64)
    h = np.asarray(height, np.float64)
    short = np.minimum(w, h)
    aspect = np.maximum(w, h) / np.maximum(short, 1.0)
    flat = s["px_colour_std"]
    tile = s["px_tile_share"]
    # Texture statistics mean little for a flat image (it is "uniform") or a tiny one.
    busy = np.clip(flat / 0.05, 0.0, 1.0) * (short >= MIN_SIDE_FOR_STATS)
    scores = {
        "uniform": 1.0 - np.clip(flat / 0.25, 0.0, 1.0),
        "dark": 1.0 - s["px_brightness"],
        "bright": s["px_brightness"] * (1.0 - np.clip(s["px_contrast"] / 0.3, 0.0, 1.0)),
        "blurry": busy * np.clip(1.5 - s["px_sharpness"], 0.0, 1.0),
        "noise": busy * np.clip((s["px_sharpness"] - 1.0) / 1.5, 0.0, 1.0)
        * np.clip(1.0 - tile / 0.05, 0.0, 1.0),
        "texture": busy * (1.0 - tile),
        # two tones (ink on a plain ground), ink that is mostly edge (thin strokes), and
        # strokes in both directions (stripes have one)
        "text": busy * np.clip((s["px_two_tone"] - 0.7) / 0.2, 0.0, 1.0)
        * np.clip((s["px_edges"] / np.maximum(1.0 - s["px_top_colour"], 0.01) - 0.6) / 0.6,
                  0.0, 1.0) * np.clip(s["px_isotropy"] / 0.4, 0.0, 1.0),
        "tiny": 1.0 - np.clip(short / input_size, 0.0, 1.0),
        "aspect": aspect,
    }
    thresholds = SPURIOUS_THRESHOLDS
    out = pd.DataFrame({f"spurious_{k}": v for k, v in scores.items()}, index=stats.index)
    flagged = np.zeros((len(out), len(scores)), bool)
    for j, (k, v) in enumerate(scores.items()):
        flagged[:, j] = np.nan_to_num(v, nan=-np.inf) >= thresholds[k]
    names = list(scores)
    out["spurious"] = [",".join(n for n, f in zip(names, row, strict=True) if f)
                       for row in flagged]
    return out


#: Score at or above which an image is flagged, per category.
SPURIOUS_THRESHOLDS: dict[str, float] = {
    "uniform": 0.96,   # colour std under 0.01 (2.5/255): one flat colour
    "dark": 0.88,      # mean luminance under 0.12
    "bright": 0.85,    # mean luminance over ~0.9 with almost no contrast
    "blurry": 0.35,    # edges as steep per pixel at half resolution as at full (≤ 1.15)
    "noise": 0.5,      # steep everywhere alike: pixel noise
    "texture": 0.98,   # under 2 % of the colour variance between the 4 × 4 cells
    "text": 0.5,       # two tones, ink mostly thin strokes
    "tiny": 0.71,      # shorter side under 65 px for a 224-px encoder (upscaled > 3.4×)
    "aspect": 3.0,     # the encoder's centre crop keeps under a third of the image
}

SPURIOUS_CATEGORIES = tuple(SPURIOUS_THRESHOLDS)


def describe_thresholds() -> dict[str, Any]:
    """The thresholds, for reports."""
    return dict(SPURIOUS_THRESHOLDS)

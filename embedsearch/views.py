"""Augmented views of training images, embedded once and stored in the bundle.

``build-index DATA --views flip,crop2`` embeds, for every labelled training image (not the
validation or test images), a horizontally flipped copy and two random resized crops;
``embedsearch train`` then adds those vectors as training-only rows of the head
(``extra_train``), so a head sees more variation without a single image being re-encoded
when it is retrained. ``predict --tta flip`` averages each query's embedding with that of
its mirror image.

Views are data of the bundle like its embeddings: ``data/views-GGGGGG.npy`` (float32,
L2-normalised, one row per view) and ``data/view_items-GGGGGG.parquet`` (id, sha256, view,
row of the image in the items table), listed in the manifest with their sha256 and
verified on load. Crops are seeded per image (from the file's sha256, the view's number and
the recorded seed), so a view does not depend on the order or the batch it was encoded in,
and a rebuild reuses every view of an unchanged file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import BundleError, EmbedsearchError

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from embedsearch.bundle import Bundle
    from embedsearch.embed import Augment
    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

#: Bumped when a view's pixels change for the same name, seed and file.
VIEWS_VERSION = 1
VIEW_SEED = 0
#: Random resized crop: share of the image's area and aspect-ratio range. Milder than the
#: usual training range (0.08, 1): a view must still show the labelled object.
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: Splits whose images get no views: views are training rows only.
NO_VIEW_SPLITS = frozenset({"val", "test"})
TTA_CHOICES = ("flip",)
_TERM = re.compile(r"^(flip|crop(\d+))$")


def parse_views(spec: str | None) -> list[str]:
    """``"flip,crop2"`` → ``["flip", "crop1", "crop2"]``; ``None``/``""``/``"none"`` → []."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return []
    names: list[str] = []
    for term in (t.strip().lower() for t in spec.split(",") if t.strip()):
        m = _TERM.match(term)
        if not m or (m.group(2) is not None and not 1 <= int(m.group(2)) <= 16):
            raise EmbedsearchError(f"unknown view {term!r} in --views {spec!r}",
                                   hint="use flip and/or cropN (N random resized crops, "
                                   "1-16), e.g. --views flip,crop2, or none")
        names.extend(["flip"] if m.group(1) == "flip"
                     else [f"crop{j}" for j in range(1, int(m.group(2)) + 1)])
    return list(dict.fromkeys(names))


def _mirror(image: Image.Image, _sha256: str = "") -> Image.Image:
    from PIL import ImageOps

    return ImageOps.mirror(image)


def _crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling (10 tries, then the centre), with a numpy
    generator: torch's global generator is neither per-image nor thread-safe."""
    area = width * height
    log_ratio = np.log(CROP_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = float(np.exp(rng.uniform(*log_ratio)))
        w = round(np.sqrt(target * ratio))
        h = round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def augment_for(view: str, seed: int = VIEW_SEED) -> Augment:
    """The image transform of one view name (see :func:`parse_views`)."""
    if view == "flip":
        return _mirror
    j = int(view[4:])

    def crop(image: Image.Image, sha256: str) -> Image.Image:
        rng = np.random.default_rng([seed, j, int(sha256[:16], 16)])
        image = image.crop(_crop_box(image.width, image.height, rng))
        return _mirror(image) if rng.random() < 0.5 else image

    return crop


@dataclass
class ViewSet:
    """Views computed by a build: ``vectors[i]`` is view ``table.view[i]`` of ``table.id[i]``."""

    names: list[str]
    seed: int
    vectors: np.ndarray
    table: pd.DataFrame
    encoded: int = 0
    reused: int = 0

    def record(self) -> dict[str, Any]:
        return {"spec": ",".join(self.names), "views": self.names, "seed": self.seed,
                "version": VIEWS_VERSION, "crop_scale": list(CROP_SCALE),
                "crop_ratio": [round(r, 4) for r in CROP_RATIO],
                "of": "labelled training images (not validation or test)"}


def settings(old: dict[str, Any] | None, views: str | None) -> list[str]:
    """The views a build makes: ``views`` when given, else the bundle's previous choice."""
    if views is not None:
        return parse_views(views)
    return list((old or {}).get("views", {}).get("views", []))


def previous(path: Path, old: dict[str, Any] | None) -> dict[tuple[str, str, str], np.ndarray]:
    """Views of the previous generation, by (id, sha256, view), when made the same way."""
    from embedsearch.store.io import read_npy, read_parquet

    rec = (old or {}).get("views")
    if not rec or rec.get("seed") != VIEW_SEED or rec.get("version") != VIEWS_VERSION \
            or tuple(rec.get("crop_scale", ())) != CROP_SCALE:
        return {}
    vectors = read_npy(path / old["roles"]["views"])  # type: ignore[index]
    table = read_parquet(path / old["roles"]["view_items"])  # type: ignore[index]
    return {(i, s, v): vectors[n] for n, (i, s, v) in
            enumerate(zip(table["id"], table["sha256"], table["view"], strict=True))}


def encode_views(encoder: Encoder, images: list[tuple[str, Path, str]], names: list[str],
                 reuse: dict[tuple[str, str, str], np.ndarray], batch_size: int = 32,
                 num_workers: int | None = None,
                 progress: Callable[[int, int], Callable[[int], None]] | None = None
                 ) -> ViewSet:
    """Embed every view of ``images`` ((id, path, sha256) triples) not found in ``reuse``.

    An image that no longer decodes (it did a moment ago) simply has no view.
    """
    import pandas as pd

    from embedsearch.embed import embed_sources

    rows: list[tuple[str, str, str]] = []
    vectors: list[np.ndarray] = []
    todo = {v: [im for im in images if (im[0], im[2], v) not in reuse] for v in names}
    total = len(images) * len(names)
    n_todo = sum(len(t) for t in todo.values())
    tick = progress(total, total - n_todo) if progress and n_todo else None
    for view in names:
        for im in images:
            if (im[0], im[2], view) in reuse:
                rows.append((im[0], im[2], view))
                vectors.append(reuse[(im[0], im[2], view)][None, :])
        batch = todo[view]
        stream = embed_sources(encoder, [p for _, p, _ in batch], batch_size=batch_size,
                               num_workers=num_workers, progress=tick,
                               augment=augment_for(view))
        for idx, vecs, infos in stream:
            ok = [batch[i] for i, info in zip(idx, infos, strict=True) if info.status == "ok"]
            rows.extend((i, s, view) for i, _, s in ok)
            vectors.append(vecs)
    table = pd.DataFrame(rows, columns=["id", "sha256", "view"])
    arr = np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32)
    return ViewSet(names, VIEW_SEED, arr.astype(np.float32, copy=False), table,
                   encoded=n_todo, reused=total - n_todo)


def training_images(records: list[Any], metas: list[dict[str, Any] | None]
                    ) -> list[tuple[str, Path, str]]:
    """(id, path, sha256) of the labelled, embedded images outside validation and test."""
    return [(r.id, r.path, m["sha256"]) for r, m in zip(records, metas, strict=True)
            if m is not None and m["status"] == "ok" and r.label is not None
            and r.split not in NO_VIEW_SPLITS]


def write(path: Path, gen: int, views: ViewSet, items: pd.DataFrame
          ) -> tuple[dict[str, str], dict[str, Any]]:
    """Write a generation's view files for the final ``items``; (roles, manifest record)."""
    from embedsearch.store.io import write_npy, write_parquet

    row_of = dict(zip(items["id"], items["row"], strict=True))
    keep = views.table["id"].map(row_of).notna().to_numpy()  # e.g. left out by --dedupe
    table = views.table[keep].reset_index(drop=True)
    table["row"] = table["id"].map(row_of).astype(np.int64)
    roles = {"views": f"data/views-{gen:06d}.npy",
             "view_items": f"data/view_items-{gen:06d}.parquet"}
    write_npy(path / roles["views"], views.vectors[keep])
    write_parquet(path / roles["view_items"], table)
    counts = {v: int((table["view"] == v).sum()) for v in views.names}
    return roles, {**views.record(), "rows": len(table), "images": int(table["id"].nunique()),
                   "by_view": counts}


def bundle_views(bundle: Bundle) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The bundle's views as ``extra_train`` for a head: (vectors, labels, bundle rows);
    None when it has none. The files were verified (sha256) when the bundle was loaded."""
    from embedsearch.store.io import read_npy, read_parquet

    rec = bundle.manifest.get("views")
    if not rec:
        return None
    vectors = read_npy(bundle.file("views"))
    table = read_parquet(bundle.file("view_items"))
    rows = table["row"].to_numpy(np.int64)
    if vectors.dtype != np.float32 or vectors.shape != (len(table), bundle.dim) \
            or len(table) != rec.get("rows") or (len(rows) and rows.max() >= len(bundle.items)):
        raise BundleError(f"{bundle.file('views')} holds {vectors.dtype} {vectors.shape} for "
                          f"{len(table)} listed views of {bundle.dim}-d embeddings",
                          hint=bundle.rebuild_hint + " --views " + rec.get("spec", "flip"))
    labels = bundle.items["label"].to_numpy()[rows].astype(str)
    return np.asarray(vectors), labels, rows


def tta_augment(tta: str | None) -> Augment | None:
    """The extra query view of ``predict --tta``: None (off) or the mirror image."""
    if tta is None or tta == "none":
        return None
    if tta not in TTA_CHOICES:
        raise EmbedsearchError(f"unknown test-time augmentation {tta!r}",
                               hint=f"use one of {', '.join(TTA_CHOICES)} or none")
    return _mirror

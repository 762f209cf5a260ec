"""Deduplication over index bundles: reports, leakage between splits and folders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.dedupe.group import (
    SWEEP_THRESHOLDS,
    DedupeResult,
    find_duplicates,
    sweep,
)
from embedsearch.dedupe.rules import item_facts
from embedsearch.dedupe.search import Pairs, candidate_pairs
from embedsearch.dedupe.views import items_root
from embedsearch.errors import EmbedsearchError, InputError

if TYPE_CHECKING:
    import pandas as pd

    from embedsearch.bundle import Bundle
    from embedsearch.dedupe.views import ImageViews
    from embedsearch.pipeline import BuildResult


def dedupe_bundle(bundle: Bundle, *, threshold: float | None = None,
                  keep: str = "resolution", hashes: bool = True,
                  local_features: bool = True) -> DedupeResult:
    """Duplicate groups among a bundle's images, from its cached embeddings.

    ``threshold=None`` calibrates it on the bundle (see :mod:`embedsearch.dedupe.calibrate`).
    With ``hashes`` (default), images in pairs at or above ``HASH_FLOOR`` get the second
    signal's perceptual hash (:func:`embedsearch.dedupe.views.bundle_hashes`: decoded once,
    then cached in the bundle). With ``local_features`` (default), pairs in a band below
    the threshold are checked geometrically (:mod:`embedsearch.dedupe.geometry`: crops and
    rotations), and every image's local descriptors vote for pairs to check that the
    embedding ranks far (:func:`~embedsearch.dedupe.geometry.vote_proposals`).
    """
    from embedsearch.dedupe.links import GEOMETRY_BAND, HASH_FLOOR
    from embedsearch.dedupe.views import bundle_hashes

    vectors = np.asarray(bundle.embeddings)
    facts = item_facts(bundle.items)
    root = items_root(bundle)
    floor = HASH_FLOOR if threshold is None or hashes else threshold
    if threshold is not None and local_features:
        floor = min(floor, threshold - GEOMETRY_BAND)
    pairs = candidate_pairs(vectors, min(floor, threshold or 1.0))
    h = None
    if hashes:
        h = bundle_hashes(bundle, np.concatenate([pairs.i, pairs.j]))
        facts["grey"] = h.edited
    verify = None
    if local_features:
        from embedsearch.dedupe.geometry import file_verifier

        verify = file_verifier([root / str(i) for i in facts["ids"]])
    res = find_duplicates(vectors, threshold=threshold, keep=keep, pairs=pairs, hashes=h,
                          verify=verify, **facts)
    res.extra.update({"bundle": str(bundle.path), "root": str(root),
                      "encoder": bundle.encoder_identity.get("spec")})
    # Files that exist but could not be decoded: not compared, but a clean copy keeps them.
    # Files the scan skipped (unsupported formats, symlinks…) are counted apart.
    failed = bundle.failures
    res.extra["not_indexed"] = failed.loc[failed["row"] == -1, "id"].tolist()
    res.extra["skipped"] = failed.loc[failed["row"] != -1, "id"].tolist()
    return res


def sweep_bundle(bundle: Bundle, thresholds: Sequence[float] = SWEEP_THRESHOLDS,
                  keep: str = "resolution") -> pd.DataFrame:
    """:func:`sweep` over a bundle's embeddings, with the second signal's hashes."""
    from embedsearch.dedupe.links import HASH_FLOOR
    from embedsearch.dedupe.views import bundle_hashes

    vectors = np.asarray(bundle.embeddings)
    pairs = candidate_pairs(vectors, min(HASH_FLOOR, *thresholds))
    views = bundle_hashes(bundle, np.concatenate([pairs.i, pairs.j]))
    return sweep(vectors, thresholds, keep=keep, hashes=views,
                 grey=views.edited,
                 **item_facts(bundle.items))


# -- leakage ------------------------------------------------------------------------------
LEAK_COLUMNS = ["id_a", "split_a", "id_b", "split_b", "similarity", "exact", "label_a",
                "label_b"]


def leakage(vectors: np.ndarray, ids: Sequence[Any], splits: Sequence[Any], *,
            threshold: float | None = None, sha256: Sequence[Any] | None = None,
            labels: Sequence[Any] | None = None,
            between: Sequence[tuple[str, str]] | None = None,
            views: Callable[[np.ndarray], ImageViews] | None = None) -> pd.DataFrame:
    """Duplicate pairs whose two images sit in different splits (train vs test, …).

    ``between`` limits the split pairs checked (default: every two distinct splits).
    One row per pair, most similar first; ``exact`` marks byte-identical files.
    ``threshold=None`` calibrates it on all the vectors together, exactly as ``dedupe``
    does (:func:`calibrated_pairs`; ``views(rows)`` gives the second signal's views of
    those rows for it); the value is in ``attrs["threshold"]``, its evidence in
    ``attrs["calibration"]`` (None when given).
    """
    import pandas as pd

    vectors = np.asarray(vectors)
    n = len(vectors)
    ids_a = np.asarray([str(i) for i in ids], dtype=object)
    sp = np.asarray([None if s is None or (isinstance(s, float) and np.isnan(s)) else str(s)
                     for s in splits], dtype=object)
    if len(ids_a) != n or len(sp) != n:
        raise EmbedsearchError("ids and splits need one entry per vector")
    lab = np.asarray(labels, dtype=object) if labels is not None else np.full(n, None, object)
    sha = np.asarray(sha256, dtype=object) if sha256 is not None else np.full(n, None, object)
    allowed = {tuple(sorted(p)) for p in between} if between else None
    calibration = None
    if threshold is None:
        pairs, calibration = calibrated_pairs(vectors, sha256=sha256, views=views)
        threshold = pairs.threshold
    else:
        pairs = candidate_pairs(vectors, threshold)
    known = np.array([v is not None for v in sp])
    cross = known[pairs.i] & known[pairs.j] & (sp[pairs.i] != sp[pairs.j])
    rows = []
    for i, j, s in zip(pairs.i[cross].tolist(), pairs.j[cross].tolist(),
                       pairs.sim[cross].tolist(), strict=True):
        a, b = sp[i], sp[j]
        if allowed is not None and tuple(sorted((a, b))) not in allowed:
            continue
        if allowed is not None:  # report in the order the user named the splits
            first = next(p for p in between if set(p) == {a, b})[0]
            if a != first:
                i, j, a, b = j, i, b, a
        elif a > b:
            i, j, a, b = j, i, b, a
        rows.append({"id_a": ids_a[i], "split_a": a, "id_b": ids_a[j], "split_b": b,
                     "similarity": round(min(float(s), 1.0), 4),
                     "exact": bool(sha[i]) and sha[i] == sha[j],
                     "label_a": lab[i], "label_b": lab[j]})
    out = pd.DataFrame(rows, columns=LEAK_COLUMNS)
    out = out.sort_values(["similarity", "id_a", "id_b"], ascending=[False, True, True],
                          ignore_index=True)
    out.attrs.update(threshold=float(threshold), calibration=calibration)
    return out


def calibrated_pairs(vectors: np.ndarray, *, sha256: Sequence[Any] | None = None,
                     views: Callable[[np.ndarray], ImageViews] | None = None
                     ) -> tuple[Pairs, dict[str, Any]]:
    """(pairs at or above the threshold ``dedupe`` would calibrate on these vectors, the
    calibration's evidence). The same code as ``dedupe``: :func:`find_duplicates` with
    ``threshold=None`` over a search down to ``HASH_FLOOR``, with the second signal's
    ``views(rows)`` when given (they set confirmed copies aside from the background)."""
    from embedsearch.dedupe.links import HASH_FLOOR

    searched = candidate_pairs(vectors, HASH_FLOOR)
    hashes = views(np.concatenate([searched.i, searched.j])) if views is not None else None
    res = find_duplicates(vectors, threshold=None, pairs=searched, sha256=sha256,
                          hashes=hashes)
    return searched.at_least(res.threshold), res.extra["calibration"]


def _between(value: str | Sequence[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
    if value is None or (isinstance(value, list | tuple) and not value):
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if len(parts) != 2:
            raise InputError(f"--between needs two split names, like train,test; got {value!r}")
        return [(parts[0], parts[1])]
    return [tuple(p) for p in value]  # type: ignore[misc]


def leakage_bundle(bundle: Bundle, *, threshold: float | None = None,
                   between: str | Sequence[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Cross-split duplicate pairs inside one bundle (built from train/val/test folders or a
    CSV with a split column); ``threshold=None``: calibrated as ``dedupe`` does."""
    from embedsearch.dedupe.views import bundle_hashes

    items = bundle.items
    if items["split"].dropna().nunique() < 2:
        raise InputError(
            f"bundle {bundle.name} has {items['split'].dropna().nunique()} split(s); leakage "
            "needs at least two",
            hint="build from a folder with train/ and test/ sub-folders, a CSV with a split "
            "column, or pass two folders: embedsearch leakage TRAIN_DIR TEST_DIR")
    return leakage(np.asarray(bundle.embeddings), items["id"].tolist(), items["split"].tolist(),
                   threshold=threshold, sha256=items["sha256"].tolist(),
                   labels=items["label"].tolist(), between=_between(between),
                   views=lambda rows: bundle_hashes(bundle, rows))


def folder_bundle_name(folder: str | os.PathLike[str]) -> str:
    """A stable bundle name for a folder: its name plus a hash of its absolute path."""
    p = Path(folder).resolve()
    return f"{p.name}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def leakage_folders(folder_a: str | os.PathLike[str], folder_b: str | os.PathLike[str], *,
                    threshold: float | None = None, model: str | None = None,
                    index_root: str | os.PathLike[str] | None = None,
                    **build_kw: Any) -> pd.DataFrame:
    """Duplicates between two folders (e.g. train/ and test/), each embedded into a bundle
    of its own (reused on the next run; vectors any command already computed come from
    the shared embedding cache). Ids in the result are relative to each folder."""
    a, b = (folder_bundle(f, model=model, index_root=index_root, **build_kw)[0]
            for f in (folder_a, folder_b))
    return leakage_bundles(a, b, threshold=threshold,
                           names=(Path(folder_a).name, Path(folder_b).name))


def folder_bundle(folder: str | os.PathLike[str], *, model: str | None = None,
                  index_root: str | os.PathLike[str] | None = None, **build_kw: Any
                  ) -> tuple[Bundle, BuildResult]:
    """A folder embedded into ``indexes/<name>-<hash of its path>`` (built or refreshed),
    and what the build did (how many images it encoded)."""
    from embedsearch.bundle import DEFAULT_ROOT, load_bundle
    from embedsearch.pipeline import build_index

    if not Path(folder).is_dir():
        raise InputError(f"{folder}: not a folder")
    root = Path(index_root) if index_root else DEFAULT_ROOT
    res = build_index(folder, out=root / folder_bundle_name(folder), model=model, **build_kw)
    return load_bundle(res.path), res


def leakage_bundles(a: Bundle, b: Bundle, *, threshold: float | None = None,
                    names: tuple[str, str] | None = None) -> pd.DataFrame:
    """Duplicates between the images of two bundles (a folder's and an index's, two
    folders', …), from their cached vectors. Ids are each bundle's own;
    ``threshold=None``: calibrated on both together, as ``dedupe`` does."""
    from dataclasses import fields

    from embedsearch.dedupe.views import ImageViews, bundle_hashes

    def views(rows: np.ndarray) -> ImageViews:
        na = len(a.items)
        va, vb = bundle_hashes(a, rows[rows < na]), bundle_hashes(b, rows[rows >= na] - na)
        return ImageViews(*(np.concatenate([getattr(va, f.name), getattr(vb, f.name)])
                            for f in fields(ImageViews)))

    a.check_vectors_from(b.encoder_identity, f"bundle {b.path}")
    names = names or (a.name, b.name)
    names = (names[0] or "a", names[1] or "b")
    if names[0] == names[1]:
        names = (f"{names[0]} (1)", f"{names[1]} (2)")
    vectors = np.concatenate([np.asarray(a.embeddings), np.asarray(b.embeddings)])
    ids = [*a.items["id"].tolist(), *b.items["id"].tolist()]
    splits = [names[0]] * len(a.items) + [names[1]] * len(b.items)
    # The same relative id may exist in both folders: keep ids unique for the search.
    uniq = [f"{s}/{i}" for s, i in zip(splits, ids, strict=True)]
    out = leakage(vectors, uniq, splits, threshold=threshold,
                  sha256=[*a.items["sha256"].tolist(), *b.items["sha256"].tolist()],
                  labels=[*a.items["label"].tolist(), *b.items["label"].tolist()],
                  between=[names], views=views)
    for col, name in (("id_a", names[0]), ("id_b", names[1])):
        out[col] = out[col].str.slice(len(name) + 1)
    return out

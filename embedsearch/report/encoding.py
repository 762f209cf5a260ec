"""The collection as the study sees it: one index bundle per encoder (built, or reused when
it is already there) and one table of the labelled images every encoder could read."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import InputError
from embedsearch.report.results import StudyTable

if TYPE_CHECKING:
    from embedsearch.bundle import Bundle

Progress = Callable[[int, int], Callable[[int], None]]


@dataclass
class Encoded:
    """One encoder's bundle of the collection and what encoding it cost."""

    spec: str
    weights: Path | None
    slug: str
    bundle: Bundle
    #: Encoding record for results["timings"] (measured now, or as recorded when reused).
    build: dict[str, Any]
    #: Display name: the spec, plus the weights file when two encoders share a spec.
    label: str = ""


def encode_collection(data: Path, spec: str, weights: Path | None, slug: str, root: Path,
                      batch_size: int | None, num_workers: int | None,
                      progress: Progress | None, path_col: str | None,
                      label_col: str | None, split_col: str | None,
                      split_map: str | dict[str, str] | None = None, views: str | None = None,
                      device: str = "auto",
                      exclude: str | os.PathLike[str] | None = None) -> Encoded:
    """Build (or reuse) the bundle ``root/slug`` of ``data`` with one encoder."""
    from embedsearch.bundle import load_bundle
    from embedsearch.pipeline import build_index

    path = root / slug
    res = build_index(data, out=path, model=spec, weights=weights,
                      batch_size=batch_size, num_workers=num_workers, progress=progress,
                      path_col=path_col, label_col=label_col, split_col=split_col,
                      split_map=split_map, views=views, device=device, exclude=exclude)
    gen = res.manifest["generation"]
    if res.encoded > 0:
        build = {"generation": gen, "images": res.encoded,
                 "seconds": round(res.encode_seconds, 3),
                 "images_per_second": round(res.images_per_second, 2),
                 "batch_size": batch_size, "num_workers": num_workers, "measured_now": True}
    else:
        # The manifest keeps the throughput measured when these vectors were encoded (by
        # this bundle, or by whichever command first put them in the shared cache).
        build = {"generation": gen, "images": 0, "measured_now": False,
                 "note": "every embedding was reused (bundle or shared embedding cache)"}
        recorded = res.manifest.get("encoding") or {}
        if recorded.get("images_per_second"):
            build.update({k: recorded[k] for k in ("images", "seconds", "images_per_second")})
            build["note"] += "; throughput as recorded when they were encoded"
    build["reused"] = res.reused
    bundle = load_bundle(path)
    bundle.device = device
    return Encoded(spec, weights, slug, bundle, build)


def study_table(encoded: list[Encoded]) -> StudyTable:
    """The labelled images every encoder read, sorted by id, with their rows per bundle."""
    import pandas as pd

    common: set[str] | None = None
    for e in encoded:
        items = e.bundle.items
        ids = set(items.loc[items["label"].notna(), "id"].astype(str))
        common = ids if common is None else common & ids
    if not common:
        raise InputError("the collection has no labelled images that every encoder could "
                         "read, so there is nothing to benchmark",
                         hint="put images in one sub-folder per class, or give a label column")
    ids = np.array(sorted(common), dtype=object)
    first = encoded[0].bundle
    items = first.items.set_index(first.items["id"].astype(str))
    labels = items.loc[ids, "label"].astype(str).to_numpy()
    given = items.loc[ids, "split"].fillna("").astype(str).to_numpy()
    sha = items.loc[ids, "sha256"].fillna("").astype(str).to_numpy()
    src = first.manifest.get("source", {})
    root = Path(src.get("path", "."))
    if src.get("kind") != "folder":
        root = root.parent
    paths = [root / str(i) for i in ids]
    rows = {}
    for e in encoded:
        pos = pd.Series(np.arange(len(e.bundle.items)), index=e.bundle.items["id"].astype(str))
        rows[e.slug] = pos.loc[ids].to_numpy(np.int64)
    return StudyTable(ids, labels, given, sha, paths, rows)


def dataset_info(path: Path, name: str, table: StudyTable, encoded: list[Encoded],
                 classes: list[str]) -> dict[str, Any]:
    """results["dataset"]: source, fingerprint, class counts and what was not used."""
    from embedsearch.report.provenance import dataset_fingerprint

    first = encoded[0].bundle
    items = first.items
    items = items[items["id"].astype(str).isin(set(table.ids))]
    counts = first.manifest.get("counts", {})
    fps = {e.slug: dataset_fingerprint(e.bundle.items[
        e.bundle.items["id"].astype(str).isin(set(table.ids))]) for e in encoded}
    return {
        "name": name,
        "source": str(path),
        "fingerprint": dataset_fingerprint(items),
        "fingerprint_method": "sha256 over sorted (id, file sha256, label, split) rows of "
                              "the labelled images used",
        "fingerprints_agree": len(set(fps.values())) == 1,
        "images": len(table.ids),
        "classes": classes,
        "class_counts": {c: int(np.sum(table.labels == c)) for c in classes},
        "scanned": counts.get("scanned"),
        "not_used": {"unreadable_or_skipped": int(counts.get("failed", 0))
                     + int(counts.get("skipped", 0)),
                     "by_reason": counts.get("by_reason", {}),
                     "unlabelled": int(first.items["label"].isna().sum())},
    }


def table_views(enc: Encoded, table: StudyTable) -> tuple[np.ndarray, np.ndarray] | None:
    """The bundle's augmented views as (vectors, row of their image in the study's table);
    None when the bundle has none."""
    from embedsearch.views import bundle_views

    got = bundle_views(enc.bundle)
    if got is None:
        return None
    vX, _, brow = got
    table_row = np.full(len(enc.bundle.items), -1)
    table_row[table.rows[enc.slug]] = np.arange(len(table.rows[enc.slug]))
    keep = table_row[brow] >= 0
    return np.asarray(vX[keep], np.float32), table_row[brow[keep]]


__all__ = ["Encoded", "Progress", "dataset_info", "encode_collection", "study_table",
           "table_views"]

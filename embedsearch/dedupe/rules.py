"""Build-time duplicate rules on tables and arrays: what ``build-index --dedupe`` keeps.

Pure functions of an items table and its vectors (no bundle, no files), so the build
pipeline can call them; the bundle-level commands are in :mod:`embedsearch.dedupe.bundles`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.dedupe.facts import KEEP_POLICIES
from embedsearch.dedupe.group import find_duplicates
from embedsearch.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


def item_facts(items: pd.DataFrame) -> dict[str, Any]:
    """Keyword arguments of :func:`find_duplicates` taken from a bundle's items table."""
    def num(col: str) -> np.ndarray | None:
        if col not in items:
            return None
        return items[col].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)

    def obj(col: str) -> list[Any] | None:
        return items[col].tolist() if col in items else None

    return {"ids": items["id"].tolist(), "sha256": obj("sha256"), "widths": num("width"),
            "heights": num("height"), "sizes": num("size"), "mtimes": num("mtime_ns"),
            "labels": obj("label"), "splits": obj("split")}


def build_settings(old_manifest: dict[str, Any] | None, dedupe: bool | None,
                   threshold: float | None, keep: str | None) -> dict[str, Any] | None:
    """What ``build-index`` should drop: an explicit choice, else the bundle's previous one."""
    previous = ((old_manifest or {}).get("dedupe") or {}).get("settings")
    if dedupe is False:
        return None
    if dedupe is None and previous is None:
        if threshold is not None or keep is not None:
            raise InputError("--dup-threshold/--dedupe-keep need --dedupe")
        return None
    # threshold None: calibrated on the build's vectors at every build, as dedupe does
    base = previous or {"threshold": None, "keep": "resolution"}
    chosen = threshold if threshold is not None else base["threshold"]
    settings = {"threshold": None if chosen is None else float(chosen),
                "keep": keep or base["keep"]}
    if settings["keep"] not in KEEP_POLICIES:
        raise InputError(f"unknown keep policy {settings['keep']!r}",
                         hint=f"use one of: {', '.join(KEEP_POLICIES)}")
    return settings


def apply_build_dedupe(items: pd.DataFrame, vectors: np.ndarray, settings: dict[str, Any]
                       ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray,
                                  dict[str, Any]]:
    """Split a build's rows into kept and removed duplicates.

    Returns (kept items, kept vectors, removed items, removed vectors, manifest record).
    Removed rows keep every items column (so the next build reuses their vectors instead
    of re-encoding them) plus the group, the kept image and the reason.
    """
    res = find_duplicates(vectors, threshold=settings["threshold"], keep=settings["keep"],
                          **item_facts(items))
    removed = res.removed_mask()
    info = res.groups.set_index("id")
    gone = items[removed].copy()
    for col in ("group", "kept_id", "similarity", "match", "reason"):
        gone[col] = info.loc[gone["id"], col].to_numpy()
    gone["row"] = np.arange(len(gone))
    kept = items[~removed].copy()
    kept["row"] = np.arange(len(kept))
    s = res.summary()
    record = {"settings": settings, "threshold": res.threshold,
              "calibration": res.extra.get("calibration"), "groups": s["groups"],
              "removed": s["removed"],
              "removed_exact": s["removed_exact"], "removed_near": s["removed_near"],
              "label_conflict_groups": s["label_conflict_groups"], "method": s["method"]}
    return (kept.reset_index(drop=True), np.ascontiguousarray(vectors[~removed]),
            gone.reset_index(drop=True), np.ascontiguousarray(vectors[removed]), record)

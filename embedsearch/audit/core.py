"""The audit: one pass over a bundle's cached embeddings and stored pixel statistics.

:func:`audit_bundle` returns an :class:`AuditResult` whose ``frame`` has one row per image
and one score column per issue type; :func:`audit` does the same from an image folder / CSV
(embedding what is new first) or a bundle name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.audit.labels import (
    DEFAULT_FOLDS,
    DEFAULT_LABEL_K,
    LabelScores,
    Neighbourhood,
    label_scores,
    outlier_scores,
)
from embedsearch.audit.pixels import spurious_scores, stats_for_items
from embedsearch.errors import EmbedsearchError

if TYPE_CHECKING:
    import pandas as pd

    from embedsearch.bundle import Bundle
    from embedsearch.dedupe.group import DedupeResult

log = logging.getLogger(__name__)

#: Issue types, in the order the report shows them.
ISSUE_TYPES = ("label", "outlier", "spurious", "duplicate", "conflict", "leak")
#: Outlier score (robust standard deviations) above which an image is flagged: with 48
#: other-domain images planted in clothing-small, 3 flags 44 of them and 4 of the 3,781
#: real photos (benchmarks/results/audit.md); 4 flagged 13 and none, 2.5 all 48 and 22.
OUTLIER_Z = 3.0
#: Classes at most this share of the largest class are reported as under-represented.
IMBALANCE_SHARE = 1 / 3


@dataclass
class AuditResult:
    """What is wrong with a collection.

    ``frame``: one row per embedded image: id, label, split, width, height; ``label_score``
    (1 − combined probability of the given label), ``given_prob``, ``suggested_label``,
    ``suggested_prob``, ``label_issue``; ``outlier_score``, ``outlier``; ``spurious_*``
    scores and ``spurious`` (the flagged categories); ``dup_group``, ``dup_of``,
    ``dup_similarity``, ``duplicate`` (a removable copy), ``label_conflict``; ``leak_with``
    (an image in another split it duplicates); the ``px_*`` statistics; ``issues`` (the
    flagged issue types, comma-separated).
    """

    frame: pd.DataFrame
    summary: dict[str, Any]
    root: Path
    name: str
    neighbours: Neighbourhood
    dedupe: DedupeResult
    leakage: pd.DataFrame | None = None
    labels: LabelScores | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def ranked(self, issue: str) -> pd.DataFrame:
        """Rows flagged with ``issue``, most severe first."""
        f = self.frame
        if issue not in ISSUE_TYPES:
            raise EmbedsearchError(f"unknown issue type {issue!r}",
                                   hint=f"use one of {', '.join(ISSUE_TYPES)}")
        col = {"label": "label_issue", "outlier": "outlier", "duplicate": "duplicate",
               "conflict": "label_conflict"}.get(issue)
        if issue == "spurious":
            return f[f["spurious"] != ""].sort_values("spurious_severity", ascending=False,
                                                      kind="stable")
        if issue == "leak":
            return f[f["leak_with"].notna()].sort_values("dup_similarity", ascending=False)
        order = {"label": "label_score", "outlier": "outlier_score",
                 "duplicate": "dup_similarity", "conflict": "dup_group"}[issue]
        rows = f[f[col].fillna(False).astype(bool)]
        return rows.sort_values(order, ascending=issue == "conflict", kind="stable")

    def flagged_ids(self, issues: tuple[str, ...] | list[str]) -> list[str]:
        """Ids flagged with any of ``issues``."""
        keep = set()
        for issue in issues:
            keep.update(self.ranked(issue)["id"].tolist())
        return [i for i in self.frame["id"].tolist() if i in keep]


def audit_bundle(bundle: Bundle, *, folds: int = DEFAULT_FOLDS, k: int = DEFAULT_LABEL_K,
                 dup_threshold: float | None = None,
                 seed: int = 0, progress: Callable[[int, int], Callable[[int], None]] | None
                 = None) -> AuditResult:
    """Audit a bundle from its cached embeddings; nothing is re-encoded.

    Pixel statistics come from the bundle's items table; for a bundle built before they
    were stored, they are computed once from the files (``summary["pixel_stats"]`` says
    how many). ``progress(total, done)`` may return a callback for that decoding.
    """
    import pandas as pd

    from embedsearch import dedupe as dd

    t0 = time.perf_counter()
    items = bundle.items.reset_index(drop=True)
    vectors = np.asarray(bundle.embeddings)
    root = dd.items_root(bundle)
    n = len(items)
    if n < 3:
        raise EmbedsearchError(f"bundle {bundle.name} has {n} images; an audit needs at least 3")
    neigh = Neighbourhood.search(vectors, k, bundle.index)
    frame = items[["id", "label", "split", "width", "height", "sha256"]].copy()

    labels = None
    labelled = items["label"].notna().to_numpy()
    n_classes = items["label"].dropna().nunique()
    if labelled.sum() >= 3 and n_classes >= 2:
        labels = label_scores(vectors, items["label"].to_numpy(dtype=object), neighbours=neigh,
                              folds=folds, k=k, seed=seed)
        frame["label_score"] = np.where(labelled, labels.score, np.nan)
        frame["given_prob"] = np.where(labelled, labels.given_prob, np.nan)
        frame["suggested_label"] = np.where(labelled, labels.suggested, None)
        frame["suggested_prob"] = np.where(labelled, labels.suggested_prob, np.nan)
        issue = np.zeros(n, bool)
        rows = np.flatnonzero(labelled)
        sub = LabelScores(labels.classes, labels.proba[rows], labels.head_proba[rows],
                          labels.knn_proba[rows], labels.given[rows], labels.info)
        issue[rows] = sub.issues()
        frame["label_issue"] = issue
    else:
        for col, val in (("label_score", np.nan), ("given_prob", np.nan),
                         ("suggested_label", None), ("suggested_prob", np.nan),
                         ("label_issue", False)):
            frame[col] = val

    out_score = outlier_scores(vectors, items["label"].to_numpy(dtype=object), neigh,
                               seed=seed)
    frame["outlier_score"] = out_score
    frame["outlier"] = out_score > OUTLIER_Z

    prep = bundle.encoder_identity.get("preprocess", {})
    stats, computed = stats_for_items(items, root, progress=progress,
                                      target_size=int(prep.get("resize_shorter_side", 256)))
    input_size = int(prep.get("center_crop", 224))
    spur = spurious_scores(stats, items["width"].to_numpy(), items["height"].to_numpy(),
                           input_size)
    frame = pd.concat([frame, spur], axis=1)
    frame["spurious_severity"] = _spurious_severity(spur)

    # dup_threshold None: calibrated on the bundle exactly as `dedupe` does; leakage then
    # uses that same value (calibrating again on the same vectors would give it too)
    dup = dd.dedupe_bundle(bundle, threshold=dup_threshold)
    threshold = dup.threshold
    frame = _join_duplicates(frame, dup)
    leaks = None
    if items["split"].dropna().nunique() >= 2:
        leaks = dd.leakage_bundle(bundle, threshold=threshold)
    frame["leak_with"] = _leak_partner(frame["id"], leaks)
    frame = pd.concat([frame, stats.reset_index(drop=True)], axis=1)
    frame["issues"] = _issue_column(frame)

    summary = _summary(frame, items, labels, OUTLIER_Z, computed, dup, leaks, threshold,
                       time.perf_counter() - t0)
    return AuditResult(frame, summary, root, bundle.name, neigh, dup, leaks, labels,
                       {"bundle": str(bundle.path),
                        "encoder": bundle.encoder_identity.get("spec")})


def audit(source: str | os.PathLike[str] | None = None, *, index: str | None = None,
          model: str | None = None,
          progress: Callable[[int, int], Callable[[int], None]] | None = None,
          **options: Any) -> AuditResult:
    """Audit an image folder or CSV (embedded into its bundle first, re-encoding only what
    is new) or an existing bundle (``index``). ``options`` go to :func:`audit_bundle`."""
    from embedsearch.bundle import load_bundle

    if (source is None) == (index is None):
        raise EmbedsearchError("give an image folder (or CSV) DATA, or --index NAME, not both",
                               hint="embedsearch audit ./images   or   embedsearch audit "
                               "--index covers")
    if index is not None:
        bundle = load_bundle(index)
    else:
        from embedsearch.pipeline import build_index

        bundle = load_bundle(build_index(source, model=model, progress=progress).path)
    return audit_bundle(bundle, progress=progress, **options)


def _spurious_severity(spur: pd.DataFrame) -> np.ndarray:
    """How far past its threshold the worst flagged category is (0 when none)."""
    from embedsearch.audit.pixels import SPURIOUS_THRESHOLDS

    sev = np.zeros(len(spur))
    for cat, cut in SPURIOUS_THRESHOLDS.items():
        v = spur[f"spurious_{cat}"].to_numpy(np.float64)
        sev = np.maximum(sev, np.where(v >= cut, 1.0 + (v - cut) / max(abs(cut), 1e-6), 0.0))
    return sev


def _join_duplicates(frame: pd.DataFrame, dup: DedupeResult) -> pd.DataFrame:
    g = dup.groups
    conflicts = set(dup.label_conflicts["group"].tolist()) if len(g) else set()
    info = g.set_index("id") if len(g) else None
    ids = frame["id"]
    if info is None:
        frame["dup_group"] = np.nan
        frame["dup_of"] = None
        frame["dup_similarity"] = np.nan
        frame["duplicate"] = False
        frame["label_conflict"] = False
        return frame
    frame["dup_group"] = ids.map(info["group"])
    kept = ids.map(info["kept"]).astype("boolean")
    frame["dup_of"] = ids.map(info["kept_id"]).where(kept.eq(False).fillna(False), None)
    frame["dup_similarity"] = ids.map(info["similarity"]).where(kept.eq(False).fillna(False))
    frame["duplicate"] = kept.eq(False).fillna(False).astype(bool)
    frame["label_conflict"] = frame["dup_group"].isin(conflicts)
    return frame


def _leak_partner(ids: pd.Series, leaks: pd.DataFrame | None) -> pd.Series:
    import pandas as pd

    if leaks is None or not len(leaks):
        return pd.Series([None] * len(ids), index=ids.index, dtype=object)
    partner: dict[str, str] = {}
    for r in leaks.itertuples():
        partner.setdefault(r.id_a, f"{r.split_b}:{r.id_b}")
        partner.setdefault(r.id_b, f"{r.split_a}:{r.id_a}")
    return ids.map(partner)


def _issue_column(frame: pd.DataFrame) -> list[str]:
    flags = {
        "label": frame["label_issue"].fillna(False).astype(bool).to_numpy(),
        "outlier": frame["outlier"].to_numpy(bool),
        "spurious": (frame["spurious"] != "").to_numpy(),
        "duplicate": frame["duplicate"].to_numpy(bool),
        "conflict": frame["label_conflict"].to_numpy(bool),
        "leak": frame["leak_with"].notna().to_numpy(),
    }
    return [",".join(k for k in ISSUE_TYPES if flags[k][i]) for i in range(len(frame))]


def _summary(frame: pd.DataFrame, items: pd.DataFrame, labels: LabelScores | None,
             out_cut: float, computed: int, dup: DedupeResult, leaks: pd.DataFrame | None,
             threshold: float, seconds: float) -> dict[str, Any]:
    counts = items["label"].dropna().astype(str).value_counts()
    spur_counts: dict[str, int] = {}
    for flags in frame["spurious"]:
        for cat in filter(None, flags.split(",")):
            spur_counts[cat] = spur_counts.get(cat, 0) + 1
    d = dup.summary()
    imbalance: dict[str, Any] = {}
    if len(counts):
        largest = int(counts.max())
        imbalance = {
            "classes": {str(c): int(v) for c, v in counts.sort_index().items()},
            "ratio_largest_smallest": round(largest / max(int(counts.min()), 1), 2),
            "under_represented": sorted(str(c) for c, v in counts.items()
                                        if v <= IMBALANCE_SHARE * largest),
        }
    out = {
        "images": len(frame),
        "labelled": int(items["label"].notna().sum()),
        "label_issues": int(frame["label_issue"].sum()),
        "outliers": int(frame["outlier"].sum()),
        "outlier_cut": round(float(out_cut), 4),
        "spurious": int((frame["spurious"] != "").sum()),
        "spurious_by_category": dict(sorted(spur_counts.items())),
        "duplicates": int(frame["duplicate"].sum()),
        "duplicate_groups": d["groups"],
        "label_conflict_groups": d["label_conflict_groups"],
        "leak_pairs": 0 if leaks is None else len(leaks),
        "dup_threshold": threshold,
        "dup_threshold_source": "calibrated" if dup.extra.get("calibration") else "given",
        "dup_calibration": dup.extra.get("calibration"),
        "imbalance": imbalance,
        "pixel_stats": {"stored": len(frame) - computed, "computed_from_files": computed},
        "flagged_images": int((frame["issues"] != "").sum()),
        "seconds": round(seconds, 2),
    }
    if labels is not None:
        out["label_method"] = {"combination": "mean of out-of-fold linear head and kNN vote",
                               **labels.info}
    return out

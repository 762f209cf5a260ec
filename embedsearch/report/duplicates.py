"""Duplicate groups of the study's images: byte-identical files plus near-duplicate
embeddings (:mod:`embedsearch.dedupe`), joined into connected groups that the split keeps
together, and the groups whose members carry different labels."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from embedsearch.report.encoding import Encoded
from embedsearch.report.results import StudyTable
from embedsearch.report.splits import connected_groups

#: Thresholds tried in turn when duplicates chain into implausibly large groups.
NEAR_LADDER = (0.90, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


def max_plausible_group(n: int) -> int:
    """Largest connected duplicate group still taken for real duplicates (bursts of one
    scene); beyond it a threshold is too low for that encoder and chains look-alikes."""
    return max(10, int(np.ceil(0.005 * n)))


def duplicate_groups(table: StudyTable, encoded: list[Encoded], enabled: bool,
                     threshold: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Group ids: connected components over byte-identical files and near-duplicates."""
    n = len(table.ids)
    if not enabled:
        return np.arange(n), {"enabled": False, "groups": 0, "straddling_groups": 0,
                              "note": "duplicate detection was switched off "
                                      "(--no-group-duplicates)"}
    order = np.argsort(table.sha256, kind="stable")
    s = table.sha256[order]
    same = np.flatnonzero((s[1:] == s[:-1]) & (s[1:] != ""))
    exact = np.stack([order[same], order[same + 1]], axis=1) if len(same) \
        else np.zeros((0, 2), np.int64)
    info: dict[str, Any] = {"enabled": True, "exact_pairs": len(exact)}
    near_groups, near_info = _near_duplicates(table, encoded, threshold)
    info.update(near_info)
    pairs = [exact]
    if near_groups is not None:
        pairs.append(_component_pairs(near_groups))
    groups = connected_groups(n, np.concatenate(pairs))
    # Duplicates filed under different classes: worth a look, whatever the split.
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.r_[True, groups[order][1:] != groups[order][:-1], True])
    conflicts = []
    for a, b in itertools.pairwise(bounds):
        members = order[a:b]
        if len(members) > 1 and len(set(table.labels[members])) > 1:
            conflicts.append([f"{table.ids[m]} ({table.labels[m]})" for m in members])
    info["label_conflicts"] = len(conflicts)
    info["label_conflict_examples"] = conflicts[:10]
    return groups, info


def _component_pairs(groups: np.ndarray) -> np.ndarray:
    """Pairs (first member, other member) that rebuild the given components."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.r_[True, g[1:] != g[:-1]]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(g)), 0))]
    keep = ~starts
    return np.stack([first[keep], order[keep]], axis=1).astype(np.int64)


def _near_duplicates(table: StudyTable, encoded: list[Encoded], threshold: float | None
                     ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Near-duplicate components from :mod:`embedsearch.dedupe`, with one encoder.

    The dedupe threshold is calibrated for the default encoder, so that encoder is used
    when it is in the study (else the first). Without an explicit ``threshold`` it is
    calibrated on the study's images exactly as ``dedupe`` and ``leakage`` do
    (:func:`embedsearch.dedupe.bundles.calibrated_pairs`, with the perceptual hashes), and
    raised along :data:`NEAR_LADDER` while duplicates still chain into a connected group
    larger than :func:`max_plausible_group`: the components here join every pair, and
    keeping a chain of look-alikes together would empty a split.
    """
    try:
        from embedsearch.dedupe import find_duplicates, group_labels
        from embedsearch.dedupe.bundles import calibrated_pairs
    except ImportError:
        return None, {"near": "not available (embedsearch.dedupe missing): only "
                              "byte-identical files were grouped"}
    from embedsearch.encoders import DEFAULT_ENCODER

    n = len(table.ids)
    limit = max_plausible_group(n)
    enc = next((e for e in encoded if e.spec == DEFAULT_ENCODER and e.weights is None),
               encoded[0])
    rows = np.asarray(table.rows[enc.slug])
    X = np.asarray(enc.bundle.embeddings)[rows]
    calibration = None
    if threshold is None:
        pairs, calibration = calibrated_pairs(X, sha256=list(table.sha256),
                                              views=_views(enc.bundle, rows))
        ladder = [pairs.threshold, *(t for t in NEAR_LADDER if t > pairs.threshold)]
    else:
        ladder = [threshold]
    notes: list[str] = []
    for t in ladder:
        result = find_duplicates(X, [str(i) for i in table.ids], threshold=t,
                                 sha256=list(table.sha256))
        comp = np.unique(group_labels(result), return_inverse=True)[1].ravel()
        biggest = int(np.bincount(comp).max()) if n else 0
        if biggest <= limit or threshold is not None:
            break
    else:
        return None, {"near": "not used", "near_encoder": enc.label,
                      "near_calibration": calibration,
                      "near_notes": [f"near duplicates not used: even at cosine {ladder[-1]} "
                                     f"{enc.label} chains look-alike images into "
                                     f"groups of {biggest}"],
                      "max_plausible_group": limit}
    if t != ladder[0]:
        notes.append(f"near-duplicate threshold raised from {ladder[0]:g} (calibrated) to "
                     f"{t}: at lower ones {enc.label} chained look-alike images into groups "
                     f"of more than {limit}")
    elif threshold is not None and biggest > limit:
        notes.append(f"at the requested threshold {t} the largest duplicate group has "
                     f"{biggest} images; check that it is not too low")
    sizes = np.bincount(comp)
    return comp, {"near": "embedsearch.dedupe.find_duplicates (similarity of the embeddings)",
                  "near_encoder": enc.label, "near_threshold": t,
                  "near_threshold_source": "given" if threshold is not None else "calibrated",
                  "near_calibration": calibration,
                  "near_groups": int(np.sum(sizes > 1)),
                  "near_images": int(sizes[sizes > 1].sum()),
                  "near_notes": notes, "max_plausible_group": limit}


def _views(bundle: Any, rows: np.ndarray) -> Any:
    """``views(study rows)`` for :func:`calibrated_pairs`: the perceptual hashes of the
    study's images (``rows``: their rows in ``bundle``), cached in the bundle."""
    from dataclasses import fields

    from embedsearch.dedupe.views import ImageViews, bundle_hashes

    def views(study_rows: np.ndarray) -> ImageViews:
        v = bundle_hashes(bundle, rows[study_rows])
        return ImageViews(*(getattr(v, f.name)[rows] for f in fields(ImageViews)))

    return views


__all__ = ["NEAR_LADDER", "duplicate_groups", "max_plausible_group"]

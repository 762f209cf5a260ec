"""kNN in the study: the k sweep (plain and similarity-weighted vote) with train + val as
reference, and the (k, vote) chosen on the validation split with train as reference."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from embedsearch.report.results import Outcome
from embedsearch.report.splits import Fold, SplitPlan
from embedsearch.report.timing import proba_fn, time_predict

VOTES = {"plain": "uniform", "weighted": "similarity"}


def usable_ks(ks: list[int], plan: SplitPlan) -> tuple[list[int], list[str]]:
    """The k values every fold has enough reference images for, and a note on the rest."""
    n_ref = min(len(f.train) + len(f.val) for f in plan.folds)
    used = [k for k in ks if k <= n_ref]
    notes = []
    if len(used) < len(ks):
        dropped = [k for k in ks if k > n_ref]
        notes.append(f"k = {', '.join(map(str, dropped))} skipped: only {n_ref} reference "
                     "images")
    if not used:
        used = [n_ref]
    return used, notes


def select_knn(X: np.ndarray, y: np.ndarray, fold: Fold, ks: list[int]
               ) -> tuple[tuple[int, str], list[dict[str, Any]]]:
    """(k, vote) with the best validation accuracy, reference = train only."""
    from embedsearch.classify.knn import KNNClassifier, vote
    from embedsearch.index import Neighbours

    usable = [k for k in ks if k <= len(fold.train)]
    if len(fold.val) == 0 or not usable:
        k = max([k for k in ks if k <= 10] or [ks[0]])
        return (k, "weighted"), []
    classes, y_idx = np.unique(y[fold.train], return_inverse=True)
    kmax = max(usable)
    neigh = KNNClassifier(kmax).fit(X[fold.train], y[fold.train]).kneighbors(X[fold.val], kmax)
    scores = []
    for k in usable:
        trimmed = Neighbours([i[:k] for i in neigh.ids], [s[:k] for s in neigh.similarities])
        for v in ("plain", "weighted"):
            proba = vote(trimmed, y_idx, len(classes), VOTES[v])
            acc = float(np.mean(classes[proba.argmax(axis=1)] == y[fold.val]))
            scores.append({"k": k, "vote": v, "val_accuracy": acc})
    best = max(scores, key=lambda s: s["val_accuracy"])  # first max: smallest k, plain
    return (best["k"], best["vote"]), scores


def knn_outcomes(X: np.ndarray, y: np.ndarray, fold: Fold, ks: list[int]
                 ) -> dict[str, Outcome]:
    """``knn-{k}-{vote}`` for every k and vote (reference = train + val), then ``knn``:
    the (k, vote) chosen on validation."""
    from embedsearch.classify.knn import KNNClassifier

    ref = np.sort(np.concatenate([fold.train, fold.val]))
    Xr, yr, Xt = X[ref], y[ref], X[fold.test]
    out: dict[str, Outcome] = {}
    chosen, scores = select_knn(X, y, fold, ks)
    for k in ks:
        for v in ("plain", "weighted"):
            t = time.perf_counter()
            clf = KNNClassifier(k, VOTES[v]).fit(Xr, yr)
            fit = time.perf_counter() - t
            pred, conf, bms, sms = time_predict(proba_fn(clf), Xt)
            mid = f"knn-{k}-{v}"
            out[mid] = Outcome(mid, f"kNN k={k} {v}", "knn",
                               {"k": k, "vote": v, "reference": "train+val",
                                "reference_images": len(ref)},
                               pred, conf, fit, bms, sms, int(Xr.shape[0] * Xr.shape[1] * 4))
    src = out[f"knn-{chosen[0]}-{chosen[1]}"]
    out["knn"] = Outcome(
        "knn", f"{src.name}, chosen on val", "knn", dict(src.params), src.pred, src.conf,
        src.fit_seconds, src.batch_ms, src.single_ms, src.model_bytes,
        {"protocol": "best validation accuracy with train as reference"
                     if scores else "no validation rows: default k",
         "k": chosen[0], "vote": chosen[1], "grid": scores})
    return out


__all__ = ["VOTES", "knn_outcomes", "select_knn", "usable_ks"]

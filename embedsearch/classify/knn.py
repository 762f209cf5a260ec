"""Training-free kNN classifier over unit-vector embeddings (scikit-learn-like contract)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from embedsearch.errors import EmbedsearchError
from embedsearch.index import Neighbours, make_index, search

if TYPE_CHECKING:
    import faiss

WEIGHTINGS = ("similarity", "uniform")


def vote(neigh: Neighbours, y_idx: np.ndarray, n_classes: int, weighting: str = "similarity"
         ) -> np.ndarray:
    """Class probabilities from neighbour labels: (weighted) vote shares, rows sum to 1.

    Similarity weighting uses max(cos, 0) so an unrelated neighbour adds nothing. A query
    with no usable neighbour gets a uniform row.
    """
    if weighting not in WEIGHTINGS:
        raise EmbedsearchError(f"unknown weighting {weighting!r}", hint=f"use one of {WEIGHTINGS}")
    proba = np.zeros((len(neigh.ids), n_classes), np.float64)
    for i, (ids, sims) in enumerate(zip(neigh.ids, neigh.similarities, strict=True)):
        w = np.ones(len(ids)) if weighting == "uniform" else np.clip(sims, 0.0, None) + 1e-6
        y = y_idx[ids]
        voters = y >= 0  # unlabelled neighbours (class -1) are shown, but do not vote
        np.add.at(proba[i], y[voters], w[voters])
    totals = proba.sum(axis=1, keepdims=True)
    empty = totals[:, 0] == 0
    proba[empty] = 1.0 / max(n_classes, 1)
    totals[empty] = 1.0
    return proba / totals


class KNNClassifier:
    """kNN over an inner-product faiss index; ``classes_`` sorted like scikit-learn."""

    def __init__(self, k: int = 10, weighting: str = "similarity") -> None:
        if k < 1:
            raise EmbedsearchError(f"k must be at least 1, got {k}")
        self.k = k
        self.weighting = weighting
        self.classes_: np.ndarray = np.array([])
        self._y_idx = np.zeros(0, np.int64)
        self._index: faiss.Index | None = None
        self._limit: int | None = None

    def fit(self, X: np.ndarray, y: Sequence[str] | np.ndarray) -> KNNClassifier:
        index, _ = make_index(np.asarray(X, np.float32), "flat")
        return self.fit_index(index, y)

    def fit_index(self, index: faiss.Index, y: Sequence[str] | np.ndarray,
                  limit: int | None = None) -> KNNClassifier:
        """Use an existing index whose first ``limit`` rows carry the labels ``y``.

        Missing labels (None or NaN) mark unlabelled rows: never a class, never a vote.
        """
        labels = np.array([None if _missing(v) else str(v) for v in y], dtype=object)
        known = labels != None  # noqa: E711 (element-wise on an object array)
        if not known.any():
            raise EmbedsearchError("cannot fit a kNN classifier on zero labelled vectors",
                                   hint="the index has no labelled reference images")
        self.classes_, idx = np.unique(labels[known].astype(str), return_inverse=True)
        self._y_idx = np.full(len(labels), -1, np.int64)
        self._y_idx[known] = idx
        self._index, self._limit = index, (limit if limit is not None else len(labels))
        return self

    def kneighbors(self, X: np.ndarray, k: int | None = None) -> Neighbours:
        if self._index is None:
            raise EmbedsearchError("KNNClassifier is not fitted")
        return search(self._index, X, k or self.k, self._limit)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return vote(self.kneighbors(X), self._y_idx, len(self.classes_), self.weighting)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))

"""Training-free kNN classifier over unit-vector embeddings (a scikit-learn estimator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

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


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """kNN over an inner-product faiss index, a scikit-learn estimator.

    ``k`` and ``weighting`` are its parameters (``get_params``/``set_params``, so ``clone``,
    ``Pipeline``, ``cross_val_score`` and ``GridSearchCV`` work); they are checked by
    ``fit``. Fitted attributes: ``classes_`` (sorted like scikit-learn), ``index_`` (the
    faiss index searched), ``n_reference_`` (its first rows, the labelled reference set,
    searched) and ``n_features_in_``. Inputs are compared by inner product: pass unit
    vectors for cosine similarity (embeddings are; in a ``Pipeline`` put a ``Normalizer``
    first). Labels are compared as strings, as bundles store them: ``classes_`` and
    ``predict`` are str, so give scikit-learn's scorers string labels too.
    """

    def __init__(self, k: int = 10, weighting: str = "similarity") -> None:
        self.k = k
        self.weighting = weighting

    def fit(self, X: np.ndarray, y: Sequence[str] | np.ndarray) -> KNNClassifier:
        self._check_params()
        index, _ = make_index(np.asarray(X, np.float32), "flat")
        return self.fit_index(index, y)

    def fit_index(self, index: faiss.Index, y: Sequence[str] | np.ndarray,
                  limit: int | None = None) -> KNNClassifier:
        """Use an existing index whose first ``limit`` rows carry the labels ``y``.

        Missing labels (None or NaN) mark unlabelled rows: never a class, never a vote.
        """
        self._check_params()
        labels = np.array([None if _missing(v) else str(v) for v in y], dtype=object)
        known = labels != None  # noqa: E711 (element-wise on an object array)
        if not known.any():
            raise EmbedsearchError("cannot fit a kNN classifier on zero labelled vectors",
                                   hint="the index has no labelled reference images")
        self.classes_, idx = np.unique(labels[known].astype(str), return_inverse=True)
        # Class index per reference row, -1 for unlabelled rows (like scikit-learn's
        # KNeighborsClassifier._y: private, set by fit).
        self._y_idx = np.full(len(labels), -1, np.int64)
        self._y_idx[known] = idx
        self.index_ = index
        self.n_reference_ = limit if limit is not None else len(labels)
        self.n_features_in_ = int(index.d)
        return self

    def _check_params(self) -> None:
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise EmbedsearchError(f"k must be at least 1, got {self.k}")
        if self.weighting not in WEIGHTINGS:
            raise EmbedsearchError(f"unknown weighting {self.weighting!r}",
                                   hint=f"use one of {WEIGHTINGS}")

    def kneighbors(self, X: np.ndarray, k: int | None = None) -> Neighbours:
        """The ``k`` (default: the classifier's) nearest reference rows of each row of X."""
        if not hasattr(self, "index_"):
            raise EmbedsearchError("KNNClassifier is not fitted",
                                   hint="call fit (or fit_index) first")
        return search(self.index_, X, k or self.k, self.n_reference_)

    def vote(self, neigh: Neighbours) -> np.ndarray:
        """Class probabilities (columns: ``classes_``) from already searched neighbours."""
        return vote(neigh, self._y_idx, len(self.classes_), self.weighting)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.vote(self.kneighbors(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))

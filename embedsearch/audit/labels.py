"""Likely label errors and outliers from cached embeddings.

Label errors: every labelled image gets two out-of-sample opinions of its class,

- a linear head (multinomial logistic regression on standardised embeddings, the project's
  :func:`~embedsearch.classify.heads.fit_multinomial`) trained in K folds without the image,
  its regularisation chosen by the out-of-fold log loss on the collection's own (noisy)
  labels, so it calibrates itself to the data;
- a similarity-weighted vote of its k nearest neighbours (itself excluded);

and the two probability vectors are averaged. The label score is one minus the averaged
probability of the given label (cleanlab's "self-confidence" on the combined
probabilities); the suggested label is the averaged arg-max. Each opinion alone ranks
planted label flips well; their errors differ (the head misses flips between classes that
overlap in feature space, the vote misses flips whose neighbours are themselves noisy), so
the average ranks better than either on clothing-small and on its held-out part: see
``benchmarks/results/audit.md``. Which images count as *issues* (the flag, as opposed to
the ranking) is decided by cleanlab's confident learning
(:func:`cleanlab.filter.find_label_issues`) on the same averaged probabilities.

Outliers: Mahalanobis distance to the nearest class mean (:func:`outlier_scores`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedsearch.classify.base import single_thread

log = logging.getLogger(__name__)

#: Inverse regularisation strengths tried (standardised inputs): label noise favours the
#: strongly regularised end, below the heads' usual grid.
AUDIT_C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_FOLDS = 5
#: Neighbours that vote on an image's label.
DEFAULT_LABEL_K = 20
#: Principal components the outlier distance is measured in, and the rows they are fit on.
OUTLIER_DIMS = 128
PCA_SAMPLE = 20_000


@dataclass
class Neighbourhood:
    """Each row's nearest other rows (ids into the same array) and their similarities."""

    ids: np.ndarray      # (n, k) int64, -1 where fewer than k others exist
    sims: np.ndarray     # (n, k) float32

    @classmethod
    def search(cls, vectors: np.ndarray, k: int, index: Any = None) -> Neighbourhood:
        """The k nearest others of every row, through ``index`` (a faiss index over these
        very rows, e.g. the bundle's) or a new one (exact up to 200,000 rows)."""
        from embedsearch.index import make_index, search

        vectors = np.ascontiguousarray(vectors, np.float32)
        n = len(vectors)
        if index is None:
            index, _ = make_index(vectors, "auto")
        found = search(index, vectors, min(k + 1, n))
        ids = np.full((n, k), -1, np.int64)
        sims = np.zeros((n, k), np.float32)
        for q in range(n):
            keep = found.ids[q] != q
            got_i, got_s = found.ids[q][keep][:k], found.similarities[q][keep][:k]
            ids[q, : len(got_i)] = got_i
            sims[q, : len(got_s)] = got_s
        return cls(ids, sims)


@dataclass
class LabelScores:
    """Per labelled row: the combined probabilities and what they say."""

    classes: np.ndarray
    proba: np.ndarray           # (n, classes), mean of the head's and the vote's
    head_proba: np.ndarray
    knn_proba: np.ndarray
    given: np.ndarray           # class index of the given label
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def given_prob(self) -> np.ndarray:
        return self.proba[np.arange(len(self.given)), self.given]

    @property
    def score(self) -> np.ndarray:
        """1 − probability of the given label: higher means more likely mislabelled."""
        return 1.0 - self.given_prob

    @property
    def suggested(self) -> np.ndarray:
        return self.classes[self.proba.argmax(axis=1)]

    @property
    def suggested_prob(self) -> np.ndarray:
        return self.proba.max(axis=1)

    def issues(self) -> np.ndarray:
        """Boolean per row: cleanlab's confident-learning verdict on the combined
        probabilities (its own estimate of how many labels are wrong, per class pair)."""
        from cleanlab.filter import find_label_issues

        if len(self.classes) < 2:
            return np.zeros(len(self.given), bool)
        return np.asarray(find_label_issues(self.given, self.proba), bool)


def out_of_fold_head(vectors: np.ndarray, y: np.ndarray, n_classes: int, *,
                     folds: int = DEFAULT_FOLDS, grid: tuple[float, ...] = AUDIT_C_GRID,
                     seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Out-of-fold class probabilities of a linear head, C chosen by out-of-fold log loss.

    Returns (probabilities (n, n_classes), {"C", "folds", "log_loss"}).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(vectors, np.float32)
    n = len(X)
    folds = max(2, min(folds, int(np.bincount(y).max())))
    grid = tuple(sorted(grid))
    oof = np.zeros((len(grid), n, n_classes))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y)
    with single_thread():
        for tr, te in split:
            mean = X[tr].mean(axis=0, dtype=np.float64)
            std = X[tr].std(axis=0, dtype=np.float64)
            std[std < 1e-8] = 1.0
            Z, Zt = (X[tr] - mean) / std, (X[te] - mean) / std
            # Each C starts from the previous solution (the path is cheap after the first).
            clf = LogisticRegression(C=grid[0], max_iter=500, warm_start=True)
            for j, C in enumerate(grid):
                clf.set_params(C=C).fit(Z, y[tr])
                oof[j][np.ix_(te, clf.classes_)] = clf.predict_proba(Zt)
    rows = np.arange(n)
    losses = [float(-np.log(np.clip(p[rows, y], 1e-12, 1.0)).mean()) for p in oof]
    best = int(np.argmin(losses))
    return oof[best], {"C": grid[best], "folds": folds,
                       "log_loss": {str(c): round(v, 4) for c, v in zip(grid, losses, strict=True)}}


def neighbour_vote(neigh: Neighbourhood, y: np.ndarray, n_classes: int, k: int
                   ) -> np.ndarray:
    """Similarity-weighted class shares among each row's k nearest labelled others
    (``y`` = -1 for unlabelled rows, which do not vote)."""
    ids, sims = neigh.ids[:, :k], neigh.sims[:, :k]
    n = len(ids)
    proba = np.zeros((n, n_classes))
    valid = ids >= 0
    lab = np.where(valid, y[np.where(valid, ids, 0)], -1)
    w = np.where(lab >= 0, np.maximum(sims, 0.0), 0.0)
    for j in range(ids.shape[1]):
        ok = lab[:, j] >= 0
        np.add.at(proba, (np.flatnonzero(ok), lab[ok, j]), w[ok, j])
    total = proba.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    proba[empty] = 1.0 / n_classes  # nobody voted: no opinion
    total[empty] = 1.0
    return proba / total


def label_scores(vectors: np.ndarray, labels: np.ndarray, *,
                 neighbours: Neighbourhood | None = None, folds: int = DEFAULT_FOLDS,
                 k: int = DEFAULT_LABEL_K, seed: int = 0) -> LabelScores:
    """Label-error evidence for every row of ``vectors`` whose label is not None.

    ``neighbours`` may be a precomputed :class:`Neighbourhood` over the same rows (the
    audit shares one search between labels and outliers). Rows without a label get NaN
    probabilities; their neighbours do not vote.
    """
    labels = np.asarray(labels, dtype=object)
    has = np.array([lbl is not None and lbl == lbl for lbl in labels])  # NaN != NaN
    classes, y_lab = np.unique(labels[has].astype(str), return_inverse=True)
    y = np.full(len(labels), -1, np.int64)
    y[has] = y_lab
    if neighbours is None:
        neighbours = Neighbourhood.search(vectors, k)
    n_classes = len(classes)
    head = np.full((len(labels), n_classes), np.nan)
    info: dict[str, Any] = {"k": k, "classes": len(classes), "labelled": int(has.sum())}
    if n_classes >= 2:
        rows = np.flatnonzero(has)
        head[rows], info["head"] = out_of_fold_head(np.asarray(vectors)[rows], y[rows],
                                                    n_classes, folds=folds, seed=seed)
    else:
        head[has] = 1.0
    knn = neighbour_vote(neighbours, y, n_classes, k)
    knn[~has] = np.nan
    proba = (head + knn) / 2.0
    return LabelScores(classes, proba, head, knn, np.where(has, y, 0), info)


def outlier_scores(vectors: np.ndarray, labels: np.ndarray | None = None,
                   neighbours: Neighbourhood | None = None, *, k: int = 10,
                   seed: int = 0) -> np.ndarray:
    """How far off-topic each image is, in robust standard deviations of this collection
    (median + z · 1.4826 · MAD): the larger of two views.

    - :func:`mahalanobis_scores`, the distance from the collection's own distribution: it
      finds off-topic images that come in groups (scans of a form, a batch of
      screenshots), which are each other's nearest neighbours;
    - one minus the mean similarity to the k nearest others: it finds a lone image that
      sits between the classes. With 48 other-domain images in three groups added to
      clothing-small, the first alone scores AUROC 0.999, the second 0.46; with one image
      of each, 0.991 and 0.9999 (benchmarks/results/audit.md).
    """
    if neighbours is None:
        neighbours = Neighbourhood.search(vectors, k)
    valid = neighbours.ids[:, :k] >= 0
    sims = np.where(valid, neighbours.sims[:, :k], 0.0).sum(axis=1) / np.maximum(
        valid.sum(axis=1), 1)
    return np.maximum(robust_z(mahalanobis_scores(vectors, labels, seed=seed)),
                      robust_z(1.0 - sims))


def mahalanobis_scores(vectors: np.ndarray, labels: np.ndarray | None = None, *,
                       dims: int = OUTLIER_DIMS, seed: int = 0) -> np.ndarray:
    """Mahalanobis distance to the nearest class mean, with one covariance shared by the
    classes (Ledoit-Wolf shrinkage), in the collection's top ``dims`` principal
    components; unlabelled collections use one mean."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    X = np.asarray(vectors, np.float32)
    n, d = X.shape
    k = int(max(1, min(dims, d, n // 4)))
    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(n, min(n, PCA_SAMPLE), replace=False) if n > PCA_SAMPLE \
        else np.arange(n)
    pca = PCA(n_components=k, random_state=seed).fit(X[fit_rows])
    Z = pca.transform(X).astype(np.float64)
    has = np.zeros(n, bool) if labels is None else np.array(
        [lbl is not None and lbl == lbl for lbl in labels])
    if has.sum() >= 2:
        classes, y = np.unique(np.asarray(labels, dtype=object)[has].astype(str),
                               return_inverse=True)
        means = np.stack([Z[has][y == c].mean(axis=0) for c in range(len(classes))])
        resid = Z[has] - means[y]
    else:
        means = Z.mean(axis=0, keepdims=True)
        resid = Z - means
    prec = LedoitWolf().fit(resid).precision_
    best = np.full(n, np.inf)
    for m in means:
        diff = Z - m
        best = np.minimum(best, np.einsum("ij,jk,ik->i", diff, prec, diff))
    return np.sqrt(np.maximum(best, 0.0))


def robust_z(score: np.ndarray) -> np.ndarray:
    """(score − median) / (1.4826 × MAD) over this very collection: a scale that
    calibrates itself on the data."""
    score = np.asarray(score, np.float64)
    finite = score[np.isfinite(score)]
    if not len(finite):
        return np.zeros(len(score))
    med = float(np.median(finite))
    mad = float(np.median(np.abs(finite - med))) * 1.4826
    return (score - med) / max(mad, 1e-9)

"""The linear head: scikit-learn's multinomial logistic regression on standardised inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from embedsearch.classify import DEFAULT_SELECT_BY
from embedsearch.classify.base import Head, Standardiser, single_thread

#: Inverse regularisation strengths tried by the linear head: scikit-learn's C of
#: ``LogisticRegression`` on *standardised* inputs (zero mean, unit variance per dimension).
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
#: A C chosen at an end of the grid extends it by one grid step (x ~3), up to these limits.
C_LIMITS = (1e-5, 100.0)


class LinearHead(Head):
    """Multinomial logistic regression (scikit-learn, lbfgs) on standardised inputs.

    ``C`` is scikit-learn's inverse regularisation strength of ``LogisticRegression``, but
    applied to standardised inputs (each dimension scaled to zero mean and unit variance
    with the training rows' statistics), so it does not depend on the encoder's scale.
    ``C=None`` searches ``grid`` (warm-started from small to large C) and extends it by a
    step when the best C lies at either end.
    """

    kind = "linear"
    _in_key = "coef"
    _out_key = "coef"
    _bias_key = "intercept"

    def __init__(self, C: float | None = None, class_weight: str = "auto",
                 select_by: str = DEFAULT_SELECT_BY, seed: int = 0, refit: bool = True,
                 grid: Sequence[float] = C_GRID, cv_folds: int = 5, holdout: float = 0.15,
                 max_iter: int = 1000) -> None:
        self.C = C
        self.class_weight = class_weight
        self.select_by = select_by
        self.seed = seed
        self.refit = refit
        self.grid = grid
        self.cv_folds = cv_folds
        self.holdout = holdout
        self.max_iter = max_iter

    def _cv_folds(self) -> int:
        return self.cv_folds

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return X @ params["coef"].T + params["intercept"]

    def _path(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray, grid: Sequence[float],
              init: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[Standardiser, list[tuple[np.ndarray, np.ndarray, int]]]:
        """Fit every C of ``grid`` in order, each warm-started from the previous one (the
        first from ``init``). Returns the standardiser and, per C, (W, b, iterations) on
        standardised inputs with one row per class of ``classes_`` (a class absent from
        these rows gets -inf logits)."""
        from sklearn.linear_model import LogisticRegression

        st = Standardiser(X)
        Z = st(X)
        present = np.unique(y_idx)
        k = len(self.classes_)
        clf = LogisticRegression(C=grid[0], max_iter=self.max_iter, warm_start=True)
        if init is not None and len(present) == k:
            clf.coef_, clf.intercept_ = init[0][present].copy(), init[1][present].copy()
            if k == 2:
                clf.coef_, clf.intercept_ = clf.coef_[1:] * 2, clf.intercept_[1:] * 2
        out = []
        sw = cw[y_idx]
        with single_thread():
            for C in grid:
                clf.set_params(C=C)
                clf.fit(Z, y_idx, sample_weight=sw)
                coef, intercept = clf.coef_, clf.intercept_
                if len(present) == 2:  # binary: sigmoid(z) = softmax([-z/2, z/2])
                    coef = np.vstack([-coef / 2, coef / 2])
                    intercept = np.r_[-intercept / 2, intercept / 2]
                W = np.zeros((k, X.shape[1]))
                b = np.full(k, -np.inf)
                W[present], b[present] = coef, intercept
                out.append((W, b, int(np.max(clf.n_iter_))))
        return st, out

    def _search(self, held: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cw: np.ndarray
                ) -> tuple[list[dict[str, Any]], list[np.ndarray], list[str]]:
        grid = [float(self.C)] if self.C is not None else sorted(float(c) for c in self.grid)
        self._fitted: dict[float, list[tuple[Standardiser, np.ndarray, np.ndarray]]] = {}
        notes: list[str] = []
        logits: dict[float, list[np.ndarray]] = {}

        def run(cs: list[float], init: list[Any] | None) -> list[Any]:
            last = []
            for i, (Xf, yf, Xh) in enumerate(held):
                st, path = self._path(Xf, yf, cw, cs, init[i] if init else None)
                Zh = st(Xh)
                for C, (W, b, _) in zip(cs, path, strict=True):
                    logits.setdefault(C, []).append(Zh @ W.T + b)
                    # Kept per C and fold: warm start of the final fit, the MLP's base.
                    self._fitted.setdefault(C, []).append((st, W, b))
                last.append((path[-1][0], path[-1][1]))
            return last

        ends = run(grid, None)
        if self.C is None:
            # Extend past an end of the grid while the best C sits there.
            step = grid[1] / grid[0] if len(grid) > 1 else 3.0
            while True:
                best = max(logits, key=lambda c: self._best_score(np.vstack(logits[c])))
                if best == max(logits) and best * step <= C_LIMITS[1] * 1.0001:
                    new = best * step
                    ends = run([new], ends)
                    notes.append(f"C={best:g} was the largest tried: extended to C={new:g}")
                elif best == min(logits) and best / step >= C_LIMITS[0] * 0.9999:
                    new = best / step
                    run([new], None)
                    notes.append(f"C={best:g} was the smallest tried: extended to C={new:g}")
                else:
                    break
        cs = sorted(logits)
        return [{"C": C} for C in cs], [np.vstack(logits[C]) for C in cs], notes

    def fit_at(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray, C: float
               ) -> tuple[Standardiser, np.ndarray, np.ndarray, int]:
        """One fit at ``C`` (warm-started from the search's first fold at that C, whose
        standardisation is close): (standardiser, W, b on standardised inputs, iterations)."""
        init = None
        fitted = getattr(self, "_fitted", {}).get(C)
        if fitted and np.isfinite(fitted[0][2]).all():
            st0, W0, b0 = fitted[0]
            st = Standardiser(X)
            # The same map expressed on this standardisation: W0 (x - m0) / s0 + b0.
            W = W0 / st0.std * st.std
            init = (W, b0 + W0 @ ((st.mean - st0.mean) / st0.std))
        st, path = self._path(X, y_idx, cw, [C], init)
        W, b, iters = path[0]
        return st, W, b, iters

    def _final(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
               setting: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        st, W, b, iters = self.fit_at(X, y_idx, cw, setting["C"])
        coef, intercept = st.fold(W, b)
        return ({"coef": coef, "intercept": intercept},
                {"lbfgs_iterations": iters, "converged": iters < self.max_iter})

"""Small trained heads over cached embeddings: multinomial logistic regression and an MLP.

Both are scikit-learn estimators (``BaseEstimator`` + ``ClassifierMixin``: ``clone``,
``cross_val_score`` and ``get_params`` work) with ``classes_`` sorted like scikit-learn,
and both predict with plain numpy from float32 arrays, so a head saved as
``weights.safetensors`` + ``head.json`` loads without pickle, without scikit-learn and
without torch, and gives bit-identical predictions after loading.

Protocol, the same for both kinds:

* inputs are standardised with the training mean/std, folded into the first layer's
  weights when training ends (nothing extra to store or apply);
* settings are chosen by the metric the user declares (``select_by``: accuracy, balanced
  accuracy or macro-F1; ties go to the lower log loss) on the validation rows (``X_val``)
  when given; otherwise on out-of-fold predictions (linear head, fewer than
  ``HOLDOUT_MIN_ROWS`` rows: stratified k-fold) or on a stratified 15 % hold-out;
* the settings searched include the class prior: with ``class_weight="auto"`` the logits
  get a post-hoc prior correction ``- tau * log(prior)`` with tau from 0 (plain, best
  accuracy on the training distribution) to 1 (the balanced-error optimum; "logit
  adjustment", Menon et al., ICLR 2021), chosen like any other setting. It costs no extra
  fit, where a separate class-weighted fit per candidate would double the training time;
* the validation figures reported in ``info["validation"]`` always come from a model that
  never saw those rows; the final weights are then refit on train + validation with the
  chosen setting (``refit=False`` keeps the train-only model).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from embedsearch.classify import DEFAULT_SELECT_BY, SELECT_BY
from embedsearch.classify.metrics import (
    balanced_weights,
    class_counts,
    classification_figures,
    softmax,
)
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.store.io import file_digest, read_versioned_json, write_json

log = logging.getLogger(__name__)

HEAD_FORMAT = "embedsearch-head"
HEAD_SCHEMA = 1
HEAD_KINDS = ("linear", "mlp")
CLASS_WEIGHTS = ("auto", "balanced", "none")
#: Prior-correction strengths searched by ``class_weight="auto"`` (0 = none, 1 = balanced).
PRIOR_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Inverse regularisation strengths tried by the linear head: scikit-learn's C of
#: ``LogisticRegression`` on *standardised* inputs (zero mean, unit variance per dimension).
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
#: A C chosen at an end of the grid extends it by one grid step (x ~3), up to these limits.
C_LIMITS = (1e-5, 100.0)
#: Without validation rows, fewer training rows than this cross-validate (k folds); more
#: use one stratified hold-out (enough rows for a stable estimate, k times cheaper).
HOLDOUT_MIN_ROWS = 1500
#: MLP schedule length when ``max_epochs`` is None: about this many optimizer steps...
MLP_STEPS = 600
#: ... within these epoch bounds.
MLP_EPOCHS = (15, 40)
#: An MLP whose best epoch is its schedule's last is retrained on a schedule twice as long
#: when rows x epochs stays under this (larger sets: flagged only, to bound the time).
MLP_EXTEND_ROW_EPOCHS = 250_000
WEIGHTS_FILE = "weights.safetensors"
HEAD_FILE = "head.json"
#: ``extra_train``: (vectors, labels) or (vectors, labels, source row in the training matrix).
ExtraTrain = tuple[np.ndarray, Any] | tuple[np.ndarray, Any, np.ndarray]


def _as_matrix(X: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(X)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        expect = f"(n, {dim})" if dim is not None else "(n, dim)"
        raise EmbedsearchError(f"{what} have shape {tuple(x.shape)}, expected {expect}",
                               hint="use embeddings from the encoder the head was trained on")
    if not np.isfinite(x).all():
        raise EmbedsearchError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise EmbedsearchError(f"unknown {what} {value!r}", hint=f"use one of {tuple(allowed)}")
    return value


def stratified_holdout(y_idx: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a stratified ``fraction`` of rows (at least one per class that has
    two or more rows, never a class's last row).

    Hand-written because scikit-learn's ``train_test_split(stratify=)`` refuses a class
    with a single row, which small user collections have.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y_idx), bool)
    for c in np.unique(y_idx):
        rows = np.flatnonzero(y_idx == c)
        if len(rows) < 2:
            continue
        take = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        mask[rng.choice(rows, take, replace=False)] = True
    return mask


def single_thread() -> contextlib.AbstractContextManager[Any]:
    """BLAS and OpenMP on one thread: for (n x d) @ (d x classes) products the threads
    cost more in spin-waiting than they gain (scikit-learn's LogisticRegression measured
    1.1-1.6 s on 3,409 x 1280 under this limit, 30-65 s without, on 2 busy cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


class _Standardiser:
    """Per-dimension mean/std of the training rows, folded into a first layer later."""

    def __init__(self, X: np.ndarray) -> None:
        self.mean = X.mean(axis=0, dtype=np.float64)
        self.std = X.std(axis=0, dtype=np.float64)
        self.std[self.std < 1e-8] = 1.0

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.std).astype(np.float32)

    def fold(self, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) on standardised inputs -> the same map on raw inputs, float32."""
        W_raw = np.asarray(W, np.float64) / self.std
        return W_raw.astype(np.float32), (np.asarray(b, np.float64)
                                          - W_raw @ self.mean).astype(np.float32)


def _score(logits: np.ndarray, y_idx: np.ndarray, classes: np.ndarray, metric: str
           ) -> tuple[float, float]:
    """(selection metric, log loss) of ``logits`` on rows whose class index is ``y_idx``
    (-1: a class unknown to training, always wrong)."""
    proba = softmax(logits)
    truth = np.where(y_idx >= 0, classes[np.clip(y_idx, 0, None)], "\0unknown")
    f = classification_figures(truth, classes[proba.argmax(1)])
    ok = y_idx >= 0
    p = np.clip(proba[np.flatnonzero(ok), y_idx[ok]], 1e-12, 1.0)
    return float(f[metric]), float(-np.log(p).mean()) if ok.any() else float("inf")


class Head(ClassifierMixin, BaseEstimator):
    """Shared plumbing: labels, priors, the selection protocol, numpy prediction, files.

    Subclasses implement ``_candidates`` (fit on some rows, return logits of the held-out
    rows per setting) and ``_final`` (fit the chosen setting on the final rows).
    """

    kind: ClassVar[str] = ""
    _in_key: ClassVar[str] = ""  # the (outputs, inputs) weight matrix of the first layer
    _out_key: ClassVar[str] = ""  # a tensor with one row per class
    _bias_key: ClassVar[str] = ""  # the output bias (the prior correction is folded in)
    #: Fitted weights (float32, raw input space) and what ``head.json`` records about
    #: training; set by ``fit`` or ``load_head``.
    params: dict[str, np.ndarray] = {}  # noqa: RUF012 (replaced, never mutated)
    info: dict[str, Any] = {}  # noqa: RUF012

    # -- contract -------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: Sequence[str] | np.ndarray, X_val: np.ndarray | None = None,
            y_val: Sequence[str] | np.ndarray | None = None, *,
            extra_train: ExtraTrain | None = None) -> Head:
        """Fit on ``X``/``y``; ``X_val``/``y_val`` (optional) choose the settings.

        ``extra_train`` = ``(X_extra, y_extra)`` or ``(X_extra, y_extra, source)``: more
        training rows (e.g. embeddings of augmented views) used for training only, never
        scored for selection or validation figures. ``source[i]`` is the row of ``X`` that
        view ``i`` was made from (-1 when unknown); when the head holds rows of ``X`` out
        for its own selection (no ``X_val``), views of held-out rows are left out of that
        fit, and views without a source are used only when no row of ``X`` is held out.
        """
        t0 = time.perf_counter()
        check_choice(self.class_weight, CLASS_WEIGHTS, "class weight")
        check_choice(self.select_by, SELECT_BY, "selection metric")
        X = _as_matrix(X, "training vectors")
        labels = np.asarray(y).astype(str)
        if len(labels) != len(X):
            raise EmbedsearchError(f"{len(X)} vectors but {len(labels)} labels")
        self.classes_, y_idx = np.unique(labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise EmbedsearchError(
                f"a head needs at least two classes, found {len(self.classes_)} "
                f"({', '.join(self.classes_) or 'none'})",
                hint="kNN search still works; label more classes to train a head")
        self._extra = self._extra_rows(extra_train, X.shape[1], len(X))
        val_labels = None
        if X_val is not None and y_val is not None and len(y_val) > 0:
            X_val = _as_matrix(X_val, "validation vectors", X.shape[1])
            val_labels = np.asarray(y_val).astype(str)
            known = np.isin(val_labels, self.classes_)
            if not known.all():
                # A class seen only in validation cannot be learnt from train; it still counts
                # against the head in the validation figures through those rows' predictions.
                log.warning("%d validation rows have classes absent from training",
                            int((~known).sum()))
            val_idx = np.where(known, np.searchsorted(self.classes_, val_labels), -1)
        else:
            X_val, val_idx = None, None
        counts = class_counts(labels)
        n = np.bincount(y_idx, minlength=len(self.classes_))
        self._log_prior = np.log(n / n.sum())
        weighted = self.class_weight == "balanced"
        taus = PRIOR_TAUS if self.class_weight == "auto" and n.max() > n.min() else (0.0,)
        cw = balanced_weights(y_idx, len(self.classes_)) if weighted else \
            np.ones(len(self.classes_))
        self.info = {
            "counts": {"train": counts,
                       **({"val": class_counts(val_labels)} if val_labels is not None else {})},
            "class_weight": {"requested": self.class_weight,
                             "used": "balanced" if weighted else (
                                 "none" if len(taus) == 1 else "prior correction"),
                             **({"weights": {str(c): round(float(w), 4) for c, w
                                             in zip(self.classes_, cw, strict=True)}}
                                if weighted else {})},
        }
        self._select_and_fit(X, y_idx, cw, X_val, val_idx, val_labels, taus)
        self.info["train_seconds"] = round(time.perf_counter() - t0, 3)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits, one column per entry of ``classes_``."""
        self._check_fitted()
        return self._logits(self.params, _as_matrix(X, "vectors", self.dim))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        best = self.decision_function(X).argmax(axis=1)
        return self.classes_[best]

    @property
    def dim(self) -> int:
        self._check_fitted()
        return int(self.params[self._in_key].shape[1])

    def hyperparameters(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in self.get_params().items()}

    # -- selection ------------------------------------------------------------------------
    def _plan(self, y_idx: np.ndarray) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Without validation rows: (protocol, [(fit rows, held-out rows)...])."""
        counts = np.bincount(y_idx)
        folds = min(self._cv_folds(), int(counts[counts > 0].min()))
        if len(y_idx) < HOLDOUT_MIN_ROWS and folds >= 2:
            from sklearn.model_selection import StratifiedKFold

            skf = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
            return f"{folds}-fold cross-validation", list(skf.split(np.zeros(len(y_idx)),
                                                                    y_idx))
        mask = stratified_holdout(y_idx, self.holdout, self.seed)
        if not mask.any():
            raise EmbedsearchError("too few examples to hold any out for choosing settings",
                                   hint="label at least two images per class")
        return (f"stratified {self.holdout:.0%} hold-out of the training rows",
                [(np.flatnonzero(~mask), np.flatnonzero(mask))])

    def _cv_folds(self) -> int:
        return 1  # a hold-out unless a subclass cross-validates

    def _select_and_fit(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
                        X_val: np.ndarray | None, val_idx: np.ndarray | None,
                        val_labels: np.ndarray | None, taus: Sequence[float]) -> None:
        # Each fit sees the same rows for every setting; each setting's held-out logits are
        # pooled over folds, then scored for every prior correction.
        if X_val is not None and val_idx is not None and val_labels is not None:
            protocol = "validation split"
            held = [(*self._with_extra(X, y_idx, None), X_val)]
            self._held_truth, truth_labels = val_idx, val_labels
        else:
            protocol, splits = self._plan(y_idx)
            held = [(*self._with_extra(X[tr], y_idx[tr], tr), X[te]) for tr, te in splits]
            self._held_truth = np.concatenate([y_idx[te] for _, te in splits])
            truth_labels = self.classes_[self._held_truth]
        self._taus = tuple(taus)
        settings, pooled, notes = self._search(held, cw)
        table = []
        best_key: tuple[float, float] | None = None
        for s, logits in zip(settings, pooled, strict=True):
            for tau in taus:
                metric, loss = _score(logits - tau * self._log_prior, self._held_truth,
                                      self.classes_, self.select_by)
                table.append({**s, **({"tau": tau} if len(taus) > 1 else {}),
                              f"val_{self.select_by}": round(metric, 4),
                              "val_loss": round(loss, 4)})
                if best_key is None or (metric, -loss) > best_key:
                    best_key, best, best_logits, best_tau = (metric, -loss), s, logits, tau
        proba = softmax(best_logits - best_tau * self._log_prior)
        figures = classification_figures(truth_labels, self.classes_[proba.argmax(1)], proba,
                                         self.classes_)
        if X_val is not None and val_idx is not None and self.refit:
            ok = val_idx >= 0
            final_X, final_y = np.vstack([X, X_val[ok]]), np.concatenate([y_idx, val_idx[ok]])
        else:
            final_X, final_y = X, y_idx
        final_X, final_y = self._with_extra(final_X, final_y, None)
        params, fitted = self._final(final_X, final_y, cw, best)
        # The prior correction is a constant per class: folded into the output bias.
        params[self._bias_key] = (params[self._bias_key]
                                  - best_tau * self._log_prior).astype(np.float32)
        self.params = params
        self.info["selection"] = {
            "protocol": protocol, "metric": self.select_by,
            "criterion": f"validation {self.select_by} (ties: lower log loss)",
            **best, **({"tau": best_tau} if len(taus) > 1 else {}),
            **fitted, "grid": table, **({"notes": notes} if notes else {})}
        self.info["validation"] = figures
        self.info["trained_on"] = {
            "rows": len(final_y),
            "refit_on_train_and_val": bool(X_val is not None and self.refit),
            "extra_rows": self._extra_count()}

    def _best_score(self, logits: np.ndarray) -> tuple[float, float]:
        """(metric, -log loss) of held-out ``logits`` at their best prior correction."""
        return max(((m, -loss) for m, loss in (
            _score(logits - t * self._log_prior, self._held_truth, self.classes_,
                   self.select_by) for t in self._taus)))

    # -- subclass hooks -------------------------------------------------------------------
    def _search(self, held: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cw: np.ndarray
                ) -> tuple[list[dict[str, Any]], list[np.ndarray], list[str]]:
        """For each (fit X, fit y, held-out X): fit every setting, return (settings, logits
        of the held-out rows per setting pooled over the list, notes)."""
        raise NotImplementedError

    def _final(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
               setting: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        raise NotImplementedError

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not self.params:
            raise EmbedsearchError(f"this {self.kind} head is not fitted")

    # -- extra training rows ----------------------------------------------------------------
    def _extra_rows(self, extra: ExtraTrain | None, dim: int, n: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Checked ``extra_train``: (vectors, class indices, source rows with -1 unknown)."""
        if extra is None:
            return None
        if len(extra) not in (2, 3):
            raise EmbedsearchError(f"extra_train has {len(extra)} parts, expected "
                                   "(vectors, labels) or (vectors, labels, source rows)")
        Xe = _as_matrix(extra[0], "extra training vectors", dim)
        ye = np.asarray(extra[1]).astype(str)
        src = (np.asarray(extra[2], np.int64) if len(extra) == 3
               else np.full(len(ye), -1, np.int64))
        if not len(Xe) == len(ye) == len(src):
            raise EmbedsearchError(f"extra_train: {len(Xe)} vectors, {len(ye)} labels, "
                                   f"{len(src)} source rows; expected the same number")
        unknown = sorted(set(ye) - set(self.classes_.tolist()))
        if unknown:
            raise EmbedsearchError(f"extra_train has classes absent from training: {unknown}",
                                   hint="extra rows add views of training images, not classes")
        if len(src) and (src.max() >= n or src.min() < -1):
            raise EmbedsearchError(f"extra_train source rows must be -1 or 0..{n - 1}")
        return Xe, np.searchsorted(self.classes_, ye), src

    def _with_extra(self, X: np.ndarray, y_idx: np.ndarray, rows: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``X``/``y_idx`` plus the extra rows allowed in a fit on ``rows`` of the original
        training matrix (None: all of it, so every extra row)."""
        extra = getattr(self, "_extra", None)
        if extra is None:
            return X, y_idx
        Xe, ye, src = extra
        keep = np.ones(len(ye), bool) if rows is None else np.isin(src, rows) & (src >= 0)
        if not keep.any():
            return X, y_idx
        return np.vstack([X, Xe[keep]]), np.concatenate([y_idx, ye[keep]])

    def _extra_count(self) -> int:
        extra = getattr(self, "_extra", None)
        return 0 if extra is None else len(extra[1])

    # -- files ----------------------------------------------------------------------------
    def save(self, folder: str | Path, encoder: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Write ``weights.safetensors`` then ``head.json`` into ``folder`` atomically.

        Returns ``{file name: {"bytes", "sha256"}}`` for a manifest to record.
        """
        from safetensors.numpy import save as st_save

        from embedsearch import __version__
        from embedsearch.store.io import atomic_write

        self._check_fitted()
        folder = Path(folder)
        blob = st_save({k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()},
                       metadata={"format": HEAD_FORMAT, "kind": self.kind})
        atomic_write(folder / WEIGHTS_FILE, lambda fh: fh.write(blob))
        digest = file_digest(folder / WEIGHTS_FILE)
        meta = {
            "format": HEAD_FORMAT,
            "schema_version": HEAD_SCHEMA,
            "kind": self.kind,
            "embedsearch_version": __version__,
            "classes": [str(c) for c in self.classes_],
            "dim": self.dim,
            "hyperparameters": self.hyperparameters(),
            **self.info,
            "weights": {"file": WEIGHTS_FILE, "bytes": len(blob), "sha256": digest,
                        "tensors": {k: list(v.shape) for k, v in self.params.items()}},
            "encoder": encoder,
            **(extra or {}),
        }
        write_json(folder / HEAD_FILE, meta)
        return {name: {"bytes": (folder / name).stat().st_size,
                       "sha256": file_digest(folder / name)}
                for name in (WEIGHTS_FILE, HEAD_FILE)}


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
              ) -> tuple[_Standardiser, list[tuple[np.ndarray, np.ndarray, int]]]:
        """Fit every C of ``grid`` in order, each warm-started from the previous one (the
        first from ``init``). Returns the standardiser and, per C, (W, b, iterations) on
        standardised inputs with one row per class of ``classes_`` (a class absent from
        these rows gets -inf logits)."""
        from sklearn.linear_model import LogisticRegression

        st = _Standardiser(X)
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
        notes: list[str] = []
        logits: dict[float, list[np.ndarray]] = {}

        def run(cs: list[float], init: list[Any] | None) -> list[Any]:
            last = []
            for i, (Xf, yf, Xh) in enumerate(held):
                st, path = self._path(Xf, yf, cw, cs, init[i] if init else None)
                Zh = st(Xh)
                for C, (W, b, _) in zip(cs, path, strict=True):
                    logits.setdefault(C, []).append(Zh @ W.T + b)
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

    def _final(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
               setting: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        st, path = self._path(X, y_idx, cw, [setting["C"]])
        W, b, iters = path[0]
        coef, intercept = st.fold(W, b)
        return ({"coef": coef, "intercept": intercept},
                {"lbfgs_iterations": iters, "converged": iters < self.max_iter})


class MLPHead(Head):
    """One hidden layer (ReLU, dropout) beside a linear skip path (``skip``: logits =
    linear(x) + W2 relu(W1 x)), AdamW with weight decay, label smoothing and a cosine
    learning-rate schedule; the epoch is chosen in the schedule's second half. The skip path
    lets the network be at least the linear model it contains.

    Why: with a constant learning rate and early stopping on validation loss, the loss of
    an over-confident network rises after an epoch or two on noisy collections and the
    choice collapsed to 1 epoch (accuracy 5-9 points under the linear head on 16k
    posters). A decaying schedule, label smoothing and choosing by the selection metric
    among annealed epochs keep the choice stable.

    Deterministic for a seed: torch's RNG is forked and seeded locally, shuffling uses a
    private generator, and training runs on one thread (CPU kernels of these few ops are
    then reproducible; ``torch.use_deterministic_algorithms`` is not called because it
    imports torch's compiler stack, 4 s here).
    """

    kind = "mlp"
    _in_key = "w1"
    _out_key = "b2"
    _bias_key = "b2"

    def __init__(self, hidden: int = 512, dropout: float = 0.5, weight_decay: float = 0.05,
                 lr: float = 1e-3, label_smoothing: float = 0.1, batch_size: int = 256,
                 max_epochs: int | None = None, skip: bool = True,
                 class_weight: str = "auto", select_by: str = DEFAULT_SELECT_BY, seed: int = 0,
                 refit: bool = True, holdout: float = 0.15) -> None:
        self.hidden = hidden
        self.skip = skip
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.label_smoothing = label_smoothing
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.class_weight = class_weight
        self.select_by = select_by
        self.seed = seed
        self.refit = refit
        self.holdout = holdout

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        h = X @ params["w1"].T + params["b1"]
        np.maximum(h, 0.0, out=h)
        out = h @ params["w2"].T + params["b2"]
        if "w0" in params:  # the linear skip path
            out += X @ params["w0"].T
        return out

    def _batch(self, n: int) -> int:
        # Small data: shrink batches so an epoch still makes several optimizer steps.
        return min(self.batch_size, max(16, -(-n // 8)))

    def _epochs(self, n: int) -> int:
        if self.max_epochs is not None:
            return int(self.max_epochs)
        steps = -(-n // self._batch(n))
        return int(np.clip(math.ceil(MLP_STEPS / steps), *MLP_EPOCHS))

    def _train(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray, epochs: int,
               stop: int, X_eval: np.ndarray | None = None
               ) -> tuple[_Standardiser, dict[str, np.ndarray], list[np.ndarray]]:
        """Train on a cosine schedule of ``epochs`` epochs, stopping after ``stop``.

        Returns the standardiser, the state (standardised space) and, with ``X_eval``, its
        logits after every epoch.
        """
        import torch

        st = _Standardiser(X)
        n_classes = len(self.classes_)
        batch_size = self._batch(len(X))
        # One thread: these matmuls are small, and on 2 cores with anything else running
        # torch's thread handoffs cost far more than they gain (an epoch of 3,072 x 1280-d
        # rows measured 0.2 s on one thread, 1-2 s on two). It also makes the result
        # independent of the core count.
        threads = torch.get_num_threads()
        evals: list[np.ndarray] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            torch.set_num_threads(1)
            try:
                body = torch.nn.Sequential(
                    torch.nn.Linear(X.shape[1], self.hidden), torch.nn.ReLU(),
                    torch.nn.Dropout(self.dropout), torch.nn.Linear(self.hidden, n_classes))
                skip = torch.nn.Linear(X.shape[1], n_classes, bias=False) if self.skip \
                    else None

                def net(x: Any) -> Any:
                    return body(x) + skip(x) if skip is not None else body(x)

                params = list(body.parameters()) + (list(skip.parameters()) if skip else [])
                opt = _AdamW(params, self.lr, self.weight_decay)
                weight = torch.as_tensor(cw, dtype=torch.float32)
                Xt = torch.as_tensor(st(X))
                yt = torch.as_tensor(y_idx, dtype=torch.long)
                Xe = torch.as_tensor(st(X_eval)) if X_eval is not None else None
                gen = torch.Generator().manual_seed(self.seed)
                total = epochs * -(-len(Xt) // batch_size)
                step = 0
                for _ in range(stop):
                    body.train()
                    for batch in torch.randperm(len(Xt), generator=gen).split(batch_size):
                        opt.lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                        step += 1
                        for p in params:
                            p.grad = None
                        loss = torch.nn.functional.cross_entropy(
                            net(Xt[batch]), yt[batch], weight=weight,
                            label_smoothing=self.label_smoothing)
                        loss.backward()
                        opt.step()
                    if Xe is not None:
                        body.eval()
                        with torch.no_grad():
                            evals.append(net(Xe).numpy().astype(np.float64))
            finally:
                torch.set_num_threads(threads)
        sd = {k: v.detach().numpy().astype(np.float64) for k, v in body.state_dict().items()}
        if skip is not None:
            sd["skip"] = skip.weight.detach().numpy().astype(np.float64)
        return st, sd, evals

    def _search(self, held: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cw: np.ndarray
                ) -> tuple[list[dict[str, Any]], list[np.ndarray], list[str]]:
        notes: list[str] = []
        epochs = self._epochs(len(held[0][1]))
        while True:
            per_fold = [self._train(Xf, yf, cw, epochs, epochs, Xh)[2] for Xf, yf, Xh in held]
            first = epochs // 2 + 1  # the annealed half of the schedule
            settings = [{"epochs": epochs, "best_epoch": e} for e in range(first, epochs + 1)]
            pooled = [np.vstack([f[e - 1] for f in per_fold]) for e in range(first, epochs + 1)]
            scores = [self._best_score(p) for p in pooled]
            at_end = max(range(len(scores)), key=scores.__getitem__) == len(scores) - 1
            rows = len(held[0][1]) * len(held)
            if at_end and self.max_epochs is None and rows * epochs * 2 <= MLP_EXTEND_ROW_EPOCHS:
                notes.append(f"best at the last of {epochs} epochs: schedule extended to "
                             f"{2 * epochs}")
                epochs *= 2
                continue
            if at_end:
                notes.append(f"best at the last of {epochs} epochs; not extended "
                             + ("(--max-epochs fixed it)" if self.max_epochs is not None else
                                "(time): --max-epochs sets a longer schedule"))
            return settings, pooled, notes


    def _final(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
               setting: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        st, sd, _ = self._train(X, y_idx, cw, setting["epochs"], setting["best_epoch"])
        w1, b1 = st.fold(sd["0.weight"], sd["0.bias"])
        params = {"w1": w1, "b1": b1, "w2": sd["3.weight"].astype(np.float32),
                  "b2": sd["3.bias"].astype(np.float32)}
        if "skip" in sd:
            w0, b0 = st.fold(sd["skip"], np.zeros(len(self.classes_)))
            params["w0"], params["b2"] = w0, (params["b2"] + b0).astype(np.float32)
        return params, {}


class _AdamW:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW`` with default betas/eps.

    Written out because constructing any ``torch.optim`` optimizer imports torch's
    compiler stack (torch._dynamo, about 4 s on 2 cores): longer than training a head.
    ``lr`` may change between steps (the schedule sets it).
    """

    def __init__(self, params: list[Any], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                if p.grad is None:
                    continue
                p.mul_(1 - self.lr * self.wd)
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


HEAD_CLASSES: dict[str, type[Head]] = {"linear": LinearHead, "mlp": MLPHead}


def make_head(kind: str, **params: Any) -> Head:
    """A new, unfitted head of ``kind`` ("linear" or "mlp")."""
    if kind not in HEAD_CLASSES:
        raise EmbedsearchError(f"unknown head {kind!r}", hint=f"use one of {HEAD_KINDS}")
    return HEAD_CLASSES[kind](**params)


def read_head_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / HEAD_FILE
    if not path.is_file():
        raise BundleError(f"{folder} holds no {HEAD_FILE}: not a trained head",
                          hint="train one: embedsearch train --index NAME --head linear")
    meta = read_versioned_json(path, HEAD_FORMAT, HEAD_SCHEMA, "head description",
                               "retrain the head with embedsearch train")
    if meta.get("kind") not in HEAD_CLASSES:
        raise BundleError(f"{path}: unknown head kind {meta.get('kind')!r}")
    return meta


def load_head(folder: str | Path) -> Head:
    """Load a saved head (no pickle: safetensors + JSON), checking its weights' sha256."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta = read_head_meta(folder)
    wpath = folder / meta["weights"]["file"]
    if not wpath.is_file() or file_digest(wpath) != meta["weights"]["sha256"]:
        raise BundleError(f"{wpath} is missing or was modified after the head was saved",
                          hint=f"retrain it: embedsearch train … --head {meta['kind']}")
    try:
        params = {k: np.asarray(v, np.float32) for k, v in load_file(str(wpath)).items()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise BundleError(f"{wpath}: unreadable safetensors ({exc})") from exc
    expected = {k: tuple(v) for k, v in meta["weights"]["tensors"].items()}
    if {k: v.shape for k, v in params.items()} != expected:
        raise BundleError(f"{wpath} holds tensors that do not match {folder / HEAD_FILE}")
    cls = HEAD_CLASSES[meta["kind"]]
    # Settings a head of an older release did not record keep their defaults.
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    hp = {k: (tuple(v) if isinstance(v, list) else v)
          for k, v in meta["hyperparameters"].items() if k in known}
    head = cls(**hp)
    head.classes_ = np.asarray(meta["classes"], dtype=str)
    head.params = params
    skip = {"format", "schema_version", "kind", "embedsearch_version", "classes", "dim",
            "hyperparameters", "weights"}
    head.info = {k: v for k, v in meta.items() if k not in skip}
    if head.dim != meta["dim"] or len(head.classes_) != params[head._out_key].shape[0]:
        raise BundleError(f"{folder / HEAD_FILE} disagrees with its weights (dim or classes)")
    return head

"""What the trained heads share: the fit contract, the selection protocol, files.

Both are scikit-learn estimators (``BaseEstimator`` + ``ClassifierMixin``: ``clone``,
``cross_val_score``, ``GridSearchCV``, ``Pipeline`` and ``get_params`` work; labels are
strings, so give scorers string labels) with ``classes_`` sorted like scikit-learn,
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
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight

from embedsearch.classify import SELECT_BY
from embedsearch.classify.metrics import (
    class_counts,
    classification_figures,
    softmax,
)
from embedsearch.errors import EmbedsearchError

log = logging.getLogger(__name__)

CLASS_WEIGHTS = ("auto", "balanced", "none")
#: Prior-correction strengths searched by ``class_weight="auto"`` (0 = none, 1 = balanced).
PRIOR_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Without validation rows, fewer training rows than this cross-validate (k folds); more
#: use one stratified hold-out (enough rows for a stable estimate, k times cheaper).
HOLDOUT_MIN_ROWS = 1500
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

    Hand-written because scikit-learn's ``StratifiedShuffleSplit`` (and
    ``train_test_split(stratify=)``) refuses a class with a single row, which small user
    collections have, and allocates by rounding, so a small class may get no held-out row
    and then cannot count in the selection metric: with 1,497 rows in 10 classes (two of 2
    and 3 rows) a class was missing from its 15 % hold-out for 200 of 200 seeds, never here
    (benchmarks/results/library_swaps.md).
    (Cross-validation, when the rows allow it, is scikit-learn's ``StratifiedKFold``.)
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


class Standardiser:
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
        cw = compute_class_weight("balanced", classes=np.arange(len(self.classes_)), y=y_idx) \
            if weighted else np.ones(len(self.classes_))
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
        # Balanced weights and the prior correction refer to the rows a model is fitted on:
        # the refit's rows (train + validation) may mix the classes otherwise than train.
        n = np.bincount(final_y, minlength=len(self.classes_))
        if self.class_weight == "balanced":
            cw = len(final_y) / (len(n) * np.maximum(n, 1))
        log_prior = np.log(np.maximum(n, 1) / n.sum())
        params, fitted = self._final(final_X, final_y, cw, best)
        # The prior correction is a constant per class: folded into the output bias.
        params[self._bias_key] = (params[self._bias_key]
                                  - best_tau * log_prior).astype(np.float32)
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

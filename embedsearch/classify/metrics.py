"""Classification figures: the one home of accuracy, balanced accuracy and macro-F1.

The three headline figures are scikit-learn's (:func:`headline_metrics`), for heads,
fine-tuning, ``predict`` and the benchmark report alike. Log loss and the expected
calibration error stay here in numpy: scikit-learn has no ECE, and its ``log_loss`` refuses
rows whose class the model never saw, which a validation split may hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def class_counts(y: Sequence[str] | np.ndarray) -> dict[str, int]:
    labels, counts = np.unique(np.asarray(y).astype(str), return_counts=True)
    return {str(c): int(n) for c, n in zip(labels, counts, strict=True)}


def headline_metrics(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray
                     ) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of string labels, from scikit-learn.

    Balanced accuracy is the mean recall over the classes in ``y_true``; macro-F1 the mean
    F1 over the classes in ``y_true`` or ``y_pred`` (scikit-learn's defaults), so a rare
    class counts as much as a common one. Empty inputs give NaN.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    if len(t) == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"),
                "macro_f1": float("nan")}
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on a subset of the classes.
        warnings.simplefilter("ignore", UserWarning)
        return {"accuracy": float(accuracy_score(t, p)),
                "balanced_accuracy": float(balanced_accuracy_score(t, p)),
                "macro_f1": float(f1_score(t, p, average="macro", zero_division=0))}


def classification_figures(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray,
                           proba: np.ndarray | None = None,
                           classes: Sequence[str] | np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 (:func:`headline_metrics`, rounded to 4
    digits), and log loss + ECE when ``proba`` (columns following ``classes``) is given."""
    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    n = len(t)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out
    out.update({k: round(v, 4) for k, v in headline_metrics(t, p).items()})
    if proba is not None and classes is not None:
        cls = np.asarray(classes).astype(str)
        col = {c: i for i, c in enumerate(cls)}
        known = np.array([c in col for c in t])
        if known.any():
            rows = np.flatnonzero(known)
            idx = np.array([col[c] for c in t[known]])
            pt = np.clip(proba[rows, idx], 1e-12, 1.0)
            out["log_loss"] = round(float(-np.mean(np.log(pt))), 4)
        out["ece"] = round(expected_calibration_error(proba, p == t), 4)
    return out


def expected_calibration_error(proba: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by bin size."""
    conf = np.asarray(proba).max(axis=1)
    correct = np.asarray(correct, bool)
    if len(conf) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(ece)

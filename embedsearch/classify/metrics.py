"""Classification figures in plain numpy (no scikit-learn import needed to report them)."""

from __future__ import annotations

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


def balanced_weights(y_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's "balanced" weights: n_samples / (n_classes * count), per class."""
    counts = np.bincount(y_idx, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y_idx) / (present.sum() * counts[present])
    return w


def classification_figures(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray,
                           proba: np.ndarray | None = None,
                           classes: Sequence[str] | np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 (and log loss + ECE when ``proba`` is given).

    Balanced accuracy and macro-F1 average over the classes present in ``y_true``, so a
    rare class counts as much as a common one. ``proba`` columns follow ``classes``.
    """
    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    n = len(t)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out
    present = np.unique(t)
    recalls, f1s = [], []
    for c in present:
        tp = float(np.sum((t == c) & (p == c)))
        support, predicted = float(np.sum(t == c)), float(np.sum(p == c))
        recall = tp / support
        precision = tp / predicted if predicted else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    out["accuracy"] = round(float(np.mean(t == p)), 4)
    out["balanced_accuracy"] = round(float(np.mean(recalls)), 4)
    out["macro_f1"] = round(float(np.mean(f1s)), 4)
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

"""Classification figures for the benchmark report, computed with scikit-learn.

Point estimates come straight from scikit-learn (the headline three through
:func:`embedsearch.classify.metrics.headline_metrics`, their one home) so an independent
check with the same functions gives the same numbers. Confidence intervals are a
percentile bootstrap over the test rows: every method of a study is resampled with the
*same* seeded row indices (a paired bootstrap), so the interval of a difference between
two methods is meaningful.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

#: Bootstrap resamples drawn per interval.
N_BOOTSTRAP = 1000
#: Resamples evaluated at once (bounds memory: chunk × n_rows indices).
_CHUNK = 100
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                "macro_f1": "macro-F1"}


def label_set(*arrays: Sequence[str] | np.ndarray) -> list[str]:
    """Sorted union of the labels in ``arrays`` (the row/column order of every table)."""
    out: set[str] = set()
    for a in arrays:
        out.update(str(x) for x in np.asarray(a).astype(str))
    return sorted(out)


def point_metrics(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray,
                  labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1/support, confusion counts.

    Macro-F1 uses scikit-learn's default label set (classes present in the truth or the
    predictions), as ``f1_score(y_true, y_pred, average="macro")`` does; the per-class table
    and the confusion matrix list every class in ``labels`` (support 0 included).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from embedsearch.classify.metrics import headline_metrics

    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    labels = list(labels)
    prec, rec, f1, support = precision_recall_fscore_support(
        t, p, labels=labels, zero_division=0)
    return {
        "n": len(t),
        **headline_metrics(t, p),
        "per_class": {
            c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                "support": int(support[i]), "predicted": int(np.sum(p == c))}
            for i, c in enumerate(labels)
        },
        "confusion": confusion_matrix(t, p, labels=labels).tolist(),
    }


def bootstrap_indices(n: int, seed: int, n_boot: int = N_BOOTSTRAP
                      ) -> Iterator[np.ndarray]:
    """Chunks of resampled row indices, identical for a given ``(n, seed, n_boot)``."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(_CHUNK, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def resampled_metrics(t_idx: np.ndarray, p_idx: np.ndarray, n_labels: int, seed: int,
                      n_boot: int = N_BOOTSTRAP) -> dict[str, np.ndarray]:
    """The three headline metrics on every bootstrap resample (arrays of length n_boot).

    Per resample, from the confusion counts C: balanced accuracy = mean of tp/row-sum over
    classes present in the truth; macro-F1 = mean of 2·tp/(row + column sum) over classes
    present in truth or predictions; both are what scikit-learn computes on that resample
    (tests/test_report.py checks each one against it). Counted in numpy, all resamples at
    once, because calling scikit-learn per resample is ~600x slower: 1000 resamples of 372
    rows x 10 classes took 0.004-0.009 s vs 5.7 s (one thread, shared 2-core machine;
    benchmarks/results/library_swaps.md).
    """
    n = len(t_idx)
    if n == 0:
        empty = np.zeros(0)
        return {m: empty for m in METRICS}
    k = n_labels
    code = t_idx.astype(np.int64) * k + p_idx.astype(np.int64)
    acc, bal, mf1 = [], [], []
    for idx in bootstrap_indices(n, seed, n_boot):
        b = len(idx)
        flat = (np.arange(b)[:, None] * (k * k) + code[idx]).ravel()
        cm = np.bincount(flat, minlength=b * k * k).reshape(b, k, k).astype(np.float64)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        rows, cols = cm.sum(axis=2), cm.sum(axis=1)
        acc.append(tp.sum(axis=1) / n)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(rows > 0, tp / rows, np.nan)
            f1 = np.where(rows + cols > 0, 2 * tp / (rows + cols), np.nan)
        bal.append(np.nanmean(recall, axis=1))
        mf1.append(np.nanmean(f1, axis=1))
    return {"accuracy": np.concatenate(acc), "balanced_accuracy": np.concatenate(bal),
            "macro_f1": np.concatenate(mf1)}


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval ``[low, high]`` of bootstrap samples."""
    if len(samples) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def evaluate(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray,
             labels: Sequence[str], seed: int, n_boot: int = N_BOOTSTRAP,
             level: float = 0.95) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Point metrics plus a bootstrap ``ci`` for each headline metric.

    Returns (figures, bootstrap samples); the samples let callers form paired differences.
    """
    figures = point_metrics(y_true, y_pred, labels)
    pos = {c: i for i, c in enumerate(labels)}
    t_idx = np.array([pos[str(x)] for x in np.asarray(y_true).astype(str)], np.int64)
    p_idx = np.array([pos[str(x)] for x in np.asarray(y_pred).astype(str)], np.int64)
    samples = resampled_metrics(t_idx, p_idx, len(labels), seed, n_boot)
    figures["ci"] = {m: interval(samples[m], level) for m in METRICS}
    figures["ci_level"] = level
    figures["bootstrap"] = {"resamples": n_boot, "seed": seed, "kind": "percentile, paired"}
    return figures, samples


def paired_difference(a: np.ndarray, b: np.ndarray, point_a: float, point_b: float,
                      level: float = 0.95) -> dict[str, Any]:
    """Difference ``a − b`` with its paired-bootstrap interval and the share of resamples
    where ``a`` is not better (a one-sided bootstrap p-value)."""
    diff = a - b
    lo, hi = interval(diff, level)
    return {"difference": float(point_a - point_b), "ci": [lo, hi],
            "p_not_better": float(np.mean(diff <= 0)) if len(diff) else float("nan")}


def majority_class(y_train: Sequence[str] | np.ndarray) -> str:
    """Most frequent training label; ties go to the first in sorted order, like
    scikit-learn's ``DummyClassifier(strategy="most_frequent")``."""
    labels, counts = np.unique(np.asarray(y_train).astype(str), return_counts=True)
    return str(labels[int(np.argmax(counts))])

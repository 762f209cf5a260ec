"""How a method's prediction cost is measured: batched and single-image latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: Single-image predictions timed per method (the median is reported).
SINGLE_QUERIES = 64

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def time_predict(fn: Predict, Xt: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Predictions, median batched ms/image over 5 runs, median single-image ms (one
    image per call, BLAS/OpenMP limited to one thread)."""
    runs, first = [], None
    for _ in range(5):
        t = time.perf_counter()
        res = fn(Xt)
        runs.append(time.perf_counter() - t)
        first = first or res
    assert first is not None
    from threadpoolctl import threadpool_limits

    singles = []
    m = min(len(Xt), SINGLE_QUERIES)
    # One image per call on one thread: threading a single small product gains nothing,
    # and on a busy machine every call would wait for a second core to be scheduled.
    with threadpool_limits(limits=1):
        if m:
            fn(Xt[:1])
        for i in range(m):
            t = time.perf_counter()
            fn(Xt[i:i + 1])
            singles.append(time.perf_counter() - t)
    n = max(len(Xt), 1)
    return (first[0], first[1], 1000 * statistics.median(runs) / n,
            1000 * statistics.median(singles) if singles else 0.0)


def proba_fn(clf: Any) -> Predict:
    """(predicted label, its probability) per row from a classifier's ``predict_proba``."""
    def fn(Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        proba = clf.predict_proba(Q)
        best = proba.argmax(axis=1)
        return clf.classes_[best].astype(str), proba[np.arange(len(best)), best]

    return fn


__all__ = ["SINGLE_QUERIES", "Predict", "proba_fn", "time_predict"]

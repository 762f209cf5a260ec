"""Benchmark reports: the kNN-vs-trained-head study on any labelled image collection.

``run_benchmark(data, models=[...], out=...)`` encodes the collection once per encoder and
writes report.md, a self-contained report.html and results.json. Heavy modules (torch,
faiss, matplotlib, scikit-learn) are imported only when a study runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BenchmarkResult", "load_results", "run_benchmark"]

if TYPE_CHECKING:
    from embedsearch.report.results import BenchmarkResult, load_results
    from embedsearch.report.study import run_benchmark

_LAZY = {
    "BenchmarkResult": "embedsearch.report.results",
    "run_benchmark": "embedsearch.report.study",
    "load_results": "embedsearch.report.results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embedsearch.report' has no attribute {name!r}")

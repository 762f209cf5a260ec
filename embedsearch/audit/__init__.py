"""Audit a labelled collection before anyone trains on it.

One pass over a bundle's cached embeddings and stored pixel statistics finds likely label
errors, outliers / off-topic images, low-information ("spurious") images, duplicates,
label conflicts, cross-split leakage and class imbalance; the CLI's ``audit`` command calls
these.

- :func:`audit` (a folder, CSV or bundle name) / :func:`audit_bundle` → :class:`AuditResult`
  whose ``frame`` is a DataFrame with one row per image and a score column per issue type
- :func:`write_audit`: issues.csv/.parquet, summary.json, report.html (thumbnails)
- :func:`write_relabel_csv`, :func:`quarantine` (undoable), :func:`read_exclude_list`
- :func:`label_scores`, :func:`pixel_stats`, :func:`spurious_scores`: the parts, on arrays
- :mod:`embedsearch.audit.planted`: generated problems to check an audit

Submodules are imported on first use, so ``import embedsearch.audit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AuditResult": "core",
    "ISSUE_TYPES": "core",
    "audit": "core",
    "audit_bundle": "core",
    "write_audit": "report",
    "write_relabel_csv": "report",
    "quarantine": "report",
    "DEFAULT_QUARANTINE": "report",
    "read_exclude_list": "exclude",
    "label_scores": "labels",
    "pixel_stats": "pixels",
    "spurious_scores": "pixels",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Exact and near-duplicate images: grouping, keep policy, reports, safe actions, leakage.

Library API (the CLI's ``dedupe``, ``dedupe-undo`` and ``leakage`` commands call these):

- :func:`find_duplicates` (arrays only) / :func:`dedupe_bundle` → :class:`DedupeResult`
- :func:`sweep` / :func:`sweep_bundle`: pairs, precision proxies and group counts across
  thresholds from one search
- :func:`calibrate.calibrate`: the threshold read off the collection's look-alike background
- :func:`bundle_hashes`: the second signal (perceptual hashes), cached in the bundle
- :func:`groups_as_records`: one dict per group (what ``dedupe --json`` prints)
- :func:`leakage` / :func:`leakage_bundle` / :func:`leakage_folders` /
  :func:`leakage_bundles`: duplicates across splits, two folders, or a folder and an index
- :func:`group_labels`, :func:`grouped_split`, :func:`near_duplicate_pairs`: group-aware
  train/test splitting
- :func:`write_report`: groups.csv/parquet, label_conflicts.csv, summary.json, report.html
- :func:`move_to` + :func:`undo`, :func:`copy_clean_to`, :func:`delete_in_place`;
  :func:`move_files` moves any list of images the same undoable way (audit quarantine)

Submodules are imported on first use, so ``import embedsearch.dedupe`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DEFAULT_THRESHOLD": "group",
    "KEEP_POLICIES": "group",
    "SWEEP_THRESHOLDS": "group",
    "DedupeResult": "group",
    "find_duplicates": "group",
    "sweep": "group",
    "group_labels": "group",
    "groups_as_records": "group",
    "Calibration": "calibrate",
    "bundle_hashes": "views",
    "grouped_split": "group",
    "near_duplicate_pairs": "group",
    "candidate_pairs": "search",
    "dedupe_bundle": "bundles",
    "sweep_bundle": "bundles",
    "leakage": "bundles",
    "leakage_bundle": "bundles",
    "leakage_folders": "bundles",
    "leakage_bundles": "bundles",
    "folder_bundle": "bundles",
    "items_root": "views",
    "write_report": "report",
    "write_leakage": "report",
    "move_to": "actions",
    "move_files": "actions",
    "undo": "actions",
    "copy_clean_to": "actions",
    "delete_in_place": "actions",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The one check of a file against its recorded size and sha256.

Bundles, heads, zero-shot caches, fine-tunes and cache shards record ``{"bytes",
"sha256"}`` for the files they vouch for (:func:`file_record`) and check them with
:func:`file_mismatch` before trusting them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedsearch.store.io import file_digest

#: What :func:`file_mismatch` says about a file that exists but holds other bytes.
CHANGED = "size or sha256 differs"


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of ``path``, as manifests record it."""
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def file_mismatch(path: Path, record: Mapping[str, Any]) -> str | None:
    """None when ``path`` holds the bytes ``record`` describes (its ``sha256``, and its
    ``bytes`` when recorded); else why not: :data:`CHANGED`, or "missing or unreadable
    (reason)"."""
    try:
        if "bytes" in record and path.stat().st_size != record["bytes"]:
            return CHANGED
        if file_digest(path) != record.get("sha256"):
            return CHANGED
    except OSError as exc:  # gone (or unreadable) even if it existed a moment ago
        return f"missing or unreadable ({exc.strerror})"
    return None

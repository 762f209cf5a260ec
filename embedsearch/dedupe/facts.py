"""What the keep policy knows about each image, and which copy of an exact duplicate leads.

:class:`ItemFacts` holds the per-item facts (size, pixels, labels, ...) that the keep
policy (:meth:`ItemFacts.priority`) and the reports use; :func:`exact_representatives`
points every exact copy (same sha256) at the copy that ranks highest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedsearch.errors import EmbedsearchError

KEEP_POLICIES = ("resolution", "filesize", "path", "oldest")


def _array(values: Sequence[Any] | np.ndarray | None, n: int, what: str,
           dtype: Any = object) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=dtype)
    if arr.shape != (n,):
        raise EmbedsearchError(f"{what} has {arr.shape[0] if arr.ndim else 0} entries, "
                               f"expected one per vector ({n})")
    return arr


@dataclass
class ItemFacts:
    """Per-item facts the keep policy and reports use; every field but ids is optional."""

    ids: np.ndarray
    sha256: np.ndarray | None = None
    width: np.ndarray | None = None
    height: np.ndarray | None = None
    size: np.ndarray | None = None
    mtime_ns: np.ndarray | None = None
    labels: np.ndarray | None = None
    splits: np.ndarray | None = None
    grey: np.ndarray | None = None

    @classmethod
    def build(cls, n: int, ids: Sequence[Any] | None = None, **kw: Any) -> ItemFacts:
        ids_arr = np.asarray([str(i) for i in ids] if ids is not None
                             else [str(k) for k in range(n)], dtype=object)
        if ids_arr.shape != (n,):
            raise EmbedsearchError(f"ids has {len(ids_arr)} entries, expected {n}")
        if len(set(ids_arr.tolist())) != n:
            raise EmbedsearchError("ids are not unique")
        numeric = {"width", "height", "size", "mtime_ns", "grey"}
        arrays = {k: _array(v, n, k, np.float64 if k in numeric else object)
                  for k, v in kw.items()}
        return cls(ids_arr, **arrays)

    def _num(self, name: str) -> np.ndarray:
        arr = getattr(self, name)
        if arr is None:
            return np.zeros(len(self.ids))
        return np.nan_to_num(arr.astype(np.float64), nan=0.0)

    def priority(self, keep: str) -> np.ndarray:
        """Item indices, the one to keep first. Ties are broken by path (id) order."""
        if keep not in KEEP_POLICIES:
            raise EmbedsearchError(f"unknown keep policy {keep!r}",
                                   hint=f"use one of: {', '.join(KEEP_POLICIES)}")
        id_rank = np.argsort(np.argsort(self.ids.astype(str), kind="stable"), kind="stable")
        area = self._num("width") * self._num("height")
        size = self._num("size")
        if keep == "resolution":
            # most pixels; then unedited over greyscale or rotated (``grey`` flags both:
            # such a copy is an edit of the other, never the reverse); then most bytes per
            # pixel (a re-compressed copy has fewer at the same size); then path order
            keys = (id_rank, -size / np.maximum(area, 1), self._num("grey"), -area)
        elif keep == "filesize":
            keys = (id_rank, -area, -size)
        elif keep == "oldest":
            mt = self._num("mtime_ns") if self.mtime_ns is not None else np.zeros(len(self.ids))
            keys = (id_rank, mt)
        else:
            keys = (id_rank,)
        return np.lexsort(keys)

    def keep_reason(self, keep: str, kept: int, members: list[int]) -> str:
        """Why ``kept`` was chosen among ``members``."""
        others = [m for m in members if m != kept]
        if keep == "resolution" and self.width is not None and self.height is not None:
            area = self._num("width") * self._num("height")
            w, h = int(self._num("width")[kept]), int(self._num("height")[kept])
            best = max(area[m] for m in others)
            if area[kept] > best:
                return f"largest resolution ({w}×{h})"
            same = [m for m in others if area[m] == area[kept]]
            grey = self._num("grey")
            colour = [m for m in same if grey[m] == grey[kept]]
            if same and not colour:
                return (f"largest resolution ({w}×{h}), unedited where a copy of that size "
                        "is greyscale or rotated")
            if self.size is not None:
                bpp = self._num("size") / np.maximum(area, 1)
                if all(bpp[kept] > bpp[m] for m in colour):
                    return (f"largest resolution ({w}×{h}), least re-compressed "
                            f"({bpp[kept]:.2f} bytes per pixel)")
            return f"largest resolution ({w}×{h}), tie broken by path order"
        if keep == "filesize" and self.size is not None:
            size = self._num("size")
            if size[kept] > max(size[m] for m in others):
                return f"largest file ({int(size[kept]):,} bytes)"
            return f"largest file ({int(size[kept]):,} bytes), tie broken by resolution/path"
        if keep == "oldest" and self.mtime_ns is not None:
            mt = self._num("mtime_ns")
            if mt[kept] < min(mt[m] for m in others):
                return "oldest file (earliest modification time)"
            return "oldest file, tie broken by path order"
        if keep != "path":
            return f"first in path order ({keep} not known for these images)"
        return "first in path order"


def exact_representatives(facts: ItemFacts, rank: np.ndarray) -> np.ndarray:
    """rep[k] = the highest-ranked item with k's sha256 (k itself when unique/unknown)."""
    n = len(facts.ids)
    rep = np.arange(n)
    if facts.sha256 is None:
        return rep
    best: dict[str, int] = {}
    for k in np.argsort(rank, kind="stable"):
        h = facts.sha256[k]
        if not isinstance(h, str) or not h:
            continue
        if h in best:
            rep[k] = best[h]
        else:
            best[h] = int(k)
    return rep

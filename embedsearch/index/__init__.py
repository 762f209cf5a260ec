"""FAISS index over unit vectors (inner product = cosine), with guards for faiss's traps.

- k larger than the index: faiss pads with label -1, which as a numpy index silently picks
  the last row. Results here never contain -1 rows.
- Dimension mismatch: faiss fails with an empty assertion. Dims are checked first.
- NaN/inf vectors silently drop out of faiss results. They are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import BundleError, EmbedsearchError

if TYPE_CHECKING:
    import faiss

#: Below this many vectors an exact (flat) index is used; above, HNSW (see docs in README).
EXACT_LIMIT = 200_000


@dataclass
class Neighbours:
    """Search results: row ``i`` holds the valid neighbours of query ``i`` (no -1 padding)."""

    ids: list[np.ndarray]
    similarities: list[np.ndarray]


def check_vectors(x: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (n, dim) array, or raise a clear error."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise EmbedsearchError(
            f"{what} have shape {tuple(x.shape)}, but the index holds {dim}-d vectors",
            hint="query with the encoder the index was built with",
        )
    if not np.isfinite(x).all():
        raise EmbedsearchError(f"{what} contain NaN or infinite values; they cannot be searched")
    return np.ascontiguousarray(x, dtype=np.float32)


def make_index(vectors: np.ndarray, kind: str = "auto") -> tuple[faiss.Index, dict[str, Any]]:
    """Build an inner-product index; returns it and a description for the manifest."""
    import faiss

    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= EXACT_LIMIT else "hnsw"
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
        info: dict[str, Any] = {"type": "flat", "exact": True}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        info = {"type": "hnsw", "exact": False, "M": 32, "efSearch": 64}
    else:
        raise EmbedsearchError(f"unknown index type {kind!r}", hint="use auto, flat or hnsw")
    if n:
        index.add(check_vectors(vectors, dim))
    info.update({"metric": "inner_product", "dim": dim, "ntotal": int(index.ntotal)})
    return index, info


def search(index: faiss.Index, queries: np.ndarray, k: int, limit: int | None = None
           ) -> Neighbours:
    """Top-``k`` neighbours among the first ``limit`` rows (all rows when None)."""
    import faiss

    q = check_vectors(queries, index.d, "query vectors")
    n_rows = index.ntotal if limit is None else min(limit, index.ntotal)
    if k < 1:
        raise EmbedsearchError(f"k must be at least 1, got {k}")
    kk = min(k, n_rows)
    if kk == 0 or len(q) == 0:
        empty = np.zeros(0, np.int64)
        return Neighbours([empty] * len(q), [empty.astype(np.float32)] * len(q))
    params = None
    if n_rows < index.ntotal:
        selector = faiss.IDSelectorRange(0, n_rows)
        params = (faiss.SearchParametersHNSW(sel=selector) if isinstance(index, faiss.IndexHNSW)
                  else faiss.SearchParameters(sel=selector))
    sims, ids = index.search(q, kk, params=params)
    valid = ids >= 0
    return Neighbours([ids[i][valid[i]] for i in range(len(q))],
                      [sims[i][valid[i]] for i in range(len(q))])


def write_faiss(path: Path, index: faiss.Index) -> None:
    import faiss

    from embedsearch.store.io import atomic_write

    data = faiss.serialize_index(index)
    atomic_write(path, lambda fh: fh.write(data.tobytes()))


def read_faiss(path: Path) -> faiss.Index:
    import faiss

    try:
        data = np.fromfile(path, dtype=np.uint8)
        return faiss.deserialize_index(data)
    except Exception as exc:  # faiss raises RuntimeError with C++ text for garbage input
        raise BundleError(f"{path}: not a readable faiss index ({str(exc).splitlines()[0][:120]})",
                          hint="rebuild the bundle with embedsearch build-index") from exc

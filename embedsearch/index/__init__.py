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
from embedsearch.index.vectors import check_vectors

if TYPE_CHECKING:
    import faiss

#: Up to this many vectors an exact (flat) index is used; above, IVF (docs/scaling.md has the
#: measurements behind the number).
EXACT_LIMIT = 200_000
#: Above this many bytes of float32 vectors, "auto" picks IVF-PQ (compressed lists) over
#: IVF-Flat, whose lists hold every vector in full.
IVF_FLAT_MAX_BYTES = 8 << 30
INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "hnsw")


@dataclass
class Neighbours:
    """Search results: row ``i`` holds the valid neighbours of query ``i`` (no -1 padding)."""

    ids: list[np.ndarray]
    similarities: list[np.ndarray]


def auto_index_type(n: int, dim: int) -> str:
    """flat up to EXACT_LIMIT rows; IVF-Flat above while the vectors fit IVF_FLAT_MAX_BYTES;
    IVF-PQ beyond. (HNSW is available by name only: it needs every vector in memory, cannot
    range-search for dedupe, and builds far slower than IVF on few cores.)"""
    if n <= EXACT_LIMIT:
        return "flat"
    return "ivf" if n * dim * 4 <= IVF_FLAT_MAX_BYTES else "ivfpq"


def make_index(vectors: np.ndarray, kind: str = "auto") -> tuple[faiss.Index, dict[str, Any]]:
    """Build an inner-product index; returns it and a description for the manifest.

    ``vectors`` may be a read-only memmap: IVF indexes train on a sample and are filled
    block by block (:mod:`embedsearch.index.ivf`), recording their measured recall@10.
    """
    import faiss

    n, dim = vectors.shape
    if kind == "auto":
        kind = auto_index_type(n, dim)
    if kind in ("ivf", "ivfpq") and n:
        from embedsearch.index.ivf import build_ivf

        index, info = build_ivf(vectors, kind)
        info.update({"metric": "inner_product", "dim": dim, "ntotal": int(index.ntotal)})
        return index, info
    if kind in ("ivf", "ivfpq"):
        kind = "flat"  # nothing to train on: an empty exact index
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
        info: dict[str, Any] = {"type": "flat", "exact": True}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        info = {"type": "hnsw", "exact": False, "M": 32, "efSearch": 64}
    else:
        raise EmbedsearchError(f"unknown index type {kind!r}",
                               hint=f"use one of {', '.join(INDEX_TYPES)}")
    for start in range(0, n, 65_536):  # blocks: a memmap is never read whole
        index.add(check_vectors(vectors[start:start + 65_536], dim))
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
        if isinstance(index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=index.hnsw.efSearch)
        elif isinstance(index, faiss.IndexIVF):  # IVF refuses base SearchParameters
            params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
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

"""IVF indexes for collections too large for exact search, built without loading all vectors.

- Trained (k-means coarse quantiser, and PQ codebooks for ``ivfpq``) on a seeded random
  sample of rows, then filled block by block from the (memory-mapped) embeddings, so peak
  memory is the sample plus one block, not the collection.
- ``nlist`` ≈ 4·√n lists, with at least :data:`MIN_POINTS_PER_LIST` training points each.
- ``nprobe`` is chosen at build time: the smallest power of two whose recall@10 against
  exact search, on a held-out sample of rows used as queries (not used for training),
  reaches :data:`TARGET_RECALL`. That recall and the sweep are recorded in the manifest.
- ``ivf`` keeps full float32 vectors in its lists (IVF-Flat: same memory as the embeddings);
  ``ivfpq`` stores ``pq_m`` bytes per vector (IVF-PQ, 160 for 1280-d: 32× smaller), for
  collections whose vectors do not fit in memory; PQ caps its recall (the nprobe sweep stops
  at the plateau), which is measured and recorded the same way.

The ``ivf`` path of :mod:`embedsearch.dedupe.search` (above 200,000 images) reuses
:func:`choose_nlist` and :data:`TRAIN_POINTS_PER_LIST` for its candidate lists.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import EmbedsearchError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

#: recall@10 that the chosen nprobe must reach on the held-out queries (when reachable).
TARGET_RECALL = 0.95
#: faiss k-means wants at least 39 training points per centroid; more gives better lists.
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 64
#: Rows added (or searched) per block when filling from a memory-mapped array.
BLOCK_ROWS = 65_536
#: A doubling of nprobe that gains less recall than this ends the sweep (a plateau).
PLATEAU = 0.005
#: Held-out rows used as recall queries.
RECALL_QUERIES = 1000
SEED = 0


def choose_nlist(n: int) -> int:
    """≈ 4·√n lists, but never so many that a list has < MIN_POINTS_PER_LIST rows."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def choose_pq_m(dim: int) -> int:
    """Sub-quantisers for IVF-PQ: 8 dims each (160 bytes for 1280-d), a divisor of dim.

    Measured on 30k efficientnet-lite0-shaped vectors (docs/scaling.md): recall@10 plateaus
    at 0.76 with 64 bytes, 0.88 with 160, 0.94 with 320 (but 4× the training time).
    """
    target = max(1, dim // 8)
    for m in sorted(range(1, dim + 1), key=lambda m: (abs(m - target), m)):
        if dim % m == 0:
            return m
    return 1


def _rows(vectors: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # Sorted fancy indexing reads a memmap front to back; restore the sampled order after.
    order = np.argsort(idx)
    out = np.empty((len(idx), vectors.shape[1]), np.float32)
    out[order] = vectors[idx[order]]
    return out


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int,
               block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` over ``vectors``, one block in memory at a time."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(vectors), block):
        part = np.ascontiguousarray(vectors[start:start + block], dtype=np.float32)
        flat = faiss.IndexFlatIP(part.shape[1])
        flat.add(part)
        sims, ids = flat.search(queries, min(k, len(part)))
        if ids.shape[1] < k:  # pad a short last block so the heap sees k columns
            pad = k - ids.shape[1]
            sims = np.hstack([sims, np.full((len(queries), pad), -np.inf, np.float32)])
            ids = np.hstack([ids, np.full((len(queries), pad), -1, np.int64)])
        heap.add_result(sims, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(approx: np.ndarray, exact: np.ndarray, self_ids: np.ndarray, k: int = 10
                ) -> float:
    """Mean |approx ∩ exact| / k over queries, each query's own row left out of both lists
    (a query taken from the collection always finds itself, which would flatter recall)."""
    hits = 0
    for a, e, me in zip(approx, exact, self_ids, strict=True):
        ea = [i for i in e if i != me and i >= 0][:k]
        aa = [i for i in a if i != me and i >= 0][:k]
        hits += len(set(ea) & set(aa)) / max(1, len(ea))
    return hits / max(1, len(approx))


def build_ivf(vectors: np.ndarray, kind: str = "ivf", *, nlist: int | None = None,
              pq_m: int | None = None, seed: int = SEED, block: int = BLOCK_ROWS,
              target_recall: float = TARGET_RECALL, recall_queries: int = RECALL_QUERIES
              ) -> tuple[faiss.Index, dict[str, Any]]:
    """Train on a sample, fill block by block, tune nprobe on held-out queries.

    ``vectors`` may be a read-only memmap of the bundle's embeddings (rows L2-normalised).
    Returns the index and its manifest description.
    """
    import faiss

    from embedsearch.index.vectors import check_vectors

    if kind not in ("ivf", "ivfpq"):
        raise EmbedsearchError(f"unknown IVF kind {kind!r}", hint="use ivf or ivfpq")
    n, dim = vectors.shape
    if n == 0:
        raise EmbedsearchError("cannot build an IVF index over zero vectors")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    # Held-out queries first; the lists are trained on the other rows only.
    n_q = min(recall_queries, max(1, n // 10))
    query_ids = np.sort(perm[:n_q])
    pool = perm[n_q:] if n > n_q else perm
    nlist = nlist or choose_nlist(len(pool))
    train_ids = pool[:min(len(pool), nlist * TRAIN_POINTS_PER_LIST)]
    if kind == "ivfpq":
        # PQ codebooks need 256 points per centroid per sub-quantiser to train well.
        train_ids = pool[:min(len(pool), max(len(train_ids), 256 * 39))]
    need = nlist if kind == "ivf" else max(nlist, 16)  # 4-bit PQ codebooks: 16 centroids
    if len(train_ids) < need:
        raise EmbedsearchError(
            f"--index-type {kind} needs at least {need + n_q} images to train its {nlist} "
            f"lists on; this collection has {n}",
            hint="use --index-type flat (exact, and the auto choice below 200,000 images)")
    train = check_vectors(_rows(vectors, train_ids), dim, "training vectors")

    quantizer = faiss.IndexFlatIP(dim)
    info: dict[str, Any] = {"type": kind, "exact": False, "nlist": int(nlist), "seed": seed,
                            "train_rows": len(train_ids)}
    if kind == "ivf":
        index: faiss.Index = faiss.IndexIVFFlat(quantizer, dim, nlist,
                                                faiss.METRIC_INNER_PRODUCT)
    else:
        m = pq_m or choose_pq_m(dim)
        nbits = 8 if len(train_ids) >= 256 * MIN_POINTS_PER_LIST else 4
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        info.update({"pq_m": int(m), "pq_nbits": int(nbits),
                     "bytes_per_vector": math.ceil(m * nbits / 8)})
    index.cp.seed = seed  # deterministic k-means
    index.train(train)
    del train
    t_train = time.perf_counter() - t0
    for start in range(0, n, block):
        index.add(check_vectors(vectors[start:start + block], dim))
    # Row → list map (8 bytes a row), so rows can be reconstructed (bundle spot checks)
    # and removed later.
    index.make_direct_map()
    t_add = time.perf_counter() - t0 - t_train

    queries = _rows(vectors, query_ids)
    k = min(11, n)
    _, exact = exact_topk(vectors, queries, k, block)
    sweep: dict[str, float] = {}
    chosen = None
    nprobe, prev = 1, -1.0
    while True:
        index.nprobe = nprobe
        _, approx = index.search(queries, k)
        r = recall_at_k(approx, exact, query_ids, k=min(10, n - 1) or 1)
        sweep[str(nprobe)] = round(r, 4)
        if r >= target_recall:
            chosen = nprobe
            break
        # PQ codes cap recall whatever nprobe is: stop once doubling no longer helps.
        if nprobe >= nlist or r - prev < PLATEAU:
            break
        nprobe, prev = min(nprobe * 2, nlist), r
    if chosen is None:  # target out of reach: the cheapest nprobe near the best recall
        best = max(sweep.values())
        chosen = min(int(p) for p, v in sweep.items() if v >= best - PLATEAU)
    index.nprobe = chosen
    info.update({
        "nprobe": int(chosen),
        "recall_at_10": sweep[str(chosen)],
        "recall_queries": int(n_q),
        "recall_target": target_recall,
        "recall_sweep": sweep,
        "recall_note": "held-out rows as queries, each one's own row excluded",
        "train_seconds": round(t_train, 2),
        "add_seconds": round(t_add, 2),
    })
    log.info("built %s: nlist %d, nprobe %d, recall@10 %.3f", kind, nlist, chosen,
             info["recall_at_10"])
    return index, info



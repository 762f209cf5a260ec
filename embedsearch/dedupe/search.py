"""All pairs of images whose descriptors reach a cosine similarity threshold, in bounded memory.

The descriptor of an embedding is its signed square root, L2-normalised again ("power
normalisation", exponent :data:`DEFAULT_POWER`). Pooled CNN features are dominated by a few
large, bursty channels that photos of the same kind share; damping them separates
near-duplicates from merely similar photos better than the raw cosine: measured on real
photos with planted copies, at 95 % recall the share of distinct photos that look like a
duplicate drops from 3.8 % to 1.6 % (benchmarks/results/dedupe_threshold.md). The
transform needs no fitting, so the default threshold does not depend on the collection.

Two paths, both tiled so that no n×n matrix ever exists (a tile is at most
``TILE × TILE`` float32, 64 MiB):

``exact``
    Every pair is scored with BLAS on the full vectors, upper triangle only (each pair
    once, half the work of a faiss range search over the same rows). Used up to
    ``exact_limit`` rows: 20,000 × 1280-d takes a few seconds on 2 cores.

``projected``
    Above ``exact_limit``, the vectors are projected to ``reduce_dim`` dimensions (half
    principal directions, half a random sketch of the rest: see :func:`projection`),
    every pair is scored there against ``threshold - margin``, and each candidate is then
    re-scored exactly on the full vectors. A near-duplicate pair moves far less than
    ``margin`` under the projection (its estimation error is about
    ``(1 - cos²) / sqrt(reduce_dim / 2)``), so the result equals the exact path's in
    practice (tests, benchmarks/dedupe_threshold.py) at 1/10 of the arithmetic: 100,000 ×
    1280-d in well under a minute on 2 cores (benchmarks/dedupe_speed.py).

``ivf``
    Above ``ivf_limit`` (200,000) rows, scoring every pair even in 128 dimensions is the
    whole cost (1M × 1280-d: 2,025 s here). The projections are clustered into IVF
    lists (≈ 4·√n) and each row is compared with the rows of its ``nprobe`` nearest lists
    only, so the work grows as n·√n (done list by list as BLAS products: see
    :func:`_ivf_candidates`); the candidates are re-scored exactly as above.
    ``nprobe`` is calibrated on the collection itself: near-duplicates are planted at
    exactly the threshold (sampled rows turned towards other rows), and the smallest
    power of two that finds :data:`IVF_RECALL` of them is used.

Below ``ivf_limit`` faiss is not used: its flat range search scores both triangles and,
measured on this project's 2-core machine, was several times slower than the tiled BLAS
loop below.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from embedsearch.errors import EmbedsearchError

log = logging.getLogger(__name__)

#: Up to this many vectors every pair is scored on the full vectors.
EXACT_LIMIT = 20_000
#: Dimension of the projection used above EXACT_LIMIT.
REDUCE_DIM = 128
#: How far below the threshold a projected similarity may fall and still be re-scored.
MARGIN = 0.1
#: Rows per tile side.
TILE = 4096
#: Refuse to hold more candidate pairs than this (a threshold far too low for duplicates).
MAX_PAIRS = 50_000_000
#: Rows sampled to estimate the projection.
PCA_SAMPLE = 20_000
#: Exponent of the signed power normalisation of embeddings before comparison (1 = raw).
DEFAULT_POWER = 0.5
#: Above this many vectors, candidates come from an IVF index over the projections instead
#: of all pairs of them (n·√n instead of n² work; see :func:`_ivf_candidates`).
IVF_LIMIT = 200_000
#: Share of planted threshold-level near-duplicates the calibrated nprobe must find.
IVF_RECALL = 0.995
#: Planted pairs used to calibrate nprobe.
CALIBRATION_PAIRS = 4000


@dataclass
class Pairs:
    """Pairs ``(i[k], j[k])`` with ``i < j`` and cosine similarity ``sim[k]``."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray
    method: str
    threshold: float

    def __len__(self) -> int:
        return len(self.i)

    def at_least(self, threshold: float) -> Pairs:
        """The subset at or above a (higher) threshold, without searching again."""
        if threshold < self.threshold - 1e-9:
            raise ValueError(f"pairs were searched down to {self.threshold}, not {threshold}")
        keep = self.sim >= threshold
        return Pairs(self.i[keep], self.j[keep], self.sim[keep], self.method, threshold)


#: Rows handled at a time by :func:`as_unit_vectors` (1280-d float32: 80 MiB a temporary).
BLOCK = 16_384


def as_unit_vectors(vectors: np.ndarray, power: float = 1.0) -> np.ndarray:
    """C-contiguous float32 rows of unit length, after ``sign(x)·|x|**power``; refuses NaN,
    inf and zero rows.

    Never modifies the caller's array. Works block by block: besides the result (a copy
    unless the input is already float32 unit rows and ``power`` is 1), memory holds one
    block's temporaries, never a whole-array one (1M × 1280-d: 14.5 GiB peak when the
    checks, norms and division each made a full-size temporary, see
    benchmarks/results/dedupe_speed_1m.md). A memory-mapped input (a bundle's embeddings)
    is read once, front to back, and each block's pages are released from this process
    once read (:func:`_release_pages`), so the file does not stay resident beside the copy.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise EmbedsearchError(f"expected a 2-d array of vectors, got shape {x.shape}")
    shared = np.may_share_memory(x, vectors)
    out = np.empty_like(x) if power != 1.0 and shared else x
    norms = np.empty(len(x), np.float32)
    for k in range(0, len(x), BLOCK):
        blk = x[k:k + BLOCK]
        if not np.isfinite(blk).all():
            raise EmbedsearchError("the vectors contain NaN or infinite values",
                                   hint="re-embed the images; NaN vectors cannot be compared")
        if power != 1.0:
            o = out[k:k + BLOCK]
            np.copysign(np.abs(blk) ** power, blk, out=o)  # o may be blk itself
            blk = o
        norms[k:k + BLOCK] = np.linalg.norm(blk, axis=1)
        if shared:
            _release_pages(vectors, k, len(blk))
    if len(x) and norms.min() == 0:
        raise EmbedsearchError("some vectors are all zero; their similarity is undefined")
    if len(x) and np.abs(norms - 1).max() > 1e-3:
        src = out
        if out is x and shared:
            out = np.empty_like(x)
        for k in range(0, len(x), BLOCK):
            np.divide(src[k:k + BLOCK], norms[k:k + BLOCK, None], out=out[k:k + BLOCK])
            if src is x and shared:
                _release_pages(vectors, k, len(out[k:k + BLOCK]))
    return out


def _release_pages(vectors: np.ndarray, first: int, rows: int) -> None:
    """Drop rows ``first:first+rows`` of a read-only memory-mapped array (an ``np.memmap``
    or any view of one) from this process's resident set (``madvise(MADV_DONTNEED)``; the
    data stays in the page cache and is read back if touched again). Anything else, or a
    platform without it, is left alone."""
    import mmap

    mm = vectors.base
    while mm is not None and not isinstance(mm, mmap.mmap):
        mm = getattr(mm, "base", None)
    if mm is None or vectors.flags.writeable or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = np.frombuffer(mm, np.uint8).ctypes.data
    lo = vectors.ctypes.data - start + first * vectors.strides[0]
    hi = lo + rows * vectors.strides[0]
    lo = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the rows only
    hi = min(hi - hi % mmap.PAGESIZE, len(mm))
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _hits(s: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) of a score block at or above ``threshold``."""
    # Most rows have no hit: find the others with one vectorised pass.
    rows = np.flatnonzero(s.max(axis=1) >= threshold)
    if not len(rows):
        return rows, rows, np.zeros(0, np.float32)
    sub = s[rows]
    r, c = np.nonzero(sub >= threshold)
    return rows[r], c, sub[r, c]


def _tiled(x: np.ndarray, threshold: float, tile: int, max_pairs: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle pairs of rows of ``x`` with inner product >= threshold."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(x)
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    total = 0
    buf = np.empty((min(tile, n), min(tile, n)), np.float32)
    # BLAS already uses every core for the products; numpy's scans of the scores use one,
    # so they are split across threads (numpy releases the GIL there).
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for a0 in range(0, n, tile):
            a = x[a0:a0 + tile]
            for b0 in range(a0, n, tile):
                b = x[b0:b0 + tile]
                s = buf[:len(a), :len(b)]
                np.matmul(a, b.T, out=s)
                if b0 == a0:  # diagonal tile: keep j > i only
                    s[np.tril_indices(len(a), 0, len(b))] = -np.inf
                step = -(-len(a) // workers)
                parts = pool.map(lambda r0, s=s, k=step: (r0, _hits(s[r0:r0 + k], threshold)),
                                 range(0, len(a), step))
                for r0, (r, c, v) in parts:
                    if not len(r):
                        continue
                    out_i.append((a0 + r0 + r).astype(np.int64))
                    out_j.append((b0 + c).astype(np.int64))
                    out_s.append(v.astype(np.float32))
                    total += len(r)
                if total > max_pairs:
                    raise EmbedsearchError(
                        f"more than {max_pairs:,} pairs of images are at least "
                        f"{threshold:.3f} similar: that threshold is far too low for "
                        "duplicates", hint="raise --dup-threshold (see --sweep)")
    if not out_i:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def projection(x: np.ndarray, dim: int, sample: int = PCA_SAMPLE, seed: int = 0) -> np.ndarray:
    """(d, dim) map: the top ``dim // 2`` principal directions of the uncentred second
    moment of ``x``'s rows, then a Gaussian sketch of what they leave out.

    Principal directions alone overstate the similarity of distinct vectors that share
    them (their differences lie in the discarded part); a random sketch alone wastes the
    structure real embeddings have. Together, the cosine of the normalised projections
    estimates the true cosine without bias, with an error that shrinks as vectors get
    more alike.
    """
    from sklearn.utils.extmath import randomized_svd

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    s = np.asarray(x[rows], np.float32)
    m = (s.T @ s).astype(np.float64)
    k1 = dim // 2
    # Top eigenvectors of the (symmetric) d×d second moment by scikit-learn's randomized
    # SVD: a full eigh costs seconds, this about as long as the product above. Measured on
    # 25,000 synthetic 1280-d descriptors (benchmarks/results/library_swaps.md, one
    # thread): 99.9 % (clustered) / 97.0 % (gaussian) of the exact top-64 energy in 0.30 s,
    # where the former hand-written subspace iteration took 0.29 s for 99.2 % / 90.1 %,
    # and the same pairs found.
    _, _, vt = randomized_svd(m, k1, n_oversamples=16, n_iter=4, random_state=seed)
    top = vt.T
    g = rng.standard_normal((x.shape[1], dim - k1)) / np.sqrt(dim - k1)
    sketch = g - top @ (top.T @ g)  # of the residual only
    return np.ascontiguousarray(np.hstack([top, sketch]), dtype=np.float32)


def rescore(x: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Exact inner products of the row pairs (i[k], j[k])."""
    out = np.empty(len(i), np.float32)
    for k in range(0, len(i), chunk):
        a, b = x[i[k:k + chunk]], x[j[k:k + chunk]]
        out[k:k + chunk] = np.einsum("ij,ij->i", a, b)
    return out


def candidate_pairs(vectors: np.ndarray, threshold: float, *, power: float = DEFAULT_POWER,
                    exact_limit: int = EXACT_LIMIT, reduce_dim: int = REDUCE_DIM,
                    margin: float = MARGIN, tile: int = TILE,
                    max_pairs: int = MAX_PAIRS, ivf_limit: int = IVF_LIMIT) -> Pairs:
    """Every pair of rows whose descriptors (see module docstring) have cosine similarity
    >= ``threshold``."""
    if not 0 < threshold <= 1.0 + 1e-6:
        raise EmbedsearchError(f"threshold must be in (0, 1], got {threshold}")
    if not 0 < power <= 1:
        raise EmbedsearchError(f"power must be in (0, 1], got {power}")
    x = as_unit_vectors(vectors, power)
    n, d = x.shape
    if n < 2:
        empty = np.zeros(0, np.int64)
        return Pairs(empty, empty.copy(), np.zeros(0, np.float32), "exact", threshold)
    # float32 rounding puts identical unit vectors a hair below 1.0
    t = min(threshold, 1.0 - 1e-6)
    if n <= exact_limit or d <= reduce_dim:
        i, j, s = _tiled(x, t, tile, max_pairs)
        return Pairs(i, j, s, "exact", threshold)
    proj = projection(x, reduce_dim)
    y = np.empty((n, reduce_dim), np.float32)
    for k in range(0, n, BLOCK):
        y[k:k + BLOCK] = x[k:k + BLOCK] @ proj
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    y /= np.maximum(norms, 1e-12)
    if n > ivf_limit:
        i, j, method = *_ivf_candidates(x, y, proj, t, max(t - margin, 1e-6), max_pairs), "ivf"
    else:
        i, j, _ = _tiled(y, max(t - margin, 1e-6), tile, max_pairs)
        method = "projected"
    s = rescore(x, i, j)
    keep = s >= t
    log.debug("%s search: %d candidates, %d at or above %.3f", method, len(i), int(keep.sum()),
              t)
    return Pairs(i[keep], j[keep], s[keep], f"{method}-{reduce_dim}+rescore", threshold)


def _ivf_candidates(x: np.ndarray, y: np.ndarray, proj: np.ndarray, threshold: float,
                    floor: float, max_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) whose projections ``y`` reach ``floor``, through IVF lists over ``y``.

    The projections are clustered into ≈ 4·√n lists (faiss's IVF training, k-means) and
    each row is compared with the rows of its ``nprobe`` nearest lists only, so the work
    grows as n·√n, not n². A pair is found when either row's probed lists hold the other;
    nprobe is calibrated on this collection (:func:`_calibrate_nprobe`), not fixed.

    The comparisons are what faiss's IVF range search does, grouped the other way round:
    for each list, one BLAS product of its rows with every row that probes it. faiss scans
    the probed lists query by query in per-row loops; measured here the grouped products
    found the same pairs several times faster (benchmarks/results/dedupe_speed_1m.md).
    """
    import faiss

    from embedsearch.index.ivf import TRAIN_POINTS_PER_LIST, choose_nlist

    n, dim = y.shape
    rng = np.random.default_rng(0)
    nlist = choose_nlist(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 0
    index.train(y[np.sort(rng.choice(n, min(n, nlist * TRAIN_POINTS_PER_LIST), replace=False))])
    nprobe = _calibrate_nprobe(x, proj, quantizer, threshold, rng)
    probes = np.empty((n, nprobe), np.int32)
    for k in range(0, n, BLOCK):
        probes[k:k + BLOCK] = quantizer.search(y[k:k + BLOCK], nprobe)[1]
    # Rows sorted by their own (nearest) list, so that a list is a slice of ``ys``.
    order = np.argsort(probes[:, 0], kind="stable")
    bounds = np.searchsorted(probes[order, 0], np.arange(nlist + 1))
    ys = y[order]
    # Who probes each list: positions in ``ys``, grouped by probed list.
    flat = probes[order].ravel()
    del probes
    by_list = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[by_list], np.arange(nlist + 1))
    del flat
    by_list //= nprobe  # entry → position of the probing row
    keys: list[np.ndarray] = []
    total = 0
    for b in range(nlist):
        b0, b1 = bounds[b], bounds[b + 1]
        if b1 == b0:
            continue
        rows = by_list[starts[b]:starts[b + 1]]
        members = faiss.IndexFlatIP(dim)
        members.add(ys[b0:b1])
        # faiss scores the block with BLAS and keeps what reaches floor in one pass.
        lims, _, c = members.range_search(ys[rows], floor)
        p, q = rows[np.repeat(np.arange(len(rows)), np.diff(lims.astype(np.int64)))], b0 + c
        keep = p != q
        i, j = order[p[keep]], order[q[keep]]
        keys.append(np.unique(np.minimum(i, j) * n + np.maximum(i, j)))
        total += len(keys[-1])
        if total > 2 * max_pairs:
            raise EmbedsearchError(
                f"more than {max_pairs:,} pairs of images are at least {floor:.3f} similar "
                "in the candidate search: that threshold is far too low for duplicates",
                hint="raise --dup-threshold (see --sweep)")
    pairs = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    log.debug("ivf candidates: nlist %d, nprobe %d, %d pairs", nlist, nprobe, len(pairs))
    return pairs // n, pairs % n


def _calibrate_nprobe(x: np.ndarray, proj: np.ndarray, quantizer: object, threshold: float,
                      rng: np.random.Generator, sample: int = CALIBRATION_PAIRS) -> int:
    """The smallest power-of-two nprobe that finds :data:`IVF_RECALL` of synthetic
    near-duplicates planted at exactly ``threshold`` (the hardest ones to find).

    Each planted copy is a sampled row turned, towards another row of the collection plus
    a little noise, to cosine ``threshold`` with it (moving within the populated part of
    the space, where lists are finest); the pair counts as found when one row's nprobe
    nearest lists contain the other's list, which is what the range search needs.
    """
    u = x[np.sort(rng.choice(len(x), min(len(x), sample), replace=False))]
    w = x[rng.choice(len(x), len(u))] + 0.5 * rng.standard_normal(u.shape).astype(np.float32) \
        / np.sqrt(x.shape[1])
    w -= np.einsum("ij,ij->i", w, u)[:, None] * u
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    v = threshold * u + np.sqrt(1 - threshold ** 2) * w
    pu, pv = u @ proj, v @ proj
    pu /= np.maximum(np.linalg.norm(pu, axis=1, keepdims=True), 1e-12)
    pv /= np.maximum(np.linalg.norm(pv, axis=1, keepdims=True), 1e-12)
    nlist = quantizer.ntotal  # type: ignore[attr-defined]
    top = min(nlist, 1024)
    _, lu = quantizer.search(np.ascontiguousarray(pu, np.float32), top)  # type: ignore[attr-defined]
    _, lv = quantizer.search(np.ascontiguousarray(pv, np.float32), top)  # type: ignore[attr-defined]
    big = np.iinfo(np.int64).max

    def rank(lists: np.ndarray, target: np.ndarray) -> np.ndarray:
        hit = lists == target[:, None]
        return np.where(hit.any(1), hit.argmax(1), big)

    need = np.minimum(rank(lu, lv[:, 0]), rank(lv, lu[:, 0])) + 1  # nprobe that finds each
    nprobe = 1
    while nprobe < top and np.mean(need <= nprobe) < IVF_RECALL:
        nprobe *= 2
    return min(nprobe, top)

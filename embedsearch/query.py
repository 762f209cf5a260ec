"""Query images against a bundle: embed them (reusing known vectors) and find neighbours.

Files whose bytes the bundle (or the shared embedding cache) already embedded are not
encoded again; a query that is itself an indexed reference image is left out of its own
neighbours (leave-one-out) unless ``allow_self``. Classification on top of this lives in
:mod:`embedsearch.predict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.bundle import text_or_none
from embedsearch.errors import EmbedsearchError

if TYPE_CHECKING:
    from embedsearch.bundle import Bundle
    from embedsearch.index import Neighbours

#: A query at least this similar to an indexed image is that image (re-saved, re-encoded):
#: it is left out of its own neighbours, like one with the same sha256.
SELF_COSINE = 0.9999
#: (path, status, detail) of one query file; status "ok" or the reason it was not read.
Status = tuple[str, str, str]


def embed_files(bundle: Bundle, paths: list[Path], batch_size: int | None = None,
                num_workers: int | None = None
                ) -> tuple[np.ndarray, list[Status], list[str | None], dict[str, int]]:
    """Embed query files, reusing vectors the bundle or the shared embedding cache already
    holds for the same bytes (by sha256). Returns (vectors of the readable files, status of
    every file, sha256 of the readable files, {"encoded": files encoded, "reused": files
    whose vectors were reused})."""
    from embedsearch.embed import embed_sources
    from embedsearch.store.shared import hash_files, open_shared

    shas = hash_files(paths, num_workers)
    found: dict[int, np.ndarray] = {}
    rows = bundle.rows_by_sha256
    for i, sha in enumerate(shas):
        if sha in rows:
            found[i] = np.asarray(bundle.embeddings[rows[sha][0]])
    enc = bundle.image_encoder()
    shared = open_shared(enc.identity()) if len(found) < len(paths) else None
    if shared is not None:
        hits = shared.get_many([s for i, s in enumerate(shas) if s and i not in found])
        found.update({i: hits[s].vector for i, s in enumerate(shas)
                      if s in hits and i not in found})
    todo = [i for i in range(len(paths)) if i not in found]
    counts = {"encoded": len(todo), "reused": len(found)}
    results: dict[int, tuple[str, str, np.ndarray | None]] = {
        i: ("ok", "", v) for i, v in found.items()}
    for idx, v, infos in embed_sources(enc, [paths[i] for i in todo],
                                       batch_size=batch_size, num_workers=num_workers):
        ok = [j for j, info in zip(idx, infos, strict=True) if info.status == "ok"]
        row = {j: n for n, j in enumerate(ok)}  # vectors hold the decoded files only
        for j, info in zip(idx, infos, strict=True):
            results[todo[j]] = (info.status, info.detail, v[row[j]] if j in row else None)
            shas[todo[j]] = info.sha256 or shas[todo[j]]
        if shared is not None and ok:
            shared.put_many([shas[todo[j]] for j in ok], v)
    statuses = [(str(p), results[i][0], results[i][1]) for i, p in enumerate(paths)]
    good = [i for i in range(len(paths)) if results[i][0] == "ok"]
    vectors = (np.stack([results[i][2] for i in good]).astype(np.float32) if good
               else np.zeros((0, bundle.dim), np.float32))
    return vectors, statuses, [shas[i] for i in good], counts


def with_tta(bundle: Bundle, vectors: np.ndarray, statuses: list[Status], tta: str | None,
             batch_size: int | None = None, num_workers: int | None = None) -> np.ndarray:
    """``vectors`` (of the readable files, in order) averaged with their mirror images'
    embeddings (``tta="flip"``), re-normalised; unchanged when ``tta`` is None."""
    from embedsearch.embed import embed_sources
    from embedsearch.views import tta_augment

    augment = tta_augment(tta)
    if augment is None or not len(vectors):
        return vectors
    ok = [Path(p) for p, status, _ in statuses if status == "ok"]
    flipped = [fv for _, fv, _ in embed_sources(bundle.encoder(), ok, batch_size=batch_size,
                                                 num_workers=num_workers, augment=augment)]
    mirrored = np.concatenate(flipped)
    if len(mirrored) != len(vectors):  # a file changed between the two reads
        raise EmbedsearchError(f"{len(vectors)} images decoded, {len(mirrored)} mirrored",
                               hint="predict again once the files stop changing")
    out = vectors + mirrored
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def embed_paths(bundle: Bundle, paths: list[Path], batch_size: int | None = None,
                num_workers: int | None = None, tta: str | None = None
                ) -> tuple[np.ndarray, list[Status]]:
    """Embed query files. Returns (vectors for readable files, statuses of all files).

    ``tta="flip"`` averages each embedding with its mirror image's, re-normalised.
    """
    vectors, statuses, _, _ = embed_files(bundle, paths, batch_size, num_workers)
    return with_tta(bundle, vectors, statuses, tta, batch_size, num_workers), statuses


def neighbours(bundle: Bundle, vectors: np.ndarray, k: int,
               sha256: list[str | None] | None = None, allow_self: bool = False
               ) -> tuple[Neighbours, list[dict[str, Any]]]:
    """The ``k`` nearest searchable rows (reference rows of a labelled bundle, all rows
    of an unlabelled one) of each query, leaving out the query's own copies: rows with
    its sha256 and rows at cosine >= SELF_COSINE (leave-one-out), unless ``allow_self``.

    Returns (neighbours, per query {"id", "split", "excluded"} of its indexed copy, or
    {} when it has none among the searched rows). With ``allow_self`` a copy found
    among the neighbours is reported with ``excluded`` 0: it votes for itself.
    """
    from embedsearch.index import Neighbours, search

    index, items = bundle.index, bundle.items
    limit = bundle.reference_rows if bundle.labelled else None
    n_rows = index.ntotal if limit is None else min(limit, index.ntotal)
    rows = bundle.rows_by_sha256
    own = [np.array([r for r in rows.get(s or "", []) if r < n_rows], np.int64)
           for s in (sha256 or [None] * len(vectors))]
    pad = 0 if allow_self else max((len(o) for o in own), default=0) + 4
    while True:
        want = min(k + pad, n_rows)
        raw = search(index, vectors, max(want, 1), limit)
        ids, sims, found = [], [], []
        short = False
        for q in range(len(vectors)):
            qi, qs = raw.ids[q], raw.similarities[q]
            copy = (qs >= SELF_COSINE) | np.isin(qi, own[q])
            keep = np.ones_like(copy) if allow_self else ~copy
            ids.append(qi[keep][:k])
            sims.append(qs[keep][:k])
            first = int(qi[copy][0]) if copy.any() else (int(own[q][0]) if len(own[q])
                                                          else None)
            found.append({} if first is None else {
                "id": str(items["id"].iat[first]),
                "split": text_or_none(items["split"].iat[first]),
                "excluded": 0 if allow_self else int(copy.sum())})
            short |= len(ids[-1]) < k and want < n_rows
        if not short:
            return Neighbours(ids, sims), found
        pad = max(pad, 4) * 4

"""Exact and near-duplicate groups from embeddings, with a keep policy and a reason per row.

Grouping never chains: a group is a *star* around its kept image. Images are visited in
keep-priority order; an image not yet claimed becomes a kept image ("leader") and claims
every unclaimed image at least ``threshold`` similar to it. A claimed image finally joins
the most similar leader that outranks it, so every removed image is a near-duplicate of
its own group's kept image, never merely of another removed one: with A~B and B~C but
A≁C, A and C share a group only when both are near-duplicates of the kept image itself.

Exact duplicates (same sha256) are grouped first: the copies follow the copy that ranks
highest, with similarity 1.0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.dedupe.search import DEFAULT_POWER, EXACT_LIMIT, Pairs, candidate_pairs
from embedsearch.errors import EmbedsearchError

if TYPE_CHECKING:
    import pandas as pd

#: Default cosine similarity for near-duplicates with the default encoder; chosen from
#: benchmarks/results/dedupe_threshold.md (planted copies of real photos).
DEFAULT_THRESHOLD = 0.90
KEEP_POLICIES = ("resolution", "filesize", "path", "oldest")
#: Thresholds printed by a sweep.
SWEEP_THRESHOLDS = (0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98, 0.99)

GROUP_COLUMNS = ["group", "id", "kept", "match", "similarity", "kept_id", "reason", "label",
                 "split", "width", "height", "size", "sha256"]


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

    @classmethod
    def build(cls, n: int, ids: Sequence[Any] | None = None, **kw: Any) -> ItemFacts:
        ids_arr = np.asarray([str(i) for i in ids] if ids is not None
                             else [str(k) for k in range(n)], dtype=object)
        if ids_arr.shape != (n,):
            raise EmbedsearchError(f"ids has {len(ids_arr)} entries, expected {n}")
        if len(set(ids_arr.tolist())) != n:
            raise EmbedsearchError("ids are not unique")
        numeric = {"width", "height", "size", "mtime_ns"}
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
            keys = (id_rank, -size, -area)
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
            if self.size is not None:
                size = self._num("size")
                if size[kept] > max(size[m] for m in others if area[m] == area[kept]):
                    return f"largest resolution ({w}×{h}), tie broken by the larger file"
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


@dataclass
class DedupeResult:
    """Duplicate groups over ``n_items`` images.

    ``groups`` has one row per image that belongs to a group of two or more (columns
    :data:`GROUP_COLUMNS`); ``group_of[k]`` is item ``k``'s group id (singletons get ids of
    their own). ``component_of[k]`` is the id of item ``k``'s connected component over *all*
    duplicate pairs: coarser than the groups, it is what a train/test splitter needs
    (:func:`group_labels`), since no duplicate pair may straddle two splits.
    """

    groups: pd.DataFrame
    group_of: np.ndarray
    component_of: np.ndarray
    ids: np.ndarray
    threshold: float
    keep: str
    method: str
    seconds: float
    n_items: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return int(self.groups["group"].nunique()) if len(self.groups) else 0

    @property
    def removed_ids(self) -> list[str]:
        return self.groups.loc[~self.groups["kept"], "id"].tolist()

    @property
    def kept_ids(self) -> list[str]:
        return self.groups.loc[self.groups["kept"], "id"].tolist()

    def removed_mask(self) -> np.ndarray:
        """Boolean per item (in input order): True where the item is a removed duplicate."""
        removed = set(self.removed_ids)
        return np.fromiter((i in removed for i in self.ids.tolist()), bool, len(self.ids))

    @property
    def label_conflicts(self) -> pd.DataFrame:
        """Rows of the groups whose members carry two or more different labels."""
        g = self.groups
        if not len(g) or g["label"].isna().all():
            return g.iloc[0:0]
        n_labels = g.dropna(subset=["label"]).groupby("group")["label"].nunique()
        bad = n_labels[n_labels > 1].index
        return g[g["group"].isin(bad)]

    def summary(self) -> dict[str, Any]:
        g = self.groups
        removed = g[~g["kept"]] if len(g) else g
        conflicts = self.label_conflicts
        return {
            "images": self.n_items,
            "threshold": self.threshold,
            "keep": self.keep,
            "groups": self.n_groups,
            "in_groups": len(g),
            "removed": len(removed),
            "removed_exact": int((removed["match"] == "exact").sum()) if len(g) else 0,
            "removed_near": int((removed["match"] == "near").sum()) if len(g) else 0,
            "largest_group": int(g.groupby("group").size().max()) if len(g) else 0,
            "label_conflict_groups": int(conflicts["group"].nunique()) if len(conflicts) else 0,
            "method": self.method,
            "seconds": round(self.seconds, 3),
            **{k: len(v) if isinstance(v, list) else v for k, v in self.extra.items()},
        }


def _exact_representatives(facts: ItemFacts, rank: np.ndarray) -> np.ndarray:
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


def _star_groups(n: int, pairs: Pairs, rank: np.ndarray, active: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """leader[k] (k itself for leaders, -1 for inactive) and similarity to the leader."""
    # Both directions, restricted to active (non-exact-copy) items, sorted by first item.
    keep = active[pairs.i] & active[pairs.j]
    a = np.concatenate([pairs.i[keep], pairs.j[keep]])
    b = np.concatenate([pairs.j[keep], pairs.i[keep]])
    s = np.concatenate([pairs.sim[keep], pairs.sim[keep]])
    order = np.lexsort((-s, a))
    a, b, s = a[order], b[order], s[order]
    starts = np.searchsorted(a, np.arange(n + 1))
    leader = np.full(n, -1, np.int64)
    is_leader = np.zeros(n, bool)
    # Pass 1: leaders in priority order; each claims its unclaimed neighbours.
    claimed = ~active
    for k in np.argsort(rank, kind="stable"):
        if claimed[k]:
            continue
        is_leader[k] = claimed[k] = True
        nb = b[starts[k]:starts[k + 1]]
        claimed[nb] = True
    # Pass 2: every other active item joins its most similar leader that outranks it.
    sim_to = np.ones(n, np.float32)
    for k in np.flatnonzero(active):
        if is_leader[k]:
            leader[k] = k
            continue
        nb, ns = b[starts[k]:starts[k + 1]], s[starts[k]:starts[k + 1]]
        ok = is_leader[nb] & (rank[nb] < rank[k])
        best = int(np.argmax(ok))  # neighbours are sorted by similarity, descending
        assert ok[best], "a claimed item always has the leader that claimed it"
        leader[k], sim_to[k] = nb[best], ns[best]
    return leader, sim_to


def find_duplicates(
    vectors: np.ndarray,
    ids: Sequence[Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    keep: str = "resolution",
    sha256: Sequence[Any] | None = None,
    widths: Sequence[Any] | None = None,
    heights: Sequence[Any] | None = None,
    sizes: Sequence[Any] | None = None,
    mtimes: Sequence[Any] | None = None,
    labels: Sequence[Any] | None = None,
    splits: Sequence[Any] | None = None,
    pairs: Pairs | None = None,
    exact_limit: int = EXACT_LIMIT,
    power: float = DEFAULT_POWER,
) -> DedupeResult:
    """Group exact and near-duplicates among L2-normalised ``vectors`` (one row per image).

    Works on arrays only, so cached embeddings can be deduplicated without any image. Pass
    ``pairs`` from :func:`candidate_pairs` (at this threshold or lower) to reuse a search.
    Similarities are cosines of power-normalised embeddings (``power``, see
    :mod:`embedsearch.dedupe.search`); ``power=1`` compares the raw embeddings.
    """
    t0 = time.perf_counter()
    vectors = np.asarray(vectors)
    n = len(vectors)
    facts = ItemFacts.build(n, ids, sha256=sha256, width=widths, height=heights, size=sizes,
                            mtime_ns=mtimes, labels=labels, splits=splits)
    if pairs is None:
        pairs = candidate_pairs(vectors, threshold, exact_limit=exact_limit, power=power)
    else:
        pairs = pairs.at_least(threshold)
    return _group(vectors, facts, pairs, threshold, keep, t0)


def _group(vectors: np.ndarray, facts: ItemFacts, pairs: Pairs, threshold: float, keep: str,
           t0: float) -> DedupeResult:
    import pandas as pd

    n = len(facts.ids)
    order = facts.priority(keep)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    rep = _exact_representatives(facts, rank)
    active = rep == np.arange(n)
    leader, sim_to = _star_groups(n, pairs, rank, active)
    # Exact copies follow their representative.
    copies = np.flatnonzero(~active)
    leader[copies] = leader[rep[copies]]
    sim_to[copies] = sim_to[rep[copies]]
    members: dict[int, list[int]] = {}
    for k in range(n):
        members.setdefault(int(leader[k]), []).append(k)
    multi = sorted((m for m in members.values() if len(m) > 1),
                   key=lambda m: facts.ids[int(leader[m[0]])])
    group_of = np.empty(n, np.int64)
    rows: list[dict[str, Any]] = []
    next_single = len(multi) + 1
    for gid, m in enumerate(multi, start=1):
        kept = int(leader[m[0]])
        why_kept = facts.keep_reason(keep, kept, m)
        kept_id = str(facts.ids[kept])
        for k in sorted(m, key=lambda k: (rank[k] != rank[kept], -float(sim_to[k]), rank[k])):
            group_of[k] = gid
            if k == kept:
                match, reason = "kept", f"kept: {why_kept}"
            elif not active[k]:
                match = "exact"
                via = str(facts.ids[rep[k]])
                reason = (f"exact copy (same sha256) of {via}" if rep[k] == kept else
                          f"exact copy (same sha256) of {via}, a near-duplicate "
                          f"(cosine {sim_to[k]:.3f}) of {kept_id}")
            else:
                match = "near"
                reason = f"near-duplicate of {kept_id} (cosine {sim_to[k]:.3f} >= {threshold:g})"
            rows.append({
                "group": gid, "id": str(facts.ids[k]), "kept": k == kept, "match": match,
                "similarity": round(float(min(sim_to[k], 1.0)), 4), "kept_id": kept_id,
                "reason": reason,
                "label": _value(facts.labels, k), "split": _value(facts.splits, k),
                "width": _int(facts.width, k), "height": _int(facts.height, k),
                "size": _int(facts.size, k), "sha256": _value(facts.sha256, k),
            })
    for m in members.values():
        if len(m) == 1:
            group_of[m[0]] = next_single
            next_single += 1
    groups = pd.DataFrame(rows, columns=GROUP_COLUMNS)
    for col in ("width", "height", "size"):
        groups[col] = groups[col].astype("Int64")
    components = _components(n, pairs, rep)
    return DedupeResult(groups, group_of, components, facts.ids, float(threshold), keep,
                        pairs.method, time.perf_counter() - t0, n)


def _components(n: int, pairs: Pairs, rep: np.ndarray) -> np.ndarray:
    """Connected components over near pairs and exact copies, numbered from 1."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i = np.concatenate([pairs.i, np.arange(n)])
    j = np.concatenate([pairs.j, rep])
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64) + 1


def _value(arr: np.ndarray | None, k: int) -> Any:
    if arr is None:
        return None
    v = arr[k]
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _int(arr: np.ndarray | None, k: int) -> int | None:
    if arr is None or np.isnan(arr[k]):
        return None
    return int(arr[k])


def sweep(vectors: np.ndarray, thresholds: Sequence[float] = SWEEP_THRESHOLDS,
          ids: Sequence[Any] | None = None, **facts: Any) -> pd.DataFrame:
    """Group counts across thresholds from one search at the lowest threshold.

    ``facts`` are the keyword arguments of :func:`find_duplicates` (sha256, widths, labels…).
    """
    import pandas as pd

    exact_limit = facts.pop("exact_limit", EXACT_LIMIT)
    power = facts.pop("power", DEFAULT_POWER)
    ts = sorted({float(t) for t in thresholds})
    if not ts:
        raise EmbedsearchError("no thresholds to sweep")
    t0 = time.perf_counter()
    pairs = candidate_pairs(vectors, ts[0], exact_limit=exact_limit, power=power)
    search_s = time.perf_counter() - t0
    rows = []
    for t in ts:
        res = find_duplicates(vectors, ids, threshold=t, pairs=pairs, **facts)
        s = res.summary()
        rows.append({"threshold": t, "groups": s["groups"], "removed": s["removed"],
                     "removed_exact": s["removed_exact"], "removed_near": s["removed_near"],
                     "largest_group": s["largest_group"],
                     "label_conflict_groups": s["label_conflict_groups"],
                     "pairs": int((pairs.sim >= t).sum())})
    out = pd.DataFrame(rows)
    out.attrs["search_seconds"] = search_s
    return out


def group_labels(result: DedupeResult) -> np.ndarray:
    """One group id per item (input order); pass as ``groups=`` to a scikit-learn splitter
    (GroupShuffleSplit, StratifiedGroupKFold) so that no two duplicates, exact or near, ever
    fall on both sides. These are connected components over all duplicate pairs (a chain
    A~B~C is one unit here, unlike in the keep/remove groups)."""
    return result.component_of.copy()


def near_duplicate_pairs(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                         **search: Any) -> tuple[np.ndarray, float]:
    """((m, 2) int64 row pairs with cosine >= threshold, the threshold used)."""
    pairs = candidate_pairs(vectors, threshold, **search)
    return np.stack([pairs.i, pairs.j], axis=1), float(threshold)


def grouped_split(groups: np.ndarray, labels: Sequence[Any] | None = None, *,
                  test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) with every duplicate group wholly on one side.

    Stratified by ``labels`` when given (StratifiedGroupKFold with ``round(1/test_size)``
    folds, first fold as test), else GroupShuffleSplit.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    groups = np.asarray(groups)
    idx = np.arange(len(groups))
    if labels is not None:
        y = np.asarray([str(v) for v in labels])
        folds = max(2, round(1 / test_size))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, test = next(splitter.split(idx, y, groups))
    else:
        gss = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train, test = next(gss.split(idx, groups=groups))
    return np.sort(train), np.sort(test)

"""Exact and near-duplicate groups from embeddings, with a keep policy and a reason per row.

Two images are *linked* when their embeddings are at least ``threshold`` similar, or when
they are at least :data:`HASH_FLOOR` similar and their mirror-invariant perceptual hashes
(:mod:`embedsearch.dedupe.views`) differ in at most :data:`HASH_MAX_BITS` bits: the second
signal recovers greyscale, tiny, squashed, mirrored and watermarked copies that the
embedding puts below the threshold. Without a threshold the collection calibrates its own
(:mod:`embedsearch.dedupe.calibrate`).

Grouping never chains, and is not built around the file that happens to be kept: groups
are *stars around the most connected image* (star clustering). Images are visited by
number of links, most first; one linked to an existing centre joins the centre it is most
similar to, otherwise it becomes a centre and takes its not yet grouped neighbours. Every
member is thus linked to its group's centre (the original, for a set of edited copies of
one image, since every copy is linked to it), never merely to another member: with A~B and
B~C but A≁C, A and C share a group only through a centre both are linked to.

The keep decision is separate (:meth:`ItemFacts.priority`): the default ``resolution``
policy keeps the most pixels, then a colour image over a greyscale one, then the most bytes
per pixel (least re-compressed), then path order.

Exact duplicates (same sha256) are grouped first: the copies follow the copy that ranks
highest, with similarity 1.0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.dedupe.facts import ItemFacts, exact_representatives
from embedsearch.dedupe.links import (
    GEOMETRY_BAND,
    GEOMETRY_PER_IMAGE,
    HASH_FLOOR,
    HASH_MAX_BITS,
    Links,
    centre_groups,
    geometry_candidates,
    link_pairs,
    rotation_proposals,
)
from embedsearch.dedupe.search import (
    DEFAULT_POWER,
    EXACT_LIMIT,
    Pairs,
    as_unit_vectors,
    candidate_pairs,
)
from embedsearch.errors import EmbedsearchError

if TYPE_CHECKING:
    import pandas as pd

    from embedsearch.dedupe.views import ImageViews

#: Default cosine similarity for near-duplicates with the default encoder; chosen from
#: benchmarks/results/dedupe_threshold.md (planted copies of real photos).
DEFAULT_THRESHOLD = 0.90
#: Thresholds printed by a sweep.
SWEEP_THRESHOLDS = (0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98, 0.99)

GROUP_COLUMNS = ["group", "id", "kept", "match", "similarity", "kept_id", "reason", "label",
                 "split", "width", "height", "size", "sha256", "centre_id", "signal",
                 "hash_bits"]


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
    #: pairs just below the threshold left in different groups (id_a, id_b, similarity)
    near_misses: pd.DataFrame | None = None

    @property
    def n_groups(self) -> int:
        return int(self.groups["group"].nunique()) if len(self.groups) else 0

    @property
    def removed_ids(self) -> list[str]:
        return self.groups.loc[~self.groups["kept"], "id"].tolist()

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


def _add_margin_links(n: int, pairs: Pairs, bits: np.ndarray, links: Links, threshold: float,
                      same_file: np.ndarray) -> tuple[Links, dict[str, Any]]:
    """``links`` plus the lone matches of :func:`embedsearch.dedupe.calibrate.margin_links`."""
    from embedsearch.dedupe.calibrate import margin_links

    linked = _linked(n, pairs, links)
    key = pairs.i * n + pairs.j
    a, b, s, info = margin_links(n, pairs.i, pairs.j, pairs.sim, linked, threshold,
                                 pairs.threshold, same_file)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    new_key, first = np.unique(lo * n + hi, return_index=True)
    lo, hi, s = lo[first], hi[first], s[first]
    order = np.argsort(key)  # every margin pair is a searched pair: find its hash distance
    pair_bits = bits[order[np.searchsorted(key, new_key, sorter=order)]]
    info["reason"] = (f"closest other picture by a margin of at least {info['gap_needed']:.3f} "
                      "over the next one")
    return Links(np.concatenate([links.i, lo]), np.concatenate([links.j, hi]),
                 np.concatenate([links.sim, s]), np.concatenate([links.bits, pair_bits]),
                 np.concatenate([links.signal, np.full(len(lo), "margin", object)])), info


def _linked(n: int, pairs: Pairs, links: Links) -> np.ndarray:
    """Per searched pair: is it among ``links``."""
    return np.isin(pairs.i * n + pairs.j, links.i * n + links.j)


def _add_geometry_links(n: int, pairs: Pairs, bits: np.ndarray, links: Links,
                        threshold: float, same_file: np.ndarray,
                        verify: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        vectors: np.ndarray, power: float, views: ImageViews | None
                        ) -> tuple[Links, dict[str, Any]]:
    """``links`` plus the pairs that local features confirm
    (:mod:`embedsearch.dedupe.geometry`, through ``verify(i, j)``): band pairs
    (:func:`~embedsearch.dedupe.links.geometry_candidates`) and rotated copies proposed
    by their turned-back hash (:func:`~embedsearch.dedupe.links.rotation_proposals`) and,
    where ``verify`` has a ``propose()`` (:class:`~embedsearch.dedupe.geometry.FileVerifier`),
    pairs that share local descriptors whatever their cosine (crops of look-alikes).

    Links the turned-back hash made (signal "rotation") are checked too and kept only if
    local features confirm them: a rotated copy's centre is half its side, and where that
    centre is a smooth gradient its hash matches other gradients within a few bits (planted
    posters: 15 of 51,902 distinct band pairs), so one false match would pull a whole other
    group into the copy's star (posters1: 131 of 160 wrong pairs)."""
    t0 = time.perf_counter()
    cand = geometry_candidates(n, pairs, _linked(n, pairs, links), threshold, same_file,
                               GEOMETRY_BAND, GEOMETRY_PER_IMAGE)
    ci, cj, cs = pairs.i[cand], pairs.j[cand], pairs.sim[cand]
    cb = bits[cand]
    turned = links.signal == "rotation"
    ci, cj = np.concatenate([ci, links.i[turned]]), np.concatenate([cj, links.j[turned]])
    cs, cb = np.concatenate([cs, links.sim[turned]]), np.concatenate([cb, links.bits[turned]])
    signal = np.concatenate([np.full(len(cand), "geometry", object),
                             np.full(int(turned.sum()), "rotation", object)])
    links = Links(links.i[~turned], links.j[~turned], links.sim[~turned], links.bits[~turned],
                  links.signal[~turned])
    found: dict[str, int] = {}
    routes = {"rotation_proposals": (lambda: rotation_proposals(views)) if views is not None
              else None,
              "vote_proposals": getattr(verify, "propose", None)}
    for name, propose in routes.items():
        found[name] = 0
        if propose is None:
            continue
        pi, pj = propose()
        key = pi * n + pj
        new = ~np.isin(key, np.concatenate([links.i * n + links.j, ci * n + cj])) \
            & (same_file[pi] != same_file[pj])
        key = np.unique(key[new])
        pi, pj = key // n, key % n
        found[name] = proposed = len(pi)
        if proposed:
            rows, inv = np.unique(np.concatenate([pi, pj]), return_inverse=True)
            x = as_unit_vectors(np.asarray(vectors)[rows], power)
            a, b = inv[:proposed], inv[proposed:]
            ci, cj = np.concatenate([ci, pi]), np.concatenate([cj, pj])
            cs = np.concatenate([cs, np.einsum("ij,ij->i", x[a], x[b]).astype(cs.dtype)])
            cb = np.concatenate([cb, np.full(proposed, -1, cb.dtype)])
            signal = np.concatenate([signal, np.full(proposed, "geometry", object)])
    ok = np.asarray(verify(ci, cj), bool) if len(ci) else np.zeros(0, bool)
    info = {"checked": len(ci), "band_pairs": len(cand), "rotation_links": int(turned.sum()),
            **found, "links": int(ok.sum()),
            "rotation_links_confirmed": int((ok & (signal == "rotation")).sum()),
            "seconds": round(time.perf_counter() - t0, 3)}
    return Links(np.concatenate([links.i, ci[ok]]), np.concatenate([links.j, cj[ok]]),
                 np.concatenate([links.sim, cs[ok]]), np.concatenate([links.bits, cb[ok]]),
                 np.concatenate([links.signal, signal[ok]])), info


def find_duplicates(
    vectors: np.ndarray,
    ids: Sequence[Any] | None = None,
    *,
    threshold: float | None = DEFAULT_THRESHOLD,
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
    hashes: np.ndarray | ImageViews | None = None,
    grey: Sequence[Any] | None = None,
    verify: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> DedupeResult:
    """Group exact and near-duplicates among L2-normalised ``vectors`` (one row per image).

    Works on arrays only, so cached embeddings can be deduplicated without any image. Pass
    ``pairs`` from :func:`candidate_pairs` to reuse a search (searched down to the
    threshold, or to :data:`HASH_FLOOR` when ``hashes`` are given or the threshold is
    calibrated). ``threshold=None`` calibrates it on the vectors
    (:func:`embedsearch.dedupe.calibrate.calibrate`). ``hashes`` (an
    :class:`~embedsearch.dedupe.views.ImageViews`, or plain hashes, one per vector,
    0 = unknown) add the second signal;
    ``grey`` (greyscale flags) refines the keep policy. ``verify(i, j)`` (item index
    arrays → bool per pair), e.g. :func:`embedsearch.dedupe.geometry.file_verifier`, adds
    the third signal: pairs in a band below the threshold that it accepts are linked
    (:func:`~embedsearch.dedupe.links.geometry_candidates` picks them). Similarities are cosines of
    power-normalised embeddings (``power``, see :mod:`embedsearch.dedupe.search`);
    ``power=1`` compares the raw embeddings.
    """
    t0 = time.perf_counter()
    vectors = np.asarray(vectors)
    n = len(vectors)
    facts = ItemFacts.build(n, ids, sha256=sha256, width=widths, height=heights, size=sizes,
                            mtime_ns=mtimes, labels=labels, splits=splits, grey=grey)
    if hashes is not None:
        from embedsearch.dedupe.views import ImageViews

        if not isinstance(hashes, ImageViews):
            plain = np.asarray(hashes, np.uint64)
            hashes = ImageViews.empty(len(plain))
            hashes.hash[:] = plain
        if hashes.hash.shape != (n,):
            raise EmbedsearchError(f"hashes has {len(hashes.hash)} entries, expected {n}")
    if threshold is not None and not 0 < threshold <= 1.0 + 1e-6:
        raise EmbedsearchError(f"threshold must be in (0, 1], got {threshold}")
    rank = np.empty(n, np.int64)  # keep order: 0 = the item the policy keeps first
    rank[facts.priority(keep)] = np.arange(n)
    same_file = exact_representatives(facts, rank)
    if threshold is None:
        floor = HASH_FLOOR
    else:
        floor = min(HASH_FLOOR, threshold) if hashes is not None else threshold
        if verify is not None:
            floor = min(floor, threshold - GEOMETRY_BAND)
    if pairs is None:
        pairs = candidate_pairs(vectors, floor, exact_limit=exact_limit, power=power)
    else:
        pairs = pairs.at_least(floor)
    calibration = None
    if threshold is None:
        from embedsearch.dedupe.calibrate import calibrate

        _, _, confirmed = link_pairs(pairs, 1.0 + 1e-6, hashes)
        calibration = calibrate(n, pairs.i, pairs.j, pairs.sim, confirmed, floor, same_file)
        threshold = calibration.threshold
    links, bits, _ = link_pairs(pairs, threshold, hashes)
    geometry_info = None
    if verify is not None:
        links, geometry_info = _add_geometry_links(n, pairs, bits, links, threshold,
                                                   same_file, verify, vectors, power, hashes)
    margin_info = None
    if pairs.threshold < threshold:  # searched below the threshold: lone matches too
        links, margin_info = _add_margin_links(n, pairs, bits, links, threshold, same_file)
    res = _group(vectors, facts, links, pairs, threshold, keep, t0, power, rank, same_file)
    if margin_info is not None:
        res.extra["margin"] = margin_info
    if geometry_info is not None:
        res.extra["geometry"] = geometry_info
    if calibration is not None:
        res.extra["calibration"] = calibration.evidence
        res.extra["threshold_source"] = "calibrated"
    return res


def _group(vectors: np.ndarray, facts: ItemFacts, links: Links, pairs: Pairs, threshold: float,
           keep: str, t0: float, power: float, rank: np.ndarray, rep: np.ndarray
           ) -> DedupeResult:
    """Groups from ``links``; ``rank`` is the keep policy's order of every item and ``rep``
    each item's exact-copy representative (both computed once by :func:`find_duplicates`)."""
    import pandas as pd

    from embedsearch.dedupe.calibrate import components

    n = len(facts.ids)
    active = rep == np.arange(n)
    centre, via = centre_groups(n, links, active)
    # Exact copies follow their representative.
    copies = np.flatnonzero(~active)
    centre[copies] = centre[rep[copies]]
    members: dict[int, list[int]] = {}
    for k in range(n):
        members.setdefault(int(centre[k]), []).append(k)
    multi = [m for m in members.values() if len(m) > 1]
    kept_of = {id(m): min(m, key=lambda k: rank[k]) for m in multi}
    multi.sort(key=lambda m: facts.ids[kept_of[id(m)]])
    sim_kept = _similarity_to_kept(vectors, multi, kept_of, power)
    group_of = np.empty(n, np.int64)
    rows: list[dict[str, Any]] = []
    next_single = len(multi) + 1
    for gid, m in enumerate(multi, start=1):
        kept = kept_of[id(m)]
        c = int(centre[m[0]])
        why_kept = facts.keep_reason(keep, kept, m)
        kept_id, centre_id = str(facts.ids[kept]), str(facts.ids[c])
        for k in sorted(m, key=lambda k: (k != kept, -sim_kept[k], rank[k])):
            group_of[k] = gid
            link = via[k] if active[k] else via[rep[k]]
            signal, bits = ("", None) if link < 0 else (links.signal[link],
                                                      int(links.bits[link]))
            if k == kept:
                match, reason = "kept", f"kept: {why_kept}"
            elif not active[k]:
                match = "exact"
                reason = f"exact copy (same sha256) of {facts.ids[rep[k]]}"
            elif k == c:
                match = "near"
                reason = (f"centre of the group (every member is linked to it); {kept_id} "
                          "is kept instead")
            else:
                match, reason = "near", _near_reason(centre_id, links, link, threshold)
            rows.append({
                "group": gid, "id": str(facts.ids[k]), "kept": k == kept, "match": match,
                "similarity": round(float(min(sim_kept[k], 1.0)), 4), "kept_id": kept_id,
                "reason": reason,
                "label": _value(facts.labels, k), "split": _value(facts.splits, k),
                "width": _int(facts.width, k), "height": _int(facts.height, k),
                "size": _int(facts.size, k), "sha256": _value(facts.sha256, k),
                "centre_id": centre_id, "signal": "exact" if not active[k] and k != kept
                else signal, "hash_bits": bits if bits is not None and bits >= 0 else None,
            })
    for m in members.values():
        if len(m) == 1:
            group_of[m[0]] = next_single
            next_single += 1
    groups = pd.DataFrame(rows, columns=GROUP_COLUMNS)
    for col in ("width", "height", "size", "hash_bits"):
        groups[col] = groups[col].astype("Int64")
    # Connected components over the links and exact copies, numbered from 1.
    component_of = components(n, links.i, links.j, rep).astype(np.int64) + 1
    res = DedupeResult(groups, group_of, component_of, facts.ids, float(threshold), keep,
                       pairs.method, time.perf_counter() - t0, n)
    res.extra["links_by_hash"] = int((links.signal == "hash").sum())
    res.extra["links_by_rotation"] = int((links.signal == "rotation").sum())
    res.extra["links_by_margin"] = int((links.signal == "margin").sum())
    res.extra["links_by_geometry"] = int((links.signal == "geometry").sum())
    res.near_misses = _near_misses(pairs, threshold, group_of, facts.ids)
    return res


def _near_reason(centre_id: str, links: Links, link: int, threshold: float) -> str:
    s = float(links.sim[link])
    if links.signal[link] == "margin":
        return (f"near-duplicate of {centre_id}: cosine {s:.3f} < {threshold:g}, but one is "
                "the other's closest picture by a clear margin over the next (a lone match: "
                "crops and rotations look like this; look-alikes come in crowds)")
    if links.signal[link] == "geometry":
        return (f"near-duplicate of {centre_id}: cosine {s:.3f} < {threshold:g}, confirmed "
                "by local features (one similarity transform maps their keypoints onto each "
                "other: a crop, rotation or rescale)")
    if links.signal[link] == "rotation":
        return (f"near-duplicate of {centre_id}: cosine {s:.3f} < {threshold:g}, a rotated "
                f"copy (its centre turned back matches within {int(links.bits[link])} of 63 "
                "bits; with local features on, they confirm it too)")
    if links.signal[link] == "hash":
        return (f"near-duplicate of {centre_id}: cosine {s:.3f} < {threshold:g}, confirmed "
                f"by the perceptual hash ({int(links.bits[link])} of 63 bits differ)")
    return f"near-duplicate of {centre_id} (cosine {s:.3f} >= {threshold:g})"


def _similarity_to_kept(vectors: np.ndarray, groups: list[list[int]], kept_of: dict[int, int],
                        power: float) -> dict[int, float]:
    """Cosine (of the dedupe descriptors) of every group member to its group's kept image."""
    out: dict[int, float] = {}
    if not groups:
        return out
    rows = np.unique(np.concatenate([np.asarray(m) for m in groups]))
    x = as_unit_vectors(np.asarray(vectors)[rows], power)
    where = {int(r): k for k, r in enumerate(rows.tolist())}
    for m in groups:
        kv = x[where[kept_of[id(m)]]]
        for k in m:
            out[k] = float(x[where[k]] @ kv)
    return out


#: How far below the threshold a pair counts as a near miss (reported, not grouped).
NEAR_MISS_BAND = 0.05
MAX_NEAR_MISSES = 200


def _near_misses(pairs: Pairs, threshold: float, group_of: np.ndarray,
                 ids: np.ndarray) -> pd.DataFrame:
    """Pairs just below the threshold whose images ended up in different groups."""
    import pandas as pd

    sel = (pairs.sim < threshold) & (pairs.sim >= threshold - NEAR_MISS_BAND) \
        & (group_of[pairs.i] != group_of[pairs.j])
    idx = np.flatnonzero(sel)
    idx = idx[np.argsort(-pairs.sim[idx], kind="stable")][:MAX_NEAR_MISSES]
    return pd.DataFrame({"id_a": ids[pairs.i[idx]].astype(str), "id_b": ids[pairs.j[idx]]
                         .astype(str), "similarity": np.round(pairs.sim[idx], 4)})


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
    """Pairs found, precision proxies and group counts across thresholds (plus the
    calibrated one, in ``attrs["calibrated"]``) from one search.

    ``facts`` are the keyword arguments of :func:`find_duplicates` (sha256, widths, labels,
    hashes…). Per threshold: ``pairs`` at or above it; ``hash_agrees``, the share of them
    the perceptual hash also calls copies (NaN without hashes); ``pair_precision_proxy``,
    the share whose two images end up in one group. Both fall where look-alikes start to
    pass the threshold, which group counts alone do not show.
    """
    import pandas as pd

    from embedsearch.dedupe.views import hash_distance

    exact_limit = facts.pop("exact_limit", EXACT_LIMIT)
    power = facts.pop("power", DEFAULT_POWER)
    ts = sorted({float(t) for t in thresholds})
    if not ts:
        raise EmbedsearchError("no thresholds to sweep")
    hashes = facts.get("hashes")
    t0 = time.perf_counter()
    pairs = candidate_pairs(vectors, min(ts[0], HASH_FLOOR), exact_limit=exact_limit,
                            power=power)
    search_s = time.perf_counter() - t0
    calibrated = find_duplicates(vectors, ids, threshold=None, pairs=pairs, **facts).threshold
    plain = getattr(hashes, "hash", hashes)
    agree = (hash_distance(np.asarray(plain, np.uint64)[pairs.i],
                           np.asarray(plain, np.uint64)[pairs.j]) <= HASH_MAX_BITS
             if hashes is not None else None)
    rows = []
    for t in sorted({*ts, calibrated}):
        res = find_duplicates(vectors, ids, threshold=t, pairs=pairs, **facts)
        s = res.summary()
        at = pairs.sim >= t
        together = res.group_of[pairs.i[at]] == res.group_of[pairs.j[at]]
        rows.append({"threshold": t, "pairs": int(at.sum()),
                     "hash_agrees": float(agree[at].mean()) if agree is not None and at.any()
                     else float("nan"),
                     "pair_precision_proxy": float(together.mean()) if at.any() else 1.0,
                     "groups": s["groups"], "removed": s["removed"],
                     "removed_exact": s["removed_exact"], "removed_near": s["removed_near"],
                     "removed_by_hash": int(((res.groups["signal"] == "hash")
                                             & ~res.groups["kept"]).sum()),
                     "largest_group": s["largest_group"],
                     "label_conflict_groups": s["label_conflict_groups"]})
    out = pd.DataFrame(rows)
    out.attrs["search_seconds"] = search_s
    out.attrs["calibrated"] = calibrated
    return out


def groups_as_records(result: DedupeResult) -> list[dict[str, Any]]:
    """One dict per group: members (id, similarity to the kept image, how it was linked,
    reason), the kept image and why, the centre; what ``dedupe --json`` prints."""
    out = []
    for gid, rows in result.groups.groupby("group", sort=True):
        kept = rows[rows["kept"]].iloc[0]
        out.append({
            "group": int(gid), "kept": kept["id"], "centre": kept["centre_id"],
            "size": len(rows), "min_similarity": float(rows["similarity"].min()),
            "members": [{"id": r.id, "kept": bool(r.kept), "match": r.match,
                         "similarity": float(r.similarity), "signal": r.signal or None,
                         "hash_bits": None if pd_isna(r.hash_bits) else int(r.hash_bits),
                         "reason": r.reason} for r in rows.itertuples()],
        })
    return out


def pd_isna(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


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

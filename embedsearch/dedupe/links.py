"""Which candidate pairs are duplicates (*links*), and the star groups they form.

A pair is linked by its embeddings at or above the threshold; below it, down to
:data:`HASH_FLOOR`, the perceptual hashes of :mod:`embedsearch.dedupe.views` may confirm
it. :func:`centre_groups` turns links into stars around the most connected image (see
:mod:`embedsearch.dedupe.group`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from embedsearch.dedupe.search import Pairs
    from embedsearch.dedupe.views import ImageViews

#: Lowest embedding cosine at which the hash (second signal) may confirm a pair. Greyscale
#: copies of graphic images fall to 0.64–0.78 (benchmarks/results/dedupe_generalisation.md).
HASH_FLOOR = 0.70
#: Most differing hash bits (of 63) for a confirmed pair. Planted greyscale, half, tiny,
#: squashed, mirrored and JPEG copies: ≤ 6 for 98 %+; the nearest distinct image of 99 % of
#: real photos: ≥ 7 bits.
HASH_MAX_BITS = 6
#: Most differing bits between a rotated copy's centre turned back and its original's
#: centre. Planted 30° rotations of real photos: 87 % of band pairs within 4 bits, 0 of
#: 1,910 distinct band pairs; synthetic posters: 84 %, 15 of 51,902 (dedupe_generalisation).
ROTATION_MAX_BITS = 4

@dataclass
class Links:
    """Accepted pairs (i < j): embedding cosine, hash distance (-1: not hashed) and which
    signal accepted them ("embedding", "hash", "rotation" or "margin")."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray
    bits: np.ndarray
    signal: np.ndarray


def link_pairs(pairs: Pairs, threshold: float, views: ImageViews | None
               ) -> tuple[Links, np.ndarray, np.ndarray]:
    """(accepted links, hash distance per searched pair, confirmed-by-a-view mask per pair).

    A pair at or above the threshold is linked by its embeddings. Below it, down to
    :data:`HASH_FLOOR`, the hashes may confirm it: within :data:`HASH_MAX_BITS` bits
    (mirror-invariant), or, when exactly one of the two has the filled corners of a
    rotated copy, its centre turned back by one of the tried angles within
    :data:`ROTATION_MAX_BITS` bits of the other's centre (stricter: 18 angles are tried).
    """
    from embedsearch.dedupe.views import hash_distance

    n_pairs = len(pairs)
    bits = np.full(n_pairs, -1, np.int64)
    signal = np.full(n_pairs, "", object)
    signal[pairs.sim >= threshold] = "embedding"
    if views is not None:
        band = (pairs.sim >= HASH_FLOOR) & (pairs.sim < threshold)
        bits = hash_distance(views.hash[pairs.i], views.hash[pairs.j])
        signal[band & (bits <= HASH_MAX_BITS)] = "hash"
        turned = views.rotated[:, 0] != 0
        one = band & (signal == "") & (turned[pairs.i] != turned[pairs.j])
        k = np.flatnonzero(one)
        if len(k):
            first = turned[pairs.i[k]]
            rot = np.where(first, pairs.i[k], pairs.j[k])
            other = np.where(first, pairs.j[k], pairs.i[k])
            d = hash_distance(views.rotated[rot], views.centre[other][:, None]).min(axis=1)
            ok = d <= ROTATION_MAX_BITS
            signal[k[ok]] = "rotation"
            bits[k[ok]] = d[ok]
    confirmed = (signal == "hash") | (signal == "rotation")
    ok = signal != ""
    links = Links(pairs.i[ok], pairs.j[ok], pairs.sim[ok], bits[ok], signal[ok])
    return links, bits, confirmed


def centre_groups(n: int, links: Links, active: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """centre[k] (k itself for centres and lone items, -1 for inactive) and the index of the
    link joining k to its centre (-1 for none). See the module docstring."""
    keep = active[links.i] & active[links.j]
    idx = np.flatnonzero(keep)
    a = np.concatenate([links.i[idx], links.j[idx]])
    b = np.concatenate([links.j[idx], links.i[idx]])
    e = np.concatenate([idx, idx])
    s = links.sim[e]
    order = np.lexsort((-s, a))
    a, b, e = a[order], b[order], e[order]
    starts = np.searchsorted(a, np.arange(n + 1))
    degree = starts[1:] - starts[:-1]
    strength = np.bincount(a, weights=links.sim[e], minlength=n)
    centre = np.where(active, np.arange(n), -1)
    via = np.full(n, -1, np.int64)
    is_centre = np.zeros(n, bool)
    grouped = ~active | (degree == 0)
    for k in np.lexsort((np.arange(n), -strength, -degree)):
        if grouped[k]:
            continue
        nb, ne = b[starts[k]:starts[k + 1]], e[starts[k]:starts[k + 1]]
        at_centre = np.flatnonzero(is_centre[nb])
        if len(at_centre):  # neighbours are sorted by similarity: the first is the closest
            centre[k], via[k] = nb[at_centre[0]], ne[at_centre[0]]
            grouped[k] = True
            continue
        is_centre[k] = grouped[k] = True
        free = ~grouped[nb]
        centre[nb[free]], via[nb[free]] = k, ne[free]
        grouped[nb[free]] = True
    return centre, via


#: How far below the threshold local features (:mod:`embedsearch.dedupe.geometry`) may
#: confirm a pair.
GEOMETRY_BAND = 0.10
#: Most band pairs per image checked by local features: an image's most similar ones.
GEOMETRY_PER_IMAGE = 3


def geometry_candidates(n: int, pairs: Pairs, linked: np.ndarray, threshold: float,
                        same_file: np.ndarray | None = None,
                        band: float = GEOMETRY_BAND,
                        per_image: int = GEOMETRY_PER_IMAGE) -> np.ndarray:
    """Indices of the searched pairs that local features should check: below the threshold
    by at most ``band``, not linked (``linked`` marks linked pairs), not two files with the
    same bytes (``same_file``: item → its exact-copy representative), and among the
    ``per_image`` most similar such pairs of at least one of the two images (so the cost
    grows with the collection, not with how crowded it is).

    Pairs whose images are already joined through other links are checked too: a rotated
    copy linked only to its original's mirrored copy would otherwise form a group of its
    own, since groups are stars around a centre (:func:`centre_groups`)."""
    same = np.zeros(len(pairs), bool) if same_file is None else \
        np.asarray(same_file)[pairs.i] == np.asarray(same_file)[pairs.j]
    cand = np.flatnonzero((pairs.sim >= threshold - band) & (pairs.sim < threshold)
                          & ~linked & ~same)
    if not len(cand) or per_image <= 0:
        return cand
    a = np.concatenate([pairs.i[cand], pairs.j[cand]])
    s = np.concatenate([pairs.sim[cand], pairs.sim[cand]])
    e = np.concatenate([cand, cand])
    order = np.lexsort((e, -s, a))
    a, e = a[order], e[order]
    return np.unique(e[rank_in_runs(a) < per_image])


def rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """Each entry's position within its run of equal ``keys`` (sorted): 0 for the first
    of an image's pairs, 1 for the next... — for keeping each image's best few."""
    return np.arange(len(keys)) - np.searchsorted(keys, keys, side="left")


#: Rotated copies (filled corners) are also proposed to the local-feature check wherever
#: their turned-back centre matches another image's centre within ROTATION_MAX_BITS, not
#: only in the band: on graphics a 30° turn drops the cosine to its original to 0.5–0.7
#: (synthetic posters: the original ranked 150th–1,700th). At most this many per copy,
#: closest first: 8, so that a copy reaches its group's centre, which may be another copy
#: of its original (groups are stars). Planted posters (posters0): 146 of 150 rotated
#: copies get their original's group proposed; rot30 copies missed 32 → 13 (3 per copy)
#: → 7 (8 per copy).
ROTATION_PROPOSALS = 8
#: Above this many (rotated copies × hashed images) comparisons, no proposals are made
#: (the band still checks rotated copies the embedding keeps close).
ROTATION_PROPOSALS_MAX_WORK = 50_000_000


def rotation_proposals(views: ImageViews, per_copy: int = ROTATION_PROPOSALS
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of a rotated copy and an image whose centre its turned-back centre
    matches within :data:`ROTATION_MAX_BITS`, at most ``per_copy`` per copy; empty when
    the comparisons would exceed :data:`ROTATION_PROPOSALS_MAX_WORK`."""
    from embedsearch.dedupe.views import NO_HASH, hash_distance

    turned = np.flatnonzero(views.rotated[:, 0] != NO_HASH)
    others = np.flatnonzero((views.centre != NO_HASH) & (views.rotated[:, 0] == NO_HASH))
    empty = np.zeros(0, np.int64)
    if not len(turned) or not len(others) \
            or len(turned) * len(others) > ROTATION_PROPOSALS_MAX_WORK:
        return empty, empty
    block = max(1, 1_000_000 // len(others))
    out_a, out_b = [], []
    for start in range(0, len(turned), block):
        t = turned[start:start + block]
        d = np.full((len(t), len(others)), 64, np.int64)
        for angle in range(views.rotated.shape[1]):
            d = np.minimum(d, hash_distance(views.rotated[t, angle][:, None],
                                            views.centre[others][None, :]))
        rows, cols = np.nonzero(d <= ROTATION_MAX_BITS)
        order = np.lexsort((d[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        keep = rank_in_runs(rows) < per_copy
        out_a.append(t[rows[keep]])
        out_b.append(others[cols[keep]])
    a, b = np.concatenate(out_a), np.concatenate(out_b)
    return np.minimum(a, b), np.maximum(a, b)

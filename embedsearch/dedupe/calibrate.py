"""A near-duplicate threshold calibrated on the collection itself.

What decides precision is how similar an image's most similar *distinct* image is: product
photos on white (clothing-small) have look-alikes at 0.88–0.91, while posters or covers
rarely pass 0.81. A fixed threshold is either too strict for the second kind (recall lost)
or too loose for the first (look-alikes grouped). So the threshold is read off the
collection's own *look-alike background*:

1. Confirmed duplicates are set aside first: images linked by the second signal (hashes
   within :data:`~embedsearch.dedupe.links.HASH_MAX_BITS` bits), by an embedding cosine of
   at least :data:`CONFIRMED`, or by the same sha256 form components; similarity to a
   member of one's own component says nothing about look-alikes.
2. For each image, the background is its similarity to the :data:`RANK`-th most similar
   *other component* (each counted once, by its most similar member). The first one or
   two may still be unconfirmed copies (a crop, a rotation), which the hash cannot
   confirm; by the third, nearly every image is compared with distinct pictures. Using
   the third instead of the first costs an offset, measured on the same collection as the
   median of (1st − 3rd) over the half of the images whose first outside neighbour is
   least similar (those have no unconfirmed copy).
3. The threshold is the :data:`QUANTILE` quantile of (background + offset), plus
   :data:`MARGIN`, clamped to [:data:`LOWEST`, :data:`HIGHEST`]: at most 1 image in 200
   has a distinct look-alike above it.

The evidence (quantiles, offset, counts) is returned with the value so the CLI can print
it; ``--dup-threshold`` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Embedding cosine at which a pair counts as a confirmed duplicate for step 1.
CONFIRMED = 0.97
#: Which outside neighbour is the background (see the module docstring).
RANK = 3
QUANTILE = 0.995
#: Added to the background quantile. 0.02 rather than 0.01: a look-alike that passes joins
#: a whole group (8 false pairs for a group of 8), so precision is bought here; on the
#: tuning sets 0.01 → 0.02 cost no recall (dedupe_generalisation.md).
MARGIN = 0.02
#: Bounds: below 0.80 a cosine no longer means "the same picture" for any encoder tried;
#: above 0.95 JPEG re-encodes and resizes start to be missed (dedupe_threshold.md).
LOWEST = 0.80
HIGHEST = 0.95


@dataclass
class Calibration:
    """The threshold chosen and why."""

    threshold: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        e = self.evidence
        if not e:
            return f"{self.threshold:.3f}"
        return (f"{self.threshold:.3f}, calibrated on {e['images']:,} images: "
                f"look-alike background (rank-{RANK} outside neighbour + offset "
                f"{e['offset']:.3f}) median {e['background_median']:.3f}, "
                f"p{QUANTILE * 100:g} {e['background_quantile']:.3f}; "
                f"{e['confirmed_pairs']:,} confirmed duplicate pairs, their cosine median "
                f"{e['confirmed_median']:.3f}"
                + (f" (clamped to [{LOWEST}, {HIGHEST}])" if e["clamped"] else ""))


def components(n: int, i: np.ndarray, j: np.ndarray, rep: np.ndarray | None = None
               ) -> np.ndarray:
    """Connected component of each of ``n`` items over pairs (i, j) and exact copies."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rep = np.arange(n) if rep is None else np.asarray(rep)
    ci = np.concatenate([i, np.arange(n)])
    cj = np.concatenate([j, rep])
    graph = coo_matrix((np.ones(len(ci), np.int8), (ci, cj)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def outside_ranking(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray, comp: np.ndarray,
                    k: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image, its similarity to its ``k`` most similar *other components* (each counted
    once, by its most similar member; ``floor`` where fewer were found) and that member
    (-1 where none): shape (n, k) each."""
    outside = comp[i] != comp[j]
    a = np.concatenate([i[outside], j[outside]])
    b = np.concatenate([j[outside], i[outside]])
    other = comp[b]
    s = np.concatenate([sim[outside], sim[outside]])
    order = np.lexsort((-s, other, a))
    a, b, other, s = a[order], b[order], other[order], s[order]
    first_of = np.ones(len(a), bool)
    first_of[1:] = (a[1:] != a[:-1]) | (other[1:] != other[:-1])
    a, b, s = a[first_of], b[first_of], s[first_of]
    order = np.lexsort((-s, a))
    a, b, s = a[order], b[order], s[order]
    starts = np.searchsorted(a, np.arange(n + 1))
    top = np.full((n, k), floor, np.float64)
    member = np.full((n, k), -1, np.int64)
    for r in range(k):
        has = starts[1:] - starts[:-1] > r
        top[has, r] = s[starts[:-1][has] + r]
        member[has, r] = b[starts[:-1][has] + r]
    return top, member


def _typical(first: np.ndarray) -> np.ndarray:
    """The half of the images whose most similar outside image is least similar: those
    have no unconfirmed copy, so their neighbours show the look-alike background."""
    return first <= np.quantile(first, 0.5) if len(first) else np.zeros(0, bool)


def calibrate(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray, confirmed: np.ndarray,
              floor: float, same_file: np.ndarray | None = None) -> Calibration:
    """The threshold for ``n`` images from their pairs (``i``, ``j``, ``sim``) searched down
    to ``floor``; ``confirmed[k]`` marks pairs the second signal confirmed; ``same_file``
    (item → its exact-copy representative) joins byte-identical files."""
    strong = confirmed | (sim >= CONFIRMED)
    comp = components(n, i[strong], j[strong], same_file)
    top, _ = outside_ranking(n, i, j, sim, comp, RANK, floor)
    background = top[:, RANK - 1]
    first = top[:, 0]
    typical = _typical(first)
    offset = float(np.median(first[typical] - background[typical])) if typical.any() else 0.0
    if n:
        q = float(np.quantile(background + offset, QUANTILE))
        raw = q + MARGIN
    else:
        q = raw = LOWEST
    t = float(np.clip(raw, LOWEST, HIGHEST))
    conf_sim = sim[strong]
    return Calibration(round(t, 3), {
        "images": n, "offset": round(offset, 4),
        "background_median": round(float(np.median(background + offset)) if n else 0.0, 4),
        "background_quantile": round(q, 4), "quantile": QUANTILE, "margin": MARGIN,
        "rank": RANK, "confirmed_pairs": int(strong.sum()),
        "confirmed_median": round(float(np.median(conf_sim)), 4) if len(conf_sim) else 0.0,
        "raw": round(raw, 4), "clamped": bool(raw < LOWEST or raw > HIGHEST),
        "floor": floor,
    })


#: How much closer a lone match's picture must be than the image's next most similar
#: picture. Not calibrated per collection: images with an unconfirmed copy (a rotation, a
#: crop) are exactly the ones with large gaps, so a collection's own gap distribution
#: cannot tell look-alikes from copies. Measured with true labels on the tuning sets (real
#: clothing photos, synthetic posters): distinct images' gap p99 0.050 / 0.019, max 0.089
#: / 0.028. 0.08 keeps pairwise precision ≥ 0.99 on clothing photos (0.06 fell to 0.975 on
#: a held-out clothing set); the recall it costs on the tuning sets: 0.4–1.5 points.
LONE_GAP = 0.08


def margin_links(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray, linked: np.ndarray,
                 threshold: float, floor: float, same_file: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Pairs below the threshold accepted because one image stands out: the image's most
    similar other component is clearly closer than its second (by more than look-alikes
    are, :data:`LONE_GAP`). That is what a crop or a rotation of one picture looks
    like among distinct pictures, and what neither the threshold nor the hash catches.

    ``linked`` marks the pairs already accepted. Returns (image, partner, cosine, evidence).
    """
    comp = components(n, i[linked], j[linked], same_file)
    top, member = outside_ranking(n, i, j, sim, comp, 2, floor)
    gap = top[:, 0] - top[:, 1]
    # Mutual: the image must also be among its partner's two closest other components (an
    # original may have two unconfirmed copies). A big group's best member is close to
    # many images by chance; without this, look-alikes joined big groups.
    partner = np.maximum(member[:, 0], 0)
    mutual = member[:, 0] >= 0
    back = member[partner]  # the partner's two closest other components, by member
    mutual &= ((back >= 0) & (comp[np.maximum(back, 0)] == comp[:, None])).any(axis=1)
    # Not below LOWEST: in a sparse collection (posters) an image's closest picture at
    # 0.75 with nothing else above 0.7 "stands out" without being a copy.
    ok = (member[:, 0] >= 0) & (top[:, 0] < threshold) & (top[:, 0] >= max(floor, LOWEST)) \
        & (gap >= LONE_GAP) & mutual
    a = np.flatnonzero(ok)
    return a, member[a, 0], top[a, 0].astype(np.float32), {"gap_needed": LONE_GAP,
                                                           "links": len(a)}

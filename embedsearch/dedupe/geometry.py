"""The third signal: local features and a geometric check, for crops and rotated copies.

A 20 % crop or a 30° rotation moves every coefficient of a perceptual hash, and on a
collection of look-alikes (synthetic posters) its embedding cosine (~0.89) sits below the
calibrated threshold (~0.94) while distinct look-alikes reach 0.93. What a crop or a
rotation keeps is *where things are relative to each other*: the same corners, letters and
edges, moved by one similarity transform (scale, rotation, shift). Distinct look-alikes
share textures and shapes, never one consistent transform for hundreds of details.

So a pair in a band below the threshold is accepted when:

1. ORB keypoints (OpenCV; up to :data:`FEATURES` per image, on greyscale scaled so its
   longest side is :data:`SIDE` px) match by Lowe's ratio test (:data:`RATIO`);
2. RANSAC fits one similarity transform (``cv2.estimateAffinePartial2D``) with at least
   :data:`MIN_INLIERS` inliers that are at least :data:`MIN_INLIER_SHARE` of the matches;
3. the transform is plausible: scale within :data:`SCALE_RANGE` (both images are scaled to
   one side first, so a 20 % crop is 1.25), and the smaller image, mapped into the other,
   lies at least :data:`MIN_OVERLAP` inside it (a crop lies wholly inside its original);
4. mapped onto each other by that transform, the two images' fine detail agrees (the
   correlation of their high-pass thumbnails is at least :data:`MIN_AGREEMENT`): keypoints
   also match what distinct images share — a watermark, a font, a background — and only
   the pixels around them tell a copy from a different picture behind the same overlay.

Measured on planted copies and on pairs of distinct images that the embedding puts close
(benchmarks/results/dedupe_generalisation.md): see the constants. Only pairs in the band
are checked, at most :data:`~embedsearch.dedupe.links.GEOMETRY_PER_IMAGE` per image, so
the cost is bounded by the collection's size: ~3 ms per image decoded for features, ~1 ms
per pair matched.

Pairs the embedding ranks far (a 20 % crop of a look-alike graphic: cosine 0.62–0.88 to
its original, which ranks up to 1,142nd among its neighbours) are proposed by descriptor
voting (:func:`vote_proposals`): features for every image, a binary index over them, each
image's two most voted pairs checked. Planted posters (posters0): 138 of 150 crops get
their group proposed; held-out posters5 crop recall 0.78 → 0.92 and F1 0.959 → 0.983 with
voting alone (benchmarks/results/dedupe_generalisation.md has today's figures).

OpenCV (``opencv-python-headless``) is imported only when a pair is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: Longest side (px) images are scaled to before keypoints are found.
SIDE = 256
#: Most ORB keypoints per image.
FEATURES = 500
#: Lowe's ratio test: best match distance below this share of the second best.
RATIO = 0.8
#: Least RANSAC inliers of one similarity transform.
MIN_INLIERS = 20
#: Least share of the ratio-test matches that are inliers.
MIN_INLIER_SHARE = 0.5
#: Scale of the transform between the two (each scaled to SIDE): 1.25 for a 20 % crop.
SCALE_RANGE = (0.5, 2.0)
#: Least share of the smaller image that, mapped by the transform, lies inside the other.
MIN_OVERLAP = 0.5
#: RANSAC reprojection tolerance, px at SIDE.
REPROJECTION_PX = 4.0
#: Once the transform is found, one image is mapped onto the other and their fine detail
#: must agree: the correlation of the high-pass (grey minus its Gaussian blur, sigma
#: :data:`DETAIL_SIGMA` px) of both, at :data:`THUMB` px on the longest side, over the
#: overlap. Keypoints alone also match what distinct images *share*: a stock watermark or
#: the same title font (planted posters: the watermarked copies of two different posters)
#: or the same bedsheet behind two garments. On 1,375 links of six planted sets
#: (dedupe_generalisation.md) true copies had a median of 0.66–0.86 and 1 % below 0.2;
#: 19 of the 24 wrong links fell below it.
MIN_AGREEMENT = 0.2
#: A flat graphic has few corners: a 30° turn of a 182×268 poster with 12–80 keypoints
#: kept 7–19 inliers of the right transform (scale 1.0, angle 30°). From
#: :data:`FEW_INLIERS` up to :data:`MIN_INLIERS` inliers a pair is accepted only with this
#: much stronger detail agreement (distinct pairs that passed the keypoint criteria
#: reached 0.38 at most; true copies' median 0.66–0.86).
FEW_INLIERS = 10
FEW_INLIERS_AGREEMENT = 0.5
THUMB = 64
DETAIL_SIGMA = 1.5


@dataclass
class Features:
    """Keypoints of one image: its size at SIDE (w, h), points (n, 2), ORB descriptors,
    and its greyscale at :data:`THUMB` px on the longest side (float32)."""

    size: tuple[int, int]
    points: np.ndarray
    descriptors: np.ndarray | None
    thumb: np.ndarray

    @classmethod
    def none(cls) -> Features:
        return cls((0, 0), np.zeros((0, 2), np.float32), None, np.zeros((0, 0), np.float32))


@dataclass
class Match:
    """What the geometric check found for one pair."""

    matches: int
    inliers: int
    scale: float
    angle: float
    overlap: float
    #: Correlation of the two images' fine detail once aligned (NaN: not measured, the
    #: geometric criteria failed first).
    agreement: float = float("nan")

    @property
    def geometric(self) -> bool:
        """The keypoints fit one similarity transform of plausible scale and overlap (with
        at least :data:`FEW_INLIERS`: fewer are judged by :attr:`accepted`)."""
        return (self.inliers >= FEW_INLIERS
                and self.inliers >= MIN_INLIER_SHARE * self.matches
                and SCALE_RANGE[0] <= self.scale <= SCALE_RANGE[1]
                and self.overlap >= MIN_OVERLAP)

    @property
    def accepted(self) -> bool:
        if not self.geometric:
            return False
        if self.inliers >= MIN_INLIERS:
            return self.agreement >= MIN_AGREEMENT
        return self.agreement >= FEW_INLIERS_AGREEMENT


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:  # declared in pyproject; a broken install says how to fix
        from embedsearch.errors import EmbedsearchError

        raise EmbedsearchError(
            f"the local-feature check needs OpenCV: {exc}",
            hint="pip install opencv-python-headless") from exc
    return cv2


def image_features(image: Image.Image) -> Features:
    """ORB keypoints of a decoded image, on greyscale scaled to :data:`SIDE`."""
    from PIL import Image as PILImage

    cv2 = _cv2()
    w, h = image.size
    s = SIDE / max(w, h, 1)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    grey = np.asarray(image.convert("L").resize(size, PILImage.BILINEAR))
    orb = cv2.ORB_create(nfeatures=FEATURES, fastThreshold=10, edgeThreshold=15,
                         patchSize=15)
    keypoints, descriptors = orb.detectAndCompute(grey, None)
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    k = THUMB / SIDE
    thumb = cv2.resize(grey, (max(1, round(size[0] * k)), max(1, round(size[1] * k))),
                       interpolation=cv2.INTER_AREA).astype(np.float32)
    return Features(size, points, descriptors, thumb)


def match(a: Features, b: Features) -> Match:
    """Ratio-test matches from ``a`` to ``b`` and the similarity transform RANSAC fits."""
    none = Match(0, 0, 0.0, 0.0, 0.0)
    if a.descriptors is None or b.descriptors is None or min(len(a.points),
                                                             len(b.points)) < 2:
        return none
    cv2 = _cv2()
    query, target = _ratio_matches(a.descriptors, b.descriptors)
    if len(query) < 3:
        return Match(len(query), 0, 0.0, 0.0, 0.0)
    src, dst = a.points[query], b.points[target]
    # seeded: RANSAC draws at random, and a verdict must not change between runs
    cv2.setRNGSeed(0)
    transform, inliers = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX, maxIters=2000,
        confidence=0.99)
    if transform is None:
        return Match(len(query), 0, 0.0, 0.0, 0.0)
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    angle = float(np.degrees(np.arctan2(transform[1, 0], transform[0, 0])))
    found = Match(len(query), int(inliers.sum()), scale, angle,
                  _overlap(transform, a.size, b.size))
    if found.geometric:
        found.agreement = _agreement(transform, a.thumb, b.thumb)
    return found


def _ratio_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``a``, their nearest rows of ``b``) that pass Lowe's ratio test (Hamming
    distance to the nearest below :data:`RATIO` of the second nearest).

    faiss's binary flat index gives the same two nearest neighbours as OpenCV's
    ``BFMatcher(NORM_HAMMING).knnMatch(k=2)`` (identical matches on all 3,392 pairs of a
    probe on cloth-held2) in a quarter of the CPU time: 0.3 against 1.25 ms per pair of
    500-keypoint images, where matching was most of the local features' cost."""
    import faiss

    if len(b) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = faiss.IndexBinaryFlat(b.shape[1] * 8)
    index.add(np.ascontiguousarray(b, np.uint8))
    dist, nearest = index.search(np.ascontiguousarray(a, np.uint8), 2)
    ok = (nearest[:, 1] >= 0) & (dist[:, 0] < RATIO * dist[:, 1])
    return np.flatnonzero(ok), nearest[ok, 0].astype(np.int64)


def _agreement(transform: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the high-pass of thumbnail ``a`` mapped onto ``b`` by ``transform``
    (2×3, in SIDE px) and of ``b``, over the pixels both cover (one pixel in from the
    edge of ``a``'s footprint, where interpolation mixes in the fill)."""
    cv2 = _cv2()
    if not a.size or not b.size:
        return 0.0
    m = transform.astype(np.float32).copy()
    m[:, 2] *= THUMB / SIDE  # same rotation and scale; the shift in thumbnail px
    h, w = b.shape
    mapped = cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.ones_like(a, np.uint8), m, (w, h), flags=cv2.INTER_NEAREST)
    inside = cv2.erode(inside, np.ones((3, 3), np.uint8)) > 0
    if inside.sum() < 16:
        return 0.0

    def detail(x: np.ndarray) -> np.ndarray:
        d = (x - cv2.GaussianBlur(x, (0, 0), DETAIL_SIGMA))[inside]
        return d - d.mean()

    x, y = detail(mapped), detail(b)
    norm = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / norm) if norm > 0 else 0.0


def _overlap(transform: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """Share of the smaller of the two images that lies inside the other once ``a`` is
    mapped onto ``b`` by ``transform`` (2×3)."""
    cv2 = _cv2()

    def rect(w: int, h: int) -> np.ndarray:
        return np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)

    mapped = rect(*size_a) @ transform[:, :2].T.astype(np.float32) + transform[:, 2]
    area_a = abs(float(cv2.contourArea(mapped.astype(np.float32))))
    area_b = float(size_b[0] * size_b[1])
    if area_a <= 0 or area_b <= 0:
        return 0.0
    inter, _ = cv2.intersectConvexConvex(mapped.astype(np.float32), rect(*size_b))
    return float(inter) / min(area_a, area_b)


def file_features(paths: Sequence[Path]) -> list[Features]:
    """Features of image files (decoded at about :data:`SIDE`); empty where undecodable."""
    from concurrent.futures import ThreadPoolExecutor

    from embedsearch.data.images import LoadFailure, load_image
    from embedsearch.embed import default_workers

    def one(path: Path) -> Features:
        loaded = load_image(Path(path), target_size=SIDE)
        if isinstance(loaded, LoadFailure):
            return Features.none()
        return image_features(loaded.image)

    _cv2().setNumThreads(1)  # the thread pool runs images in parallel already
    with ThreadPoolExecutor(default_workers()) as pool:
        return list(pool.map(one, paths))


#: Descriptor voting (:func:`vote_proposals`): most of an image's keypoints that vote
#: (its strongest), and the Hamming distance (of 256 bits) under which two descriptors of
#: different images count as one vote for their pair.
VOTE_DESCRIPTORS = 150
VOTE_MAX_BITS = 48
#: Least votes for a pair to be proposed, and most proposals per image (most votes first).
MIN_VOTES = 8
VOTE_PER_IMAGE = 2
#: The binary inverted-file index (faiss ``IndexBinaryIVF``): at most this many lists
#: (about the square root of the descriptors), this many visited per look-up, trained on
#: 40 descriptors per list. Exhaustive search would cost (descriptors)²: minutes at 2,000
#: images.
VOTE_LISTS = 1024
VOTE_PROBES = 1


def vote_proposals(features: Sequence[Features], per_image: int = VOTE_PER_IMAGE,
                   min_votes: int = MIN_VOTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j, votes) of images that share local descriptors, whatever their
    embeddings say: each image's :data:`VOTE_DESCRIPTORS` strongest ORB descriptors look up
    their nearest descriptor of another image (faiss binary index), within
    :data:`VOTE_MAX_BITS` bits; a pair gets one vote per such match; each image proposes
    its ``per_image`` most voted pairs with at least ``min_votes``.

    A 20 % crop of a graphic keeps most of its original's corners and letters, so it votes
    for its original even where the embedding ranks it beyond a thousand look-alikes.
    Votes only *propose*: the geometric check (:func:`match`) decides."""
    import faiss

    from embedsearch.dedupe.links import rank_in_runs

    empty = np.zeros(0, np.int64)
    codes, owner = [], []
    for k, f in enumerate(features):
        if f.descriptors is None or not len(f.descriptors):
            continue
        d = f.descriptors[:VOTE_DESCRIPTORS]
        codes.append(d)
        owner.append(np.full(len(d), k, np.int64))
    if len(codes) < 2:
        return empty, empty, empty
    x = np.ascontiguousarray(np.concatenate(codes), np.uint8)
    who = np.concatenate(owner)
    bits = x.shape[1] * 8
    nlist = int(np.clip(np.sqrt(len(x)), 1, VOTE_LISTS))
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, nlist)
    rng = np.random.default_rng(0)  # seeded: the proposals must not change between runs
    index.train(x[rng.permutation(len(x))[:40 * nlist]])
    index.add(x)
    index.nprobe = VOTE_PROBES
    dist, nb = index.search(x, 4)  # itself, and up to 3 neighbours
    q = np.repeat(who, nb.shape[1])
    t = who[np.maximum(nb.ravel(), 0)]
    ok = (nb.ravel() >= 0) & (dist.ravel() <= VOTE_MAX_BITS) & (q != t)
    n = len(features)
    lo, hi = np.minimum(q[ok], t[ok]), np.maximum(q[ok], t[ok])
    key, votes = np.unique(lo * n + hi, return_counts=True)
    strong = votes >= min_votes
    key, votes = key[strong], votes[strong]
    a, b = key // n, key % n
    side = np.concatenate([a, b])
    e = np.concatenate([np.arange(len(key))] * 2)
    order = np.lexsort((e, -np.concatenate([votes, votes]), side))
    side, e = side[order], e[order]
    chosen = np.unique(e[rank_in_runs(side) < per_image])
    return a[chosen], b[chosen], votes[chosen]


class FileVerifier:
    """``verify(i, j)`` for :func:`embedsearch.dedupe.group.find_duplicates` over the files
    ``paths`` (one per item): True where the pair of items passes the geometric check.
    Features are computed once per item, on first need. :meth:`propose` adds pairs found
    by descriptor voting over every item (:func:`vote_proposals`)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.cache: dict[int, Features] = {}

    def _features(self, items: Sequence[int]) -> list[Features]:
        need = sorted(set(items) - self.cache.keys())
        for k, f in zip(need, file_features([self.paths[k] for k in need]), strict=True):
            self.cache[k] = f
        return [self.cache[k] for k in items]

    def __call__(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        import faiss

        i, j = np.asarray(i).tolist(), np.asarray(j).tolist()
        self._features([*i, *j])
        # one pair is a few hundred descriptors: OpenMP threads would only wait on each
        # other, so faiss matches them on this thread alone (restored afterwards)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return np.array([match(self.cache[a], self.cache[b]).accepted
                             for a, b in zip(i, j, strict=True)], bool)
        finally:
            faiss.omp_set_num_threads(threads)

    def propose(self) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (i < j) that share local descriptors (:func:`vote_proposals`)."""
        a, b, _ = vote_proposals(self._features(range(len(self.paths))))
        return a, b


def file_verifier(paths: Sequence[Path]) -> FileVerifier:
    """A :class:`FileVerifier` over the files ``paths``."""
    return FileVerifier(paths)

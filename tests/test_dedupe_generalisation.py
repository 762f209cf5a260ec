"""Dedupe beyond the collection it was tuned on: the calibrated threshold, the perceptual
hash that confirms borderline pairs, centre-based groups with a separate keep rule, and
the image formats that used to vanish (issue #13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from embedsearch import build_index, load_bundle
from embedsearch.dedupe import candidate_pairs, dedupe_bundle, find_duplicates
from embedsearch.dedupe.calibrate import HIGHEST, LOWEST, calibrate
from embedsearch.dedupe.links import HASH_MAX_BITS, ROTATION_MAX_BITS
from embedsearch.dedupe.views import (
    CACHE_FILE,
    centre_hash,
    dct_hash,
    filled_corners,
    hash_distance,
    rotation_hashes,
)
from tests.test_dedupe import TINY, kept_ids, picture, run_cli


def _hash(img: Image.Image) -> np.uint64:
    return np.uint64(dct_hash(img)[0])


def _posters_with_a_copy(tmp_path: Path, seed: int, n: int, kind: str, name: str
                         ) -> tuple[dict[str, Image.Image], list[Path]]:
    """``n`` synthetic posters and one planted ``kind`` copy of the first, saved as JPEGs:
    (name → image, paths in the same order)."""
    from benchmarks.plant_duplicates import make_variant, synthetic_poster

    rng = np.random.default_rng(seed)
    posters = [synthetic_poster(rng) for _ in range(n)]
    images = {f"poster{k}.jpg": p for k, p in enumerate(posters)}
    images[name] = make_variant(posters[0], kind, rng)[0]
    paths = []
    for file, img in images.items():
        img.save(tmp_path / file, quality=92)
        paths.append(tmp_path / file)
    return images, paths


def test_hash_ignores_colour_size_aspect_and_mirroring_but_not_content() -> None:
    img = picture(0, 200)
    h = _hash(img)
    copies = {"grey": ImageOps.grayscale(img), "quarter": img.resize((50, 50)),
              "squashed": img.resize((200, 130)), "mirror": ImageOps.mirror(img),
              "mirrored grey thumbnail": ImageOps.mirror(ImageOps.grayscale(img))
              .resize((60, 60))}
    for name, copy in copies.items():
        assert hash_distance(h, _hash(copy)) <= HASH_MAX_BITS, name
    others = [hash_distance(h, _hash(picture(k, 200))) for k in range(1, 30)]
    assert min(others) > HASH_MAX_BITS
    assert dct_hash(ImageOps.grayscale(img))[1] and not dct_hash(img)[1]  # greyscale flag


def test_rotated_copy_is_turned_back_and_matched_by_its_centre() -> None:
    img = picture(0, 240)
    turned = img.rotate(-30, Image.BICUBIC)  # black corners, like a scanned or tilted copy
    assert filled_corners(turned) and not filled_corners(img)
    back = np.array(rotation_hashes(turned), np.uint64)
    assert hash_distance(back, np.uint64(centre_hash(img))).min() <= ROTATION_MAX_BITS
    for k in range(1, 20):
        assert hash_distance(back, np.uint64(centre_hash(picture(k, 240)))).min() \
            > ROTATION_MAX_BITS


def _cloud(n: int, spread: float, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors around one direction: ``spread`` small → look-alikes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dim) + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_calibrated_threshold_rises_with_look_alikes() -> None:
    def threshold(x: np.ndarray) -> float:
        p = candidate_pairs(x, 0.7, power=1.0)
        return calibrate(len(x), p.i, p.j, p.sim, np.zeros(len(p), bool), 0.7).threshold

    sparse = _cloud(300, 3.0)  # distinct images: neighbours far below 0.8
    crowded = _cloud(300, 0.35)  # look-alikes: nearest neighbours around 0.9
    p = candidate_pairs(crowded, 0.7, power=1.0)
    nearest = np.full(len(crowded), -1.0)
    np.maximum.at(nearest, p.i, p.sim)
    np.maximum.at(nearest, p.j, p.sim)
    assert threshold(sparse) == LOWEST
    t = threshold(crowded)
    assert np.quantile(nearest, 0.99) < t <= HIGHEST
    # planted copies (cosine 0.995 to their original) do not drag it up: they are
    # confirmed duplicates, set aside before the background is read
    rng = np.random.default_rng(1)
    copies = crowded[:60] + 0.01 * rng.standard_normal((60, 64)).astype(np.float32)
    both = np.concatenate([crowded, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    assert abs(threshold(both) - t) < 0.01


def test_groups_centre_on_the_original_and_keep_the_most_pixels() -> None:
    # an original (centre) and two edits of it that are not near-duplicates of each other;
    # the larger edit is kept, yet both stay in the group through the centre
    c, si = 0.95, np.sqrt(1 - 0.95**2)
    x = np.array([[1, 0, 0], [c, si, 0], [c, -si, 0]], np.float32)  # b·c = 0.805
    t = 0.9
    res = find_duplicates(x, ["orig", "big", "small"], threshold=t, power=1.0,
                          widths=[100, 400, 50], heights=[100, 400, 50])
    g = res.groups.set_index("id")
    assert set(g.index) == {"orig", "big", "small"}
    assert kept_ids(res) == ["big"] and set(g["centre_id"]) == {"orig"}
    assert g.loc["orig", "reason"].startswith("centre of the group")
    assert g.loc["big", "reason"] == "kept: largest resolution (400×400)"


def test_keep_prefers_colour_then_fewer_recompressions_at_equal_size() -> None:
    x = np.tile(np.eye(4, dtype=np.float32)[:1], (3, 1))
    res = find_duplicates(x, ["grey", "q30", "q95"], widths=[50] * 3, heights=[50] * 3,
                          sizes=[3000, 900, 2500], grey=[True, False, False])
    assert kept_ids(res) == ["q95"]
    assert "least re-compressed" in res.groups.set_index("id").loc["q95", "reason"]


@pytest.fixture
def edited_folder(tmp_path: Path) -> Path:
    """Distinct pictures plus a greyscale and a tiny copy of one (the test encoder, unlike
    real ones, is not mirror-tolerant: mirrors are covered by the hash test), and Netpbm
    files / a mislabelled JPEG that used to vanish from scans."""
    root = tmp_path / "edited"
    root.mkdir()
    for k in range(10):
        picture(k).save(root / f"p{k}.jpg", quality=92)
    orig = picture(0)
    ImageOps.grayscale(orig).save(root / "p0_grey.jpg", quality=90)
    orig.resize((40, 40)).save(root / "p0_tiny.jpg", quality=90)
    picture(20).save(root / "netpbm.ppm")
    picture(21).convert("L").save(root / "grey.pgm")
    picture(22).convert("1").save(root / "bits.pbm")
    picture(23).save(root / "actually_a_jpeg.svg", "JPEG")  # the extension lies
    (root / "vector.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "notes.txt").write_text("not an image")
    return root


def test_edited_copies_found_and_netpbm_embedded(edited_folder: Path, tmp_path: Path) -> None:
    build_index(edited_folder, name="edited", model=TINY)
    bundle = load_bundle("edited")
    ids = set(bundle.items["id"])
    assert {"netpbm.ppm", "grey.pgm", "bits.pbm", "actually_a_jpeg.svg"} <= ids
    failures = bundle.failures.set_index("id")["reason"].to_dict()
    assert failures == {"vector.svg": "unsupported_format"}  # listed, never dropped silently
    res = dedupe_bundle(bundle)
    assert "calibration" in res.extra
    g = res.groups
    group0 = set(g.loc[g["group"] == g.loc[g["id"] == "p0.jpg", "group"].item(), "id"])
    assert group0 == {"p0.jpg", "p0_grey.jpg", "p0_tiny.jpg"}
    assert kept_ids(res) == ["p0.jpg"]  # colour, most pixels, least re-compressed
    assert len(g) == 3  # distinct pictures and the new formats stay alone
    assert (bundle.path / CACHE_FILE).exists()
    # the CLI prints the calibrated value and its evidence, and one JSON object per group
    text = run_cli("dedupe", "--index", "edited", "--out", str(tmp_path / "r"))
    assert f"threshold  {res.threshold:.3f}, calibrated on 16 images" in text
    lines = run_cli("dedupe", "--index", "edited", "--out", str(tmp_path / "r"),
                    "--json").splitlines()
    group = json.loads(lines[0])
    assert group["kept"] == "p0.jpg" and len(group["members"]) == 3
    assert json.loads(lines[-1])["summary"]["skipped"] == 1


def test_dedupe_cli_groups_csv_is_what_the_benchmark_scorer_reads(tmp_path: Path) -> None:
    """`embedsearch dedupe DIR --out D` writes groups.csv (columns group, id; ids relative
    to DIR) that benchmarks/dedupe_generalisation.py scores against the truth that
    benchmarks/plant_duplicates.py writes."""
    from benchmarks.dedupe_generalisation import read_groups, score
    from benchmarks.plant_duplicates import plant

    truth_csv = plant(tmp_path / "planted", [picture(0)], [picture(k) for k in range(1, 10)],
                      ("tiny", "grey"), seed=0)
    truth = read_groups(truth_csv)
    assert len(truth) == 12 and len(set(truth.values())) == 10
    run_cli("dedupe", str(tmp_path / "planted"), "--model", TINY, "--out",
            str(tmp_path / "d"), "--no-html")
    with open(tmp_path / "d" / "groups.csv") as fh:
        assert fh.readline().startswith("group,id,")
    predicted = read_groups(tmp_path / "d" / "groups.csv")
    assert set(predicted) <= set(truth)  # the same ids, relative to the folder
    assert score(truth, predicted) == {"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                       "true_pairs": 3, "predicted_pairs": 3,
                                       "correct_pairs": 3}
    # a wrong grouping is scored as wrong (the scorer is not blind)
    assert score(truth, {**predicted, "d00000.jpg": predicted["o00000.jpg"]})["precision"] < 1


# -- the third signal: local features and one geometric transform ------------------------
MINI = Path(__file__).resolve().parents[1] / "examples" / "clothing-mini" / "train"


def test_local_features_confirm_crops_and_rotations_never_look_alikes() -> None:
    """Real generated images: 20 % crops and 30° rotations of synthetic posters (the case
    the embedding misses) are confirmed with the transform they underwent; distinct
    posters (look-alikes by construction: gradients, shapes, one font) and distinct
    photos of one clothing class on plain backgrounds are refused."""
    from itertools import combinations

    from benchmarks.plant_duplicates import make_variant, synthetic_poster
    from embedsearch.dedupe.geometry import image_features, match

    rng = np.random.default_rng(3)
    posters = [synthetic_poster(rng) for _ in range(10)]
    feats = [image_features(p) for p in posters]
    for poster, f in zip(posters[:4], feats, strict=False):
        crop = match(f, image_features(make_variant(poster, "crop20", rng)[0]))
        assert crop.accepted and 1.2 < crop.scale < 1.3, crop  # each side 1/0.8
        turned = match(f, image_features(make_variant(poster, "rot30", rng)[0]))
        assert turned.accepted and abs(abs(turned.angle) - 30) < 2, turned
    photos = sorted((MINI / "t-shirt").glob("*.jpg"))[:6] + sorted(
        (MINI / "shirt").glob("*.jpg"))[:6]
    photo_feats = [image_features(Image.open(p).convert("RGB")) for p in photos]
    for a, b in [*combinations(feats, 2), *combinations(photo_feats, 2)]:
        m = match(a, b)
        assert not m.accepted, m
    photo = Image.open(photos[0]).convert("RGB")
    assert match(photo_feats[0], image_features(make_variant(photo, "crop20", rng)[0])
                 ).accepted


def test_band_pairs_confirmed_by_local_features_join_their_original(tmp_path: Path) -> None:
    """find_duplicates with ``verify``, in a crowd of look-alikes (as on synthetic posters):
    a crop whose cosine sits below the threshold joins its original through the geometric
    check (signal "geometry", its reason says so); the look-alikes, more similar to the
    original than the crop is, stay apart; a pair below the band is never checked."""
    from benchmarks.plant_duplicates import make_variant, synthetic_poster
    from embedsearch.dedupe.geometry import file_verifier

    rng = np.random.default_rng(5)
    posters = [synthetic_poster(rng) for _ in range(6)]
    images = {f"poster{k}.jpg": p for k, p in enumerate(posters)}
    images["crop.jpg"] = make_variant(posters[0], "crop20", rng)[0]
    images["far.jpg"] = synthetic_poster(rng)
    paths = []
    for name, img in images.items():
        img.save(tmp_path / name, quality=92)
        paths.append(tmp_path / name)
    e = np.eye(9, dtype=np.float32)
    # posters: pairwise cosine 0.90 (a crowd); the crop 0.88 to poster0; far 0.75 to it
    crowd = [np.sqrt(0.9) * e[8] + np.sqrt(0.1) * e[k] for k in range(6)]
    vectors = np.stack([*crowd, 0.88 * crowd[0] + np.sqrt(1 - 0.88 ** 2) * e[6],
                        0.75 * crowd[0] + np.sqrt(1 - 0.75 ** 2) * e[7]])
    checked: list[tuple[int, int]] = []
    verify = file_verifier(paths)

    def spy(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        checked.extend(zip(i.tolist(), j.tolist(), strict=True))
        return verify(i, j)

    res = find_duplicates(vectors, list(images), threshold=0.93, power=1.0, verify=spy,
                          widths=[im.width for im in images.values()],
                          heights=[im.height for im in images.values()])
    assert (0, 6) in checked and len(checked) > 1  # look-alike pairs were checked too
    assert not any(7 in pair for pair in checked)  # far (0.75) is below the band
    g = res.groups.set_index("id")
    assert set(g.index) == {"poster0.jpg", "crop.jpg"}
    assert g.loc["poster0.jpg", "kept"] and g.loc["crop.jpg", "signal"] == "geometry"
    assert "local features" in g.loc["crop.jpg", "reason"]
    assert res.summary()["links_by_geometry"] == 1


def test_rotated_copy_far_below_the_band_is_proposed_by_its_hash(tmp_path: Path) -> None:
    """A 30° turn of a graphic can drop its cosine to the original to ~0.55, far below any
    band: its turned-back centre hash proposes the pair, local features confirm it; the
    distinct posters are neither proposed nor grouped."""
    from embedsearch.dedupe.geometry import file_verifier
    from embedsearch.dedupe.views import hash_files

    images, paths = _posters_with_a_copy(tmp_path, 11, 5, "rot30", "turned.jpg")
    e = np.eye(7, dtype=np.float32)
    vectors = np.stack([*(np.sqrt(0.5) * e[6] + np.sqrt(0.5) * e[k] for k in range(5)),
                        0.55 * (np.sqrt(0.5) * e[6] + np.sqrt(0.5) * e[0])
                        + np.sqrt(1 - 0.55 ** 2) * e[5]])
    res = find_duplicates(vectors, list(images), threshold=0.93, power=1.0,
                          hashes=hash_files(paths), verify=file_verifier(paths),
                          widths=[im.width for im in images.values()],
                          heights=[im.height for im in images.values()])
    g = res.groups.set_index("id")
    assert set(g.index) == {"poster0.jpg", "turned.jpg"}
    assert g.loc["turned.jpg", "signal"] == "geometry"
    assert res.extra["geometry"]["rotation_proposals"] >= 1


def test_crop_far_from_its_original_is_proposed_by_descriptor_votes(tmp_path: Path) -> None:
    """A 20 % crop of a look-alike poster whose embedding puts it far from its original
    (cosine 0.55, below any band, behind every look-alike) and that no hash proposes is
    found by descriptor voting and confirmed by the geometric check; the distinct
    look-alikes, closer to the original in the embedding, stay apart."""
    from embedsearch.dedupe.geometry import file_verifier

    images, paths = _posters_with_a_copy(tmp_path, 13, 6, "crop20", "crop.jpg")
    e = np.eye(8, dtype=np.float32)
    crowd = [np.sqrt(0.9) * e[7] + np.sqrt(0.1) * e[k] for k in range(6)]  # cosine 0.90
    vectors = np.stack([*crowd, 0.55 * crowd[0] + np.sqrt(1 - 0.55 ** 2) * e[6]])
    verify = file_verifier(paths)
    res = find_duplicates(vectors, list(images), threshold=0.93, power=1.0, verify=verify,
                          widths=[im.width for im in images.values()],
                          heights=[im.height for im in images.values()])
    g = res.groups.set_index("id")
    assert set(g.index) == {"poster0.jpg", "crop.jpg"}
    assert g.loc["crop.jpg", "signal"] == "geometry"
    assert res.extra["geometry"]["vote_proposals"] >= 1
    a, b = verify.propose()
    assert (0, 6) in set(zip(a.tolist(), b.tolist(), strict=True))


@pytest.mark.parametrize("confirmed", [False, True])
def test_turned_back_hash_link_needs_local_features_when_they_run(confirmed: bool) -> None:
    """A link made by a rotated copy's turned-back centre hash alone is kept only when the
    local-feature check confirms it: a smooth centre's hash matches other gradients within
    a few bits, and one such false match pulled a whole other group into the copy's star
    (planted posters1: 131 of 160 wrong pairs). Without local features the hash decides."""
    from embedsearch.dedupe.views import ImageViews

    views = ImageViews.empty(5)  # unhashed images (NO_HASH) never match
    views.hash[:2] = [np.uint64(0x0F0F0F0F), np.uint64(0xF0F0F0F0F0)]
    views.centre[:2] = [np.uint64(0x1234567), np.uint64(0x7654321)]
    views.rotated[0] = np.uint64(0x7654321)  # copy 0 turned back = 1's centre, 0 bits
    e = np.eye(6, dtype=np.float32)
    # a crowd of look-alikes, every pair at cosine 0.8 (in the hash band): no lone match
    vectors = np.stack([np.sqrt(0.8) * e[5] + np.sqrt(0.2) * e[k] for k in range(5)])
    names = ["turned.jpg", "other.jpg", "a.jpg", "b.jpg", "c.jpg"]
    checked: list[tuple[int, int]] = []

    def verify(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        checked.extend(zip(i.tolist(), j.tolist(), strict=True))
        return np.full(len(i), confirmed)

    res = find_duplicates(vectors, names, threshold=0.93, power=1.0, hashes=views,
                          verify=verify)
    assert (0, 1) in checked
    g = res.groups.set_index("id")
    if confirmed:
        assert set(g.index) == {"turned.jpg", "other.jpg"}
        assert "rotation" in set(g["signal"].dropna())
        assert res.extra["geometry"]["rotation_links_confirmed"] == 1
    else:
        assert g.empty and res.summary()["links_by_rotation"] == 0
    plain = find_duplicates(vectors, names, threshold=0.93, power=1.0, hashes=views)
    assert plain.summary()["links_by_rotation"] == 1


def test_shared_watermark_alone_does_not_make_two_posters_copies() -> None:
    """Distinct small posters (182×268, the size of the issue's poster set) under the same
    stock watermark: their keypoints on the watermark fit one transform, so the geometric
    criteria alone would call some of them copies; the detail agreement after alignment
    refuses most, while every planted watermarked copy agrees far above the bar."""
    from benchmarks.plant_duplicates import make_variant, synthetic_poster
    from embedsearch.dedupe.geometry import MIN_AGREEMENT, image_features, match

    rng = np.random.default_rng(3)
    posters = [synthetic_poster(rng).resize((182, 268), Image.LANCZOS) for _ in range(12)]
    # the same seed for each: the same text at the same place, as a stock watermark
    marked = [image_features(make_variant(p, "watermark", np.random.default_rng(7))[0])
              for p in posters]
    distinct = [match(marked[a], marked[b]) for a in range(12) for b in range(a + 1, 12)]
    geometric = [m for m in distinct if m.geometric]
    assert len(geometric) >= 3  # the case exists: keypoints alone would accept these
    assert sum(m.accepted for m in geometric) <= len(geometric) // 3
    copies = [match(image_features(p), f) for p, f in zip(posters, marked, strict=True)]
    agreed = [m.agreement for m in copies if m.geometric]
    assert len(agreed) >= 10 and min(agreed) > 2 * MIN_AGREEMENT

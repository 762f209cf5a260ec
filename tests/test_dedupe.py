"""Duplicates: grouping without chaining, keep policy, reports, safe actions, leakage, and
build-index --dedupe. Images are generated; the weightless test encoder embeds them."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance, ImageOps

from embedsearch import build_index, load_bundle
from embedsearch.cli import main
from embedsearch.dedupe import (
    DEFAULT_THRESHOLD,
    DedupeResult,
    candidate_pairs,
    copy_clean_to,
    dedupe_bundle,
    delete_in_place,
    find_duplicates,
    group_labels,
    grouped_split,
    leakage_bundle,
    move_to,
    sweep,
    undo,
    write_report,
)
from embedsearch.errors import EmbedsearchError, InputError
from embedsearch.query import embed_paths
from tests.conftest import REPO

TINY = "test:tiny"


def picture(seed: int, size: int = 160) -> Image.Image:
    """A distinct photo-like picture: a smooth random colour layout plus grain. The test
    encoder sees colour layout, so two seeds give clearly different vectors."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def near_copies(img: Image.Image) -> dict[str, tuple[Image.Image, int]]:
    """The edits a scraped collection is full of: (image, JPEG quality)."""
    w, h = img.size
    return {
        "half": (img.resize((w // 2, h // 2)), 90),
        "double": (img.resize((w * 2, h * 2)), 90),
        "q30": (img, 30),
        "crop": (img.crop((8, 6, w - 4, h - 8)), 90),  # about 7 % of each side
        "brighter": (ImageEnhance.Brightness(img).enhance(1.15), 90),
        "darker": (ImageEnhance.Brightness(img).enhance(0.9), 90),
    }


def sha_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(main, ["-q", *args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def kept_ids(res: DedupeResult) -> list[str]:
    """Ids of the images a dedupe result keeps, one per group."""
    return res.groups.loc[res.groups["kept"], "id"].tolist()


@pytest.fixture
def dup_folder(tmp_path: Path) -> Path:
    """cats/ and dogs/ of distinct pictures; picture 0 has six near copies (one filed under
    dogs: a label conflict) and picture 3 a byte-identical copy."""
    root = tmp_path / "photos"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
    for k in range(12):
        picture(k).save(root / ("cats" if k < 6 else "dogs") / f"p{k:02d}.jpg", quality=92)
    for name, (img, q) in near_copies(picture(0)).items():
        folder = "dogs" if name == "darker" else "cats"
        img.save(root / folder / f"p00_{name}.jpg", quality=q)
    shutil.copyfile(root / "cats" / "p03.jpg", root / "dogs" / "p03_copy.jpg")
    return root


# -- grouping -----------------------------------------------------------------------------
def test_near_copies_grouped_with_original_and_distinct_images_alone(dup_folder: Path) -> None:
    build_index(dup_folder, name="photos", model=TINY)
    res = dedupe_bundle(load_bundle("photos"))
    g = res.groups
    assert res.n_groups == 2
    copies = {f"cats/p00_{n}.jpg" for n in ("half", "double", "q30", "crop", "brighter")}
    group0 = g[g["kept_id"] == "cats/p00_double.jpg"]  # the largest resolution is kept
    assert set(group0["id"]) == copies | {"cats/p00.jpg", "dogs/p00_darker.jpg"}
    assert (group0.loc[~group0["kept"], "similarity"] >= DEFAULT_THRESHOLD).all()
    assert group0.loc[group0["kept"], "reason"].item().startswith("kept: largest resolution")
    exact = g[g["match"] == "exact"]
    assert exact["id"].tolist() == ["dogs/p03_copy.jpg"]
    assert exact["kept_id"].item() == "cats/p03.jpg"  # same size: path order decides
    assert "same sha256" in exact["reason"].item()
    # Every distinct picture stays out of the groups.
    assert not set(g["id"]) & {f"cats/p{k:02d}.jpg" for k in (1, 2, 4, 5)}
    assert len(res.removed_ids) == 7
    # The copy filed under "dogs" makes group 0 a label conflict; the exact copy too.
    assert res.label_conflicts["group"].nunique() == 2


def _chain(n: int, step: float, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors on a great circle, consecutive ones ``step`` apart (cosine)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, dim))
    a /= np.linalg.norm(a)
    b -= a * (a @ b)
    b /= np.linalg.norm(b)
    ang = np.arccos(step)
    return np.array([np.cos(k * ang) * a + np.sin(k * ang) * b for k in range(n)], np.float32)


def test_chain_does_not_merge_its_ends() -> None:
    x = _chain(3, 0.93)  # A~B, B~C at 0.93; A vs C at 0.73
    assert float(x[0] @ x[2]) < 0.8
    res = find_duplicates(x, ["A", "B", "C"], threshold=0.9, power=1.0)
    # B is linked to both: the centre; A and C join it, though A is the one kept (path
    # order): groups are not built around the kept file any more.
    g = res.groups.set_index("id")
    assert set(g["centre_id"]) == {"B"} and kept_ids(res) == ["A"]
    assert g.loc["C", "reason"].startswith("near-duplicate of B (cosine 0.930")
    # A long chain: connected components would make one group of 8.
    long = _chain(8, 0.95)
    res = find_duplicates(long, [f"c{k}" for k in range(8)], threshold=0.9, power=1.0)
    for _, grp in res.groups.groupby("group"):
        centre = int(grp["centre_id"].iloc[0][1:])
        members = [int(i[1:]) for i in grp["id"]]
        # every member is a near-duplicate of the centre, not just of a neighbour
        assert all(float(long[centre] @ long[m]) >= 0.9 for m in members)
    assert res.groups.groupby("group").size().max() <= 3
    # ...while the split helper treats the whole chain as one unit.
    assert len(set(group_labels(res))) == 1


def test_member_joins_the_kept_image_it_is_most_similar_to() -> None:
    x = _chain(3, 0.93)
    # B is now the largest: it is kept, and both A and C are its near-duplicates.
    res = find_duplicates(x, ["A", "B", "C"], threshold=0.9, power=1.0,
                          widths=[10, 20, 10], heights=[10, 20, 10])
    g = res.groups.set_index("id")
    assert g.loc["B", "kept"] and not g.loc["A", "kept"] and not g.loc["C", "kept"]
    assert g.loc["A", "similarity"] == pytest.approx(0.93, abs=1e-3)


@pytest.mark.parametrize(("keep", "kept"), [("resolution", "b"), ("filesize", "c"),
                                            ("path", "a"), ("oldest", "d")])
def test_keep_policies(keep: str, kept: str) -> None:
    x = np.tile(np.eye(4, dtype=np.float32)[:1], (4, 1))
    res = find_duplicates(x, ["a", "b", "c", "d"], keep=keep, widths=[10, 40, 20, 10],
                          heights=[10, 40, 20, 10], sizes=[100, 200, 900, 50],
                          mtimes=[5, 6, 7, 1])
    assert kept_ids(res) == [kept]
    assert res.groups.loc[res.groups["kept"], "reason"].item().startswith("kept: ")


def test_unknown_keep_policy_and_bad_inputs_fail_clearly() -> None:
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(EmbedsearchError, match="keep policy"):
        find_duplicates(x, keep="newest")
    with pytest.raises(EmbedsearchError, match="NaN"):
        find_duplicates(np.full((2, 3), np.nan, np.float32))
    with pytest.raises(EmbedsearchError, match="threshold"):
        find_duplicates(x, threshold=0)
    with pytest.raises(EmbedsearchError, match="ids"):
        find_duplicates(x, ["a", "a", "b"])


def test_projected_search_finds_the_same_pairs_as_exact() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 256)).astype(np.float32)
    noisy = x[:200] + rng.uniform(0.1, 0.5, (200, 1)).astype(np.float32) \
        * rng.standard_normal((200, 256)).astype(np.float32)
    x = np.concatenate([x, noisy])
    exact = candidate_pairs(x, 0.85)
    projected = candidate_pairs(x, 0.85, exact_limit=0, reduce_dim=64)
    assert projected.method.startswith("projected")
    assert len(exact) > 100
    assert set(zip(exact.i.tolist(), exact.j.tolist(), strict=True)) == \
        set(zip(projected.i.tolist(), projected.j.tolist(), strict=True))
    np.testing.assert_allclose(np.sort(exact.sim), np.sort(projected.sim), atol=1e-5)


def test_sweep_counts_fall_as_the_threshold_rises() -> None:
    x = np.concatenate([_chain(8, 0.97), np.eye(32, dtype=np.float32)[:5]])
    table = sweep(x, [0.8, 0.9, 0.95, 0.99], power=1.0)
    # the calibrated threshold is swept too, and named
    assert table["threshold"].tolist() == sorted({0.8, 0.9, 0.95, 0.99,
                                                  table.attrs["calibrated"]})
    assert table["pairs"].is_monotonic_decreasing
    # the chain's pairs at 0.8 (cosine down to 0.79 across 7 steps) do not all fit in
    # groups: the in-group share of pairs is below 1 there, and 1 once only copies pass
    assert table["pair_precision_proxy"].iloc[0] < 1.0
    assert table["pair_precision_proxy"].iloc[-1] == 1.0
    assert table["removed"].iloc[0] > 0 and table["removed"].iloc[-1] == 0


def test_grouped_split_keeps_duplicates_on_one_side() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((60, 16)).astype(np.float32)
    x = np.concatenate([base, base[:20] + 0.01])
    labels = [str(k % 3) for k in range(80)]
    res = find_duplicates(x, threshold=0.95, power=1.0)
    groups = group_labels(res)
    train, test = grouped_split(groups, labels, test_size=0.25)
    assert len(train) + len(test) == 80
    assert not set(groups[train]) & set(groups[test])
    assert set(np.concatenate([train, test])) == set(range(80))


# -- reports ------------------------------------------------------------------------------
def test_cli_dedupe_writes_report_and_changes_nothing(dup_folder: Path, tmp_path: Path
                                                      ) -> None:
    before = sha_tree(dup_folder)
    out = tmp_path / "report"
    lines = [json.loads(line) for line in run_cli(
        "dedupe", str(dup_folder), "--model", TINY, "--out", str(out), "--json").splitlines()]
    data = lines[-1]
    assert data["summary"]["removed"] == 7 and data["action"] is None
    # one object per group before the summary: members, kept, similarities, reasons
    by_kept = {g["kept"]: g for g in lines[:-1]}
    assert len(by_kept) == 2
    copy = by_kept["cats/p03.jpg"]["members"]
    assert [(m["id"], m["match"]) for m in copy] == [("cats/p03.jpg", "kept"),
                                                    ("dogs/p03_copy.jpg", "exact")]
    assert all(m["reason"] and 0 < m["similarity"] <= 1 for g in by_kept.values()
               for m in g["members"])
    assert sha_tree(dup_folder) == before  # report only
    groups = pd.read_csv(out / "groups.csv")
    assert list(groups.columns[:6]) == ["group", "id", "kept", "match", "similarity",
                                        "kept_id"]
    assert pd.read_parquet(out / "groups.parquet")["id"].tolist() == groups["id"].tolist()
    conflicts = pd.read_csv(out / "label_conflicts.csv")
    assert {"cats", "dogs"} <= set(conflicts["label"])
    page = (out / "report.html").read_text()
    groups_part, near_part = page.split("id='near-misses'")
    assert groups_part.count("data:image/jpeg;base64,") == len(groups)
    near = pd.read_csv(out / "near_misses.csv")
    assert near_part.count("data:image/jpeg;base64,") == 2 * min(len(near), 40)
    assert "LABEL CONFLICT" in page
    text = run_cli("dedupe", "--index", "photos", "--out", str(out))
    assert "7 duplicates to remove (1 exact, 6 near)" in text
    assert "report only" in text


def test_html_escapes_file_names(tmp_path: Path) -> None:
    root = tmp_path / "odd"
    root.mkdir()
    picture(1).save(root / "<b>x&y.jpg")
    picture(1).resize((80, 80)).save(root / "small.jpg")
    build_index(root, name="odd", model=TINY)
    res = dedupe_bundle(load_bundle("odd"))
    paths = write_report(res, tmp_path / "rep")
    page = paths["html"].read_text()
    assert "&lt;b&gt;x&amp;y.jpg" in page and "<b>x&y" not in page


def test_report_from_arrays_only(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        picture(5).save(tmp_path / name)
    x = np.eye(3, dtype=np.float32)
    x[1] = x[0]
    res = find_duplicates(x, ["a.jpg", "b.jpg", "gone.jpg"])
    paths = write_report(res, tmp_path / "rep", root=tmp_path)
    page = paths["html"].read_text()
    assert page.count("base64,") == 2 and "label:" not in page
    assert pd.read_csv(paths["groups_csv"])["id"].tolist() == ["a.jpg", "b.jpg"]


def test_sweep_cli_and_unlabelled_folder(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    for k in range(5):
        picture(k).save(root / f"{k}.jpg")
    picture(2).save(root / "2-again.png")
    text = run_cli("dedupe", str(root), "--model", TINY, "--sweep")
    assert "<- calibrated" in text
    res = dedupe_bundle(load_bundle("flat"))
    assert res.groups["label"].isna().all() and len(res.removed_ids) == 1
    assert res.label_conflicts.empty


def test_default_threshold_is_the_documented_one() -> None:
    text = run_cli("dedupe", "--help")
    assert "Default: calibrated on the collection" in " ".join(text.split())
    doc = (REPO / "benchmarks" / "results" / "dedupe_threshold.json")
    if doc.exists():
        assert json.loads(doc.read_text())["chosen_threshold"] == DEFAULT_THRESHOLD


# -- actions ------------------------------------------------------------------------------
def test_move_to_then_undo_restores_the_folder_byte_for_byte(dup_folder: Path,
                                                              tmp_path: Path) -> None:
    before = sha_tree(dup_folder)
    build_index(dup_folder, name="photos", model=TINY)
    res = dedupe_bundle(load_bundle("photos"))
    dest = tmp_path / "quarantine"
    report = move_to(res, dest)
    assert sorted(report.done) == sorted(res.removed_ids) and not report.skipped
    after = sha_tree(dup_folder)
    assert set(after) == set(before) - set(res.removed_ids)
    # Relative paths kept, bytes unchanged, undo manifest beside them.
    moved = sha_tree(dest)
    for rid in res.removed_ids:
        assert moved[rid] == before[rid]
    manifest = json.loads(report.log.read_text())
    assert manifest["state"] == "done"
    assert {m["status"] for m in manifest["moves"]} == {"moved"}
    text = run_cli("dedupe-undo", str(report.log))
    assert f"restored {len(res.removed_ids)} files" in text
    assert sha_tree(dup_folder) == before
    assert [p for p in dest.rglob("*") if p.is_file()] == [report.log]
    # A second undo finds nothing left to do and does no harm.
    assert undo(report.log).done == []
    assert sha_tree(dup_folder) == before


def test_undo_after_a_crash_mid_move(dup_folder: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import embedsearch.dedupe.actions as actions

    before = sha_tree(dup_folder)
    build_index(dup_folder, name="photos", model=TINY)
    res = dedupe_bundle(load_bundle("photos"))
    real_move, calls = actions._move_file, []

    def dying_move(src: Path, dst: Path, sha: str) -> None:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(src)
        real_move(src, dst, sha)

    monkeypatch.setattr(actions, "_move_file", dying_move)
    with pytest.raises(KeyboardInterrupt):
        move_to(res, tmp_path / "q")
    monkeypatch.setattr(actions, "_move_file", real_move)
    log = next((tmp_path / "q").glob("embedsearch-undo-*.json"))
    assert len(undo(log).done) == 3
    assert sha_tree(dup_folder) == before


def test_actions_skip_changed_files_and_never_remove_the_last_copy(dup_folder: Path,
                                                                   tmp_path: Path) -> None:
    build_index(dup_folder, name="photos", model=TINY)
    res = dedupe_bundle(load_bundle("photos"))
    (dup_folder / "cats" / "p00_q30.jpg").write_bytes(b"changed since indexing")
    (dup_folder / "cats" / "p03.jpg").unlink()  # the kept copy of the exact pair is gone
    report = move_to(res, tmp_path / "q")
    skipped = dict(report.skipped)
    assert "sha256 differs" in skipped["cats/p00_q30.jpg"]
    assert "last copy" in skipped["dogs/p03_copy.jpg"]
    assert (dup_folder / "dogs" / "p03_copy.jpg").exists()
    with pytest.raises(InputError, match="inside the image folder"):
        move_to(res, dup_folder / "dups")


def test_copy_clean_to_links_every_image_but_the_removed(dup_folder: Path,
                                                         tmp_path: Path) -> None:
    (dup_folder / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    before = sha_tree(dup_folder)
    build_index(dup_folder, name="photos", model=TINY)
    res = dedupe_bundle(load_bundle("photos"))
    assert res.extra["not_indexed"] == ["cats/broken.jpg"]
    report = copy_clean_to(res, tmp_path / "clean", mode="hardlink")
    clean = sha_tree(tmp_path / "clean")
    clean.pop(report.log.name)
    assert set(clean) == set(before) - set(res.removed_ids)
    assert all(clean[k] == before[k] for k in clean)
    assert (tmp_path / "clean" / "cats" / "p01.jpg").stat().st_nlink == 2
    assert sha_tree(dup_folder) == before


def test_delete_only_with_the_flag_and_after_writing_its_log(dup_folder: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "rep"
    run_cli("dedupe", str(dup_folder), "--model", TINY, "--out", str(out))
    assert len(sha_tree(dup_folder)) == 19
    before = sha_tree(dup_folder)
    text = run_cli("dedupe", "--index", "photos", "--out", str(out), "--delete")
    assert "delete: 7 files" in text
    log = json.loads(next(out.glob("embedsearch-deleted-*.json")).read_text())
    deleted = {d["id"]: d for d in log["deletions"]}
    assert len(deleted) == 7 and {d["status"] for d in deleted.values()} == {"deleted"}
    assert all(d["sha256"] == before[i] for i, d in deleted.items())
    assert set(sha_tree(dup_folder)) == set(before) - set(deleted)
    with pytest.raises(EmbedsearchError, match="choose one action"):
        from embedsearch.dedupe.actions import check_action_args
        check_action_args(tmp_path, None, True)


def test_delete_in_place_library_call_logs_first(dup_folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    build_index(dup_folder, name="photos", model=TINY)
    res = dedupe_bundle(load_bundle("photos"))
    seen_log: list[bool] = []
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        seen_log.append(any((tmp_path / "log").glob("embedsearch-deleted-*.json")))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    report = delete_in_place(res, tmp_path / "log")
    assert len(report.done) == 7 and seen_log and all(seen_log)


# -- leakage and build-index --dedupe ------------------------------------------------------
@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    root = tmp_path / "splits"
    for split, seeds in (("train", range(0, 8)), ("test", range(8, 12))):
        for k in seeds:
            folder = root / split / ("a" if k % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            picture(k).save(folder / f"{k}.jpg", quality=92)
    # A planted leak: train picture 2, resized and re-encoded, filed in test.
    picture(2).resize((120, 120)).save(root / "test" / "b" / "leak.jpg", quality=60)
    return root


def test_leakage_finds_a_planted_duplicate_across_train_and_test(split_folder: Path) -> None:
    build_index(split_folder, name="splits", model=TINY)
    bundle = load_bundle("splits")
    pairs = leakage_bundle(bundle)
    assert len(pairs) == 1
    row = pairs.iloc[0]
    assert (row["split_a"], row["id_a"], row["split_b"], row["id_b"]) == \
        ("test", "test/b/leak.jpg", "train", "train/b/2.jpg")
    # the threshold is the one dedupe calibrates on the same bundle (same function)
    assert pairs.attrs["threshold"] == dedupe_bundle(bundle).threshold
    assert pairs.attrs["calibration"]["images"] == len(bundle.items)
    assert not row["exact"] and row["similarity"] >= pairs.attrs["threshold"]
    assert leakage_bundle(bundle, between="train,val").empty
    # --threshold overrides: above the planted pair's similarity it is gone
    given = leakage_bundle(bundle, threshold=min(1.0, row["similarity"] + 0.001))
    assert given.empty and given.attrs == {"threshold": min(1.0, row["similarity"] + 0.001),
                                           "calibration": None}


def test_leakage_cli_on_two_folders(split_folder: Path, tmp_path: Path) -> None:
    train, test = split_folder / "train", split_folder / "test"
    shutil.copyfile(train / "a" / "1.jpg", test / "a" / "exact.jpg")
    result = CliRunner().invoke(main, ["-q", "leakage", str(train), str(test), "--model", TINY,
                                       "--json", "--fail-on-leak", "--out",
                                       str(tmp_path / "leak")])
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    found = {(r["id_a"], r["id_b"], r["exact"]) for r in rows}
    assert found == {("b/2.jpg", "b/leak.jpg", False), ("a/1.jpg", "a/exact.jpg", True)}
    assert (tmp_path / "leak" / "leakage.html").read_text().count("base64,") == 4


def test_build_index_dedupe_drops_duplicates_and_sticks(dup_folder: Path) -> None:
    res = build_index(dup_folder, name="d", model=TINY, dedupe=True)
    m = res.manifest
    # no threshold given: calibrated on the build's vectors by dedupe's own function
    assert m["dedupe"]["removed"] == 7 and m["dedupe"]["settings"]["threshold"] is None
    b = load_bundle("d")
    every = np.concatenate([np.asarray(b.embeddings), np.load(
        b.path / b.manifest["roles"]["dedupe_removed_embeddings"])])
    assert m["dedupe"]["threshold"] == find_duplicates(every, threshold=None).threshold
    assert m["dedupe"]["calibration"]["images"] == 19
    assert len(b.items) == 12 == b.index.ntotal and m["counts"]["embedded"] == 12
    assert "cats/p00_double.jpg" in set(b.items["id"])
    gone = pd.read_parquet(b.path / m["dedupe"]["removed_file"])
    assert len(gone) == 7 and set(gone["kept_id"]) == {"cats/p00_double.jpg", "cats/p03.jpg"}
    # A rebuild re-encodes nothing (removed vectors are kept) and dedupes again.
    again = build_index(dup_folder, name="d", model=TINY)
    assert again.encoded == 0 and again.manifest["dedupe"]["removed"] == 7
    assert len(load_bundle("d").items) == 12
    # Turning it off brings every image back, still without re-encoding.
    off = build_index(dup_folder, name="d", model=TINY, dedupe=False)
    assert off.encoded == 0 and "dedupe" not in off.manifest
    assert len(load_bundle("d").items) == 19
    text = run_cli("build-index", str(dup_folder), "--name", "d2", "--model", TINY,
                   "--dedupe", "--dup-threshold", "0.99")
    assert "duplicates left out" in text and "threshold 0.99)" in text
    given = load_bundle("d2").manifest["dedupe"]
    assert given["settings"]["threshold"] == given["threshold"] == 0.99
    assert given["calibration"] is None


def test_importing_dedupe_stays_light() -> None:
    code = ("import sys, embedsearch.dedupe, embedsearch.dedupe.group; "
            "print(sorted(m for m in ('torch', 'faiss', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# -- the real encoder ---------------------------------------------------------------------
@pytest.mark.slow
def test_default_threshold_groups_real_photo_copies(clothing_bundle, tmp_path: Path) -> None:
    """Planted copies of real photos, embedded by the default encoder, meet their originals
    at the default threshold; the photos themselves are not flagged wholesale."""
    items = clothing_bundle.items
    test_rows = np.flatnonzero(items["split"].to_numpy() == "test")[::37][:8]
    root = Path(clothing_bundle.manifest["source"]["path"])
    paths, origin = [], []
    for r in test_rows:
        with Image.open(root / items["id"].iloc[r]) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        w, h = img.size
        for name, copy, q in (("q40", img, 40), ("small", img.resize((w * 2 // 3, h * 2 // 3)), 85),
                              ("crop", img.crop((w // 20, h // 25, w - w // 25, h - h // 20)), 90)):
            p = tmp_path / f"{r}_{name}.jpg"
            copy.save(p, quality=q)
            paths.append(p)
            origin.append(r)
    vecs, _ = embed_paths(clothing_bundle, paths, num_workers=0)
    x = np.concatenate([np.asarray(clothing_bundle.embeddings), vecs])
    ids = [*items["id"].tolist(), *[p.name for p in paths]]
    res = find_duplicates(x, ids)
    g = res.group_of
    n = len(items)
    together = [g[n + k] == g[o] for k, o in enumerate(origin)]
    assert np.mean(together) >= 0.9
    assert res.n_groups <= len(test_rows) + 0.02 * n

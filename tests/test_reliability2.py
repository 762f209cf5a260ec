"""Issue 16: reliability and security, round 2 (each test is one reproduction of the issue)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch import build_index, load_bundle
from embedsearch.cli import main
from embedsearch.errors import BundleError
from embedsearch.predict import Predictor
from tests.conftest import draw_image, make_collection
from tests.proc import cli, require_permission_bits

TINY = "test:tiny"


def run_cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output


# -- 1. an action never removes the last copy ------------------------------------------------
def test_delete_never_removes_a_file_that_is_also_its_kept_image_via_a_symlink(
        tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=3)
    real = images / "red" / "zz_unique.jpg"
    draw_image("blue", 999).save(real)
    (images / "red" / "aa_alias.jpg").symlink_to("zz_unique.jpg")
    build_index(images, out=tmp_path / "b", model=TINY, follow_symlinks=True)
    run_cli("dedupe", "--index", str(tmp_path / "b"), "-t", "0.999", "--out",
            str(tmp_path / "rep"), "--delete")
    assert real.is_file(), "the only copy was deleted"
    assert (images / "red" / "aa_alias.jpg").is_file(), "the kept image is a dangling link"


def test_delete_from_a_csv_listing_one_file_under_two_names(tmp_path: Path) -> None:
    imgs = tmp_path / "data" / "imgs"
    imgs.mkdir(parents=True)
    for i, cls in enumerate(["red", "green", "blue"]):
        draw_image(cls, i).save(imgs / f"{cls}.jpg")
    draw_image("red", 77).save(imgs / "u.jpg")
    (tmp_path / "data" / "alias").symlink_to("imgs")
    rows = ["path,label", *(f"imgs/{c}.jpg,{c}" for c in ["red", "green", "blue"]),
            "imgs/u.jpg,red", "alias/u.jpg,red"]
    csv = tmp_path / "data" / "list.csv"
    csv.write_text("\n".join(rows) + "\n")
    build_index(csv, out=tmp_path / "b", model=TINY)
    for action in (["--delete"], ["--move-to", str(tmp_path / "moved")]):
        run_cli("dedupe", "--index", str(tmp_path / "b"), "-t", "0.999", "--out",
                str(tmp_path / "rep"), *action)
        assert (imgs / "u.jpg").is_file(), f"{action}: the only copy left its place"


# -- 3. a rebuild never launders a damaged generation ----------------------------------------
def test_rebuild_does_not_reuse_a_corrupt_generation(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=3)
    b = build_index(images, out=tmp_path / "b", model=TINY)
    emb = b.path / b.manifest["roles"]["embeddings"]
    arr = np.load(emb)
    good = dict(zip(load_bundle(b.path).items["id"], arr.copy(), strict=True))
    arr[:3] = np.float32(0.5)
    np.save(emb, arr)
    with pytest.raises(BundleError):
        load_bundle(b.path)
    again = build_index(images, out=tmp_path / "b", model=TINY)
    # Re-encoded, or taken from the content-addressed shared cache: never from the damage.
    assert again.encoded + getattr(again, "from_shared", 0) == 9
    fresh = load_bundle(b.path)
    for rid, vec in zip(fresh.items["id"], np.asarray(fresh.embeddings), strict=True):
        np.testing.assert_allclose(vec, good[rid], atol=1e-5)


# -- 4. missing labels are unlabelled rows; literal strings stay labels ----------------------
def test_loose_files_and_empty_cells_are_unlabelled_never_a_class(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=4)
    draw_image("red", 500).save(images / "loose.jpg")
    bundle = load_bundle(build_index(images, out=tmp_path / "b", model=TINY).path)
    assert bundle.classes == ["blue", "green", "red"]
    for pred in Predictor(bundle).predict([images / "loose.jpg", images / "red" / "red_000.jpg"],
                                          method="all"):
        assert "nan" not in pred.probabilities and pred.label in bundle.classes
        for res in pred.methods.values():
            assert "nan" not in res.get("probabilities", {})
    out = run_cli("predict", str(images / "loose.jpg"), "--index", str(tmp_path / "b"),
                  "--json")
    assert '"nan"' not in out


def test_csv_labels_na_none_null_stay_labels_and_empty_cells_are_unlabelled(
        tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=2)
    rows = ["path,label", "images/red/red_000.jpg,NA", "images/red/red_001.jpg,None",
            "images/green/green_000.jpg,null", "images/green/green_001.jpg,",
            "images/blue/blue_000.jpg,blue", 'images/blue/blue_001.jpg,""']
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    bundle = load_bundle(build_index(tmp_path / "list.csv", out=tmp_path / "b",
                                     model=TINY).path)
    assert bundle.classes == ["NA", "None", "blue", "null"]
    labels = dict(zip(bundle.items["id"], bundle.items["label"], strict=True))
    assert labels["images/red/red_000.jpg"] == "NA"
    assert not isinstance(labels["images/green/green_001.jpg"], str)
    assert not isinstance(labels["images/blue/blue_001.jpg"], str)
    pred = Predictor(bundle).predict([images / "green" / "green_001.jpg"])[0]
    assert pred.label in bundle.classes and "nan" not in pred.probabilities


def test_a_cached_unreadable_failure_is_retried_once_readable(tmp_path: Path) -> None:
    prefix = require_permission_bits()
    images = make_collection(tmp_path / "images", per_class=3)
    locked = images / "red" / "red_000.jpg"
    locked.chmod(0)
    try:
        res = cli("build-index", str(images), "--out", str(tmp_path / "b"), "--model", TINY,
                  prefix=prefix)
        assert res.returncode == 0, res.stderr
        assert load_bundle(tmp_path / "b").manifest["counts"]["embedded"] == 8
    finally:
        locked.chmod(0o644)
    again = build_index(images, out=tmp_path / "b", model=TINY)
    assert again.encoded == 1 and again.manifest["counts"]["embedded"] == 9


# -- 2b. decode work is bounded before decoding ----------------------------------------------
def test_jpeg_with_thousands_of_scans_is_refused_fast_also_by_build_index(
        tmp_path: Path) -> None:
    import time

    from embedsearch.data.images import load_image
    from tests.badfiles import many_scan_jpeg

    bad = many_scan_jpeg(side=2000, scans=3000)
    t0 = time.perf_counter()
    res = load_image(bad, target_size=224)
    assert getattr(res, "reason", None) == "too_many_scans"
    assert time.perf_counter() - t0 < 0.5
    images = make_collection(tmp_path / "images", per_class=2)
    (images / "red" / "hostile.jpg").write_bytes(bad)
    buf = io.BytesIO()
    draw_image("red", 3, size=640).save(buf, "JPEG", progressive=True)
    (images / "red" / "progressive.jpg").write_bytes(buf.getvalue())
    built = build_index(images, out=tmp_path / "b", model=TINY)
    assert dict(zip(built.failures["id"], built.failures["reason"], strict=True)) == {
        "red/hostile.jpg": "too_many_scans"}
    assert built.manifest["counts"]["embedded"] == 7


# -- 5. manifests: edits refused, damage is an error (never a traceback or a hang) -------------
@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    return build_index(make_collection(tmp_path / "images", per_class=3), out=tmp_path / "b",
                       model=TINY).path


def _edit(bundle: Path, change, keep_checksum: bool = False) -> None:
    from embedsearch.bundle import write_manifest

    mpath = bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    change(m)
    if keep_checksum:
        write_manifest(bundle, m)
    else:
        m.pop("content_sha256", None)  # a hand edit that also drops the checksum
        mpath.write_text(json.dumps(m))


EDITS = {
    "classes": lambda m: m.__setitem__("classes", ["blue", "green", "zzz"]),
    "reference_rows": lambda m: m["index"].__setitem__("reference_rows", 2),
    "index_type": lambda m: m["index"].__setitem__("type", "hnsw"),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_edited_manifest_facts_are_refused(tiny_bundle: Path, field: str) -> None:
    mpath = tiny_bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    EDITS[field](m)
    mpath.write_text(json.dumps(m, indent=2))  # checksum kept as it was: now stale
    out = run_cli("info", "--index", str(tiny_bundle), code=4)
    assert "content_sha256" in out
    # Even without the checksum, the facts are checked against the data files.
    _edit(tiny_bundle, lambda m: None)
    image = next((tiny_bundle.parent / "images" / "red").iterdir())
    with pytest.raises(BundleError, match=r"edited|manifest says"):
        b = load_bundle(tiny_bundle)
        Predictor(b).predict([image])


MALFORMED = {
    "negative reference_rows": lambda m: m["index"].__setitem__("reference_rows", -3),
    "string fingerprint": lambda m: m.__setitem__("fingerprint", ["a"] * len(m["fingerprint"])),
    "heads not an object": lambda m: m.__setitem__("heads", "x"),
    "bad head entry": lambda m: m.__setitem__("heads", {"h": 5}),
    "no counts": lambda m: m.pop("counts"),
    "source not an object": lambda m: m.__setitem__("source", 5),
    "weights not an object": lambda m: m["encoder"].__setitem__("weights", "x"),
    "generation a string": lambda m: m.__setitem__("generation", "x"),
    "dedupe not an object": lambda m: m.__setitem__("dedupe", 5),
    "file outside": lambda m: m["files"].__setitem__("/dev/zero", {"bytes": 0, "sha256": "0"}),
}


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_malformed_manifests_are_clear_errors(tiny_bundle: Path, damage: str) -> None:
    _edit(tiny_bundle, MALFORMED[damage])
    image = str(next((tiny_bundle.parent / "images" / "red").iterdir()))
    for args in (["info", "--index", str(tiny_bundle)],
                 ["predict", image, "--index", str(tiny_bundle)],
                 ["dedupe", "--index", str(tiny_bundle), "--out", str(tiny_bundle.parent / "r")],
                 ["build-index", str(tiny_bundle.parent / "images"), "--out", str(tiny_bundle),
                  "--model", TINY]):
        run_cli(*args, code=4)


def test_items_table_without_id_column_is_refused(tiny_bundle: Path) -> None:
    import pandas as pd

    from embedsearch.store.io import file_digest

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    items = tiny_bundle / m["roles"]["items"]
    pd.read_parquet(items).drop(columns=["id"]).to_parquet(items)

    def rehash(m: dict) -> None:
        m["files"][m["roles"]["items"]] = {"bytes": items.stat().st_size,
                                           "sha256": file_digest(items)}

    _edit(tiny_bundle, rehash, keep_checksum=True)
    with pytest.raises(BundleError, match="no column id"):
        _ = load_bundle(tiny_bundle).items


@pytest.mark.parametrize("kind", ["fifo", "dev_zero_link"])
def test_manifest_naming_a_fifo_or_device_does_not_hang(tiny_bundle: Path, kind: str) -> None:
    special = tiny_bundle / "data" / "special"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        special.symlink_to("/dev/zero")
    _edit(tiny_bundle, lambda m: m["files"].__setitem__("data/special",
                                                        {"bytes": 0, "sha256": "0" * 64}),
          keep_checksum=True)
    res = cli("info", "--index", str(tiny_bundle), timeout=60)
    assert res.returncode == 4 and "Traceback" not in res.stderr
    assert "not a regular file" in res.stderr


# -- 5. inputs are validated at the boundary ------------------------------------------------
@pytest.mark.parametrize("args", [
    ["build-index", "IMAGES", "--out", "B2", "--batch-size", "0"],
    ["build-index", "IMAGES", "--out", "B2", "--batch-size", "-5"],
    ["predict", "IMAGES", "--index", "B", "--batch-size", "-1"],
    ["predict", "IMAGES", "--index", "B", "-k", "0"],
    ["train", "--index", "B", "--head", "linear", "-C", "-1"],
    ["train", "--index", "B", "--head", "mlp", "--hidden", "0"],
    ["train", "--index", "B", "--head", "mlp", "--max-epochs", "0"],
])
def test_nonsense_numbers_are_usage_errors(tiny_bundle: Path, args: list[str]) -> None:
    images = str(tiny_bundle.parent / "images")
    args = [{"IMAGES": images, "B": str(tiny_bundle),
             "B2": str(tiny_bundle.parent / "b2")}.get(a, a) for a in args]
    out = run_cli(*args, "--model", TINY, code=2) if args[0] == "build-index" \
        else run_cli(*args, code=2)
    assert "Invalid value" in out
    assert not (tiny_bundle / "heads").exists()


def test_ivfpq_on_one_image_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "one" / "a").mkdir(parents=True)
    draw_image("red", 1).save(tmp_path / "one" / "a" / "x.jpg")
    out = run_cli("build-index", str(tmp_path / "one"), "--out", str(tmp_path / "b"),
                  "--model", TINY, "--index-type", "ivfpq", code=1)
    assert "needs at least" in out and "--index-type flat" in out


@pytest.mark.parametrize("content", [
    {"format": "embedsearch-dedupe-moves"},
    {"format": "embedsearch-dedupe-moves", "dest": "/tmp", "moves": [{"id": 1}]},
    {"format": "embedsearch-dedupe-moves", "dest": "/tmp", "moves": "x"},
    [1, 2],
])
def test_dedupe_undo_on_a_damaged_manifest_is_a_clear_error(tmp_path: Path,
                                                           content: object) -> None:
    path = tmp_path / "undo.json"
    path.write_text(json.dumps(content))
    out = run_cli("dedupe-undo", str(path), code=2)
    assert "undo manifest" in out or "move manifest" in out


# -- 6. smaller ones ---------------------------------------------------------------------------
def test_predict_follows_a_rebuild_that_committed_after_the_bundle_was_opened(
        tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=3)
    build_index(images, out=tmp_path / "b", model=TINY)
    opened = load_bundle(tmp_path / "b")
    draw_image("green", 321).save(images / "green" / "new.jpg")
    build_index(images, out=tmp_path / "b", model=TINY)  # generation 2; gen-1 files removed
    pred = Predictor(opened).predict([images / "red" / "red_000.jpg"])[0]
    assert pred.label == "red" and opened.manifest["generation"] == 2
    assert len(opened.items) == 10


def test_a_short_write_says_which_device_is_full_and_how_much_was_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedsearch.store import io as store_io

    def short_write(fh, array, allow_pickle=False):  # what numpy says on a full disk
        fh.write(b"x" * 333_792)
        raise OSError("436480 requested and 333792 written")

    monkeypatch.setattr(store_io.np, "save", short_write)
    with pytest.raises(BundleError) as err:
        store_io.write_npy(tmp_path / "e.npy", np.zeros(4, np.float32))
    text = str(err.value)
    assert "no space left on " in text and "0.4 MB" in text and "MB free" in text
    assert "requested and" not in text and list(tmp_path.iterdir()) == []


def test_a_non_utf8_name_and_its_escaped_spelling_are_two_images(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=2)
    raw = os.fsencode(images / "red") + b"/\xff.jpg"
    draw_image("red", 50).save(os.fsdecode(raw))
    draw_image("red", 51).save(images / "red" / "\\xff.jpg")  # a literal backslash name
    built = build_index(images, out=tmp_path / "b", model=TINY)
    ids = load_bundle(built.path).items["id"].tolist()
    assert built.manifest["counts"]["embedded"] == 8 and len(set(ids)) == 8
    assert "red/\\xff.jpg" in ids
    again = build_index(images, out=tmp_path / "b", model=TINY)
    assert again.encoded == 0, "ids must be stable from one scan to the next"


def test_library_refuses_a_zero_batch_size(tmp_path: Path) -> None:
    from embedsearch.errors import EmbedsearchError

    images = make_collection(tmp_path / "images", per_class=1)
    with pytest.raises(EmbedsearchError, match="batch_size"):
        build_index(images, out=tmp_path / "b", model=TINY, batch_size=0)


def test_a_fifo_or_device_given_as_the_table_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "list.csv"
    os.mkfifo(fifo)
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    for table in (fifo, tmp_path / "zero.csv"):
        res = cli("build-index", str(table), "--out", str(tmp_path / "b"), "--model", TINY,
                  timeout=60)
        assert res.returncode == 2 and "not a regular file" in res.stderr, res.stderr


def test_scan_guard_counts_jpeg_streams_inside_a_tiff_too() -> None:
    from embedsearch.data.jpeg_guard import scan_work_problem

    tiff_like = b"II*\x00" + b"\x00\xff\xda" * 500  # no SOI: only the upper bound applies
    assert "over 100 scans" in (scan_work_problem(tiff_like, 4_000_000) or "")
    assert scan_work_problem(b"II*\x00" + b"\xff\xda" * 10, 4_000_000) is None

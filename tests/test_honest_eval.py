"""Honest evaluation by default (issue 19): no self-votes, split layouts, one embedding cache
for every command, evaluation output and report permissions."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedsearch.dedupe.report import write_leakage
from embedsearch.predict import Predictor
from embedsearch.store.io import default_file_mode


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        files = write_leakage(pd.DataFrame({"id_a": [], "id_b": []}), tmp_path / "leak",
                              html_page=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(files["leakage_csv"].stat().st_mode) == 0o666 & ~umask


# -- one embedding cache for every command ---------------------------------------------------
def test_second_bundle_on_the_same_images_encodes_nothing(collection: Path, tmp_path: Path
                                                          ) -> None:
    from embedsearch import build_index, load_bundle

    first = build_index(collection, out=tmp_path / "a", model="test:tiny")
    assert first.encoded == 24 and first.from_shared == 0
    assert first.manifest["encoding"]["images"] == 24
    # Another bundle, another path to the same bytes: found by content hash.
    copy = tmp_path / "copy"
    shutil.copytree(collection, copy)
    second = build_index(copy, out=tmp_path / "b", model="test:tiny")
    assert second.encoded == 0 and second.from_shared == 24
    # The throughput measured by the first build travels with the vectors.
    assert second.manifest["encoding"]["images"] == 24
    a, b = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    assert np.array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    assert (tmp_path / "embedding-cache" / "embeddings.sqlite").is_file()


def test_cache_can_be_turned_off(collection: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from embedsearch import build_index

    monkeypatch.setenv("EMBEDSEARCH_CACHE_DIR", "off")
    build_index(collection, out=tmp_path / "a", model="test:tiny")
    assert build_index(collection, out=tmp_path / "b", model="test:tiny").encoded == 24


def test_cache_evicts_least_recently_used_and_survives_concurrent_writers(tmp_path: Path
                                                                          ) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from embedsearch.store.shared import SharedCache

    dim = 16
    # Four processes writing at once (fork: cheap, the modules are already imported).
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_write_vectors, [(tmp_path / "c", w, dim) for w in range(4)]))
    cache = SharedCache(tmp_path / "c", "enc", dim, limit=10**9)
    assert len(cache) == 4 * 5 * 20
    # A limit of 50 vectors: the oldest go, the ones just read stay.
    small = SharedCache(tmp_path / "c", "enc", dim, limit=50 * dim * 4)
    assert set(small.get_many(["3-4-0", "3-4-1"])) == {"3-4-0", "3-4-1"}
    small.put_many(["new"], np.ones((1, dim), np.float32))
    assert len(small) <= 50
    assert set(small.get_many(["3-4-0", "3-4-1", "new", "0-0-0"])) == {"3-4-0", "3-4-1", "new"}


def _write_vectors(args: tuple[Path, int, int]) -> None:
    from embedsearch.store.shared import SharedCache

    root, w, dim = args
    cache = SharedCache(root, "enc", dim, limit=10**9)
    rng = np.random.default_rng(w)
    for b in range(5):
        cache.put_many([f"{w}-{b}-{i}" for i in range(20)], rng.random((20, dim), np.float32))


# -- no self-matches ---------------------------------------------------------------------------
def test_indexed_images_do_not_vote_for_themselves(collection: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import embedsearch.embed as embed_mod
    from embedsearch import build_index, load_bundle

    build_index(collection, out=tmp_path / "b", model="test:tiny")
    bundle = load_bundle(tmp_path / "b")
    paths = sorted(collection.rglob("*.jpg"))
    # Same picture, other bytes (padding after the JPEG's end): caught by the embedding.
    padded = tmp_path / "red_000_padded.jpg"
    padded.write_bytes((collection / "red" / "red_000.jpg").read_bytes() + b"\0" * 16)
    encoded: list[int] = []
    real = embed_mod.embed_sources
    monkeypatch.setattr(embed_mod, "embed_sources",
                        lambda enc, src, **kw: (encoded.append(len(src)), real(enc, src, **kw))[1])
    preds = Predictor(bundle).predict([*paths, padded], k=3)
    assert sum(encoded) == 1  # the indexed files reuse the bundle's vectors
    for p, path in zip(preds, paths, strict=False):
        own = path.relative_to(collection).as_posix()
        assert p.in_index["id"] == own and p.in_index["excluded"] >= 1
        assert own not in [n["id"] for n in p.neighbours]
        assert all(n["similarity"] < 0.9999 for n in p.neighbours)
    assert preds[-1].in_index["id"] == "red/red_000.jpg"
    # For search, the image itself may come first.
    searched = Predictor(bundle).predict(paths[:1], k=3, allow_self=True)[0]
    assert searched.neighbours[0]["id"] == paths[0].relative_to(collection).as_posix()
    assert searched.in_index["excluded"] == 0  # known, so no accuracy counts it


# -- evaluation output -------------------------------------------------------------------------
def test_predict_scores_honestly_and_writes_one_row_per_image(split_collection: Path,
                                                               tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedsearch.cli import main

    def run(*args: str) -> str:
        r = CliRunner().invoke(main, ["-q", *args])
        assert r.exit_code == 0, r.output + repr(r.exception)
        return r.output

    run("build-index", str(split_collection), "--name", "s", "--model", "test:tiny")
    run("train", "--index", "s", "--head", "linear")
    out = run("predict", str(split_collection / "val"), "--index", "s", "-k", "3",
              "--method", "all", "--per-class", "-o", str(tmp_path / "p.csv"),
              "--confusion", str(tmp_path / "c.png"))
    assert "6 queries were in the index: excluded from their own votes" in out
    knn_line = next(line for line in out.splitlines() if line.startswith("knn "))
    assert "balanced accuracy" in knn_line and "macro-F1" in knn_line and "on 6 images" in knn_line
    # The head was refit on train + val: it has no honest figure on val.
    assert "6 images it was trained on left out" in out
    assert "precision" in out and (tmp_path / "c.png").stat().st_size > 0
    df = pd.read_csv(tmp_path / "p.csv")
    assert len(df) == 6 and df["id"].is_unique
    assert {"id", "true", "predicted", "confidence", "knn_predicted", "knn_confidence",
            "head:linear_predicted"} <= set(df.columns)
    assert df["in_index"].str.startswith("val/").all()
    # Test images are not in the kNN reference: nothing excluded, the head is scored.
    out = run("predict", str(split_collection / "test"), "--index", "s", "--method", "all",
              "-o", str(tmp_path / "t.parquet"))
    assert "were in the index" not in out and "left out" not in out
    assert len(pd.read_parquet(tmp_path / "t.parquet")) == 9


# -- splits without traps -----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "split"), [
    ("train", "train"), ("sample_train", "train"), ("train2017", "train"), ("training", "train"),
    ("val", "val"), ("validation", "val"), ("imagenet-val", "val"), ("dev", "val"),
    ("sample_test", "test"), ("Test", "test"), ("devices", None), ("contest", None),
    ("train_test", None), ("dogs", None)])
def test_split_names_are_recognised_by_their_words(name: str, split: str | None) -> None:
    from embedsearch.data.scan import split_of

    assert split_of(name) == split
    assert split_of(name, {name: "test"}) == "test"


def test_published_folder_layouts_are_accepted(tmp_path: Path) -> None:
    from embedsearch import build_index
    from tests.conftest import make_collection

    posters = make_collection(tmp_path / "posters", splits={"sample_train": 4,
                                                            "sample_test": 2})
    res = build_index(posters, out=tmp_path / "p", model="test:tiny")
    assert res.manifest["counts"]["by_split"] == {"test": 6, "train": 12}
    assert res.manifest["index"]["reference_rows"] == 12
    # train + val only (Imagenette): val is held out, and the manifest says why.
    nette = make_collection(tmp_path / "nette", splits={"train": 4, "val": 2})
    res = build_index(nette, out=tmp_path / "n", model="test:tiny")
    assert res.manifest["index"]["reference_rows"] == 12
    assert res.manifest["index"]["held_out"]["splits"] == ["val"]
    assert "no test split" in res.manifest["index"]["held_out"]["why"]
    preds = Predictor(tmp_path / "n").predict(sorted((nette / "val").rglob("*.jpg")), k=3)
    assert not any(p.in_index for p in preds)  # val never voted, so nothing to exclude
    # Anything else: one option.
    other = make_collection(tmp_path / "other", splits={"fit": 4, "holdout": 2})
    res = build_index(other, out=tmp_path / "o", model="test:tiny",
                      split_map="fit=train,holdout=test")
    assert res.manifest["counts"]["by_split"] == {"test": 6, "train": 12}


def test_symlinked_split_folders_are_followed_when_asked(tmp_path: Path) -> None:
    from embedsearch.data.scan import scan
    from tests.conftest import make_collection

    store = make_collection(tmp_path / "store", splits={"train": 2, "test": 1})
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "test"):
        (root / split).symlink_to(store / split)
    (root / "train" / "red" / "again").symlink_to(root)  # a loop is still refused
    coll = scan(root, follow_symlinks=True)
    assert coll.splits == ["test", "train"] and len(coll.records) == 9
    assert {s.reason for s in coll.skipped} == {"symlink_loop"}
    with pytest.raises(Exception, match="no images found"):
        scan(root)  # not followed unless asked


def test_table_split_values(tmp_path: Path) -> None:
    from embedsearch.data.scan import scan
    from embedsearch.errors import InputError
    from tests.conftest import make_collection

    images = make_collection(tmp_path / "images", per_class=2)
    paths = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    splits = ["sample_train", "sample_test", "holdout", "extra", "sample_train", None]
    pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths],
                  "split": splits}).to_csv(images / "list.csv", index=False)
    with pytest.raises(InputError, match=r"'extra' \(1 rows\), 'holdout' \(1 rows\)"):
        scan(images / "list.csv")
    coll = scan(images / "list.csv", split_map="holdout=test,extra=train")
    assert [r.split for r in coll.records] == ["train", "test", "test", "train", "train", None]


def test_every_command_reuses_vectors_encoded_by_another(split_collection: Path,
                                                         tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedsearch.cli import main

    def run(*args: str) -> str:
        r = CliRunner().invoke(main, list(args))  # not quiet: the reuse lines are wanted
        assert r.exit_code in (0, 1), r.output + repr(r.exception)
        return r.output

    train, test = split_collection / "train", split_collection / "test"
    out = run("build-index", str(split_collection), "--name", "all", "--model", "test:tiny")
    assert "encoded  33 new" in out
    # Each side of leakage gets a bundle of its own: nothing is encoded again.
    out = run("leakage", str(train), str(test), "--model", "test:tiny")
    assert "encoded 0 images, reused 18 (18 from the shared embedding cache)" in out
    assert "encoded 0 images, reused 9 (9 from the shared embedding cache)" in out
    # A folder against an index: the index's vectors, the folder's from the cache.
    out = run("leakage", str(test), "--index", "all", "--no-html")
    assert "(9 byte-identical)" in out and "all:test/red/red_000.jpg" in out
    out = run("dedupe", str(train), "--model", "test:tiny", "--no-html")
    assert "encoded 0 images, reused 18" in out


def test_a_bundle_built_before_the_cache_lends_its_vectors(split_collection: Path,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from click.testing import CliRunner

    from embedsearch import build_index
    from embedsearch.cli import main

    monkeypatch.setenv("EMBEDSEARCH_CACHE_DIR", "off")
    build_index(split_collection, out=tmp_path / "old", model="test:tiny")
    monkeypatch.setenv("EMBEDSEARCH_CACHE_DIR", str(tmp_path / "fresh-cache"))
    r = CliRunner().invoke(main, ["dedupe", str(split_collection / "train"), "--index",
                                  str(tmp_path / "old"), "--no-html"])
    assert r.exit_code == 0, r.output
    assert "encoded 0 images, reused 18 (18 from the shared embedding cache)" in r.output
    r = CliRunner().invoke(main, ["leakage", str(split_collection / "test"), "--index",
                                  str(tmp_path / "old"), "--no-html"])
    assert r.exit_code == 0, r.output
    assert "encoded 0 images, reused 9 (9 from the shared embedding cache)" in r.output

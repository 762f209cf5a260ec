"""Items 8 and 9: kNN edge cases, and inputs with nothing usable in them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from embedsearch import build_index, load_bundle
from embedsearch.classify.knn import KNNClassifier
from embedsearch.cli import main
from embedsearch.errors import EmbedsearchError, EncoderError, InputError
from embedsearch.index import make_index, search
from embedsearch.predict import Predictor
from tests import badfiles
from tests.conftest import make_collection

TINY = "test:tiny"


def unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["-q", *args])
    return r.exit_code, r.output


# -- item 8: kNN edge cases --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_k_larger_than_the_index_returns_every_row_never_minus_one(kind: str) -> None:
    index, _ = make_index(unit(5), kind)
    neigh = search(index, unit(3, seed=1), k=50)
    for ids, sims in zip(neigh.ids, neigh.similarities, strict=True):
        assert sorted(ids.tolist()) == [0, 1, 2, 3, 4]
        assert (ids >= 0).all() and np.all(np.diff(sims) <= 1e-6)
    # Limited to a prefix of the index (reference rows): never a row past it.
    neigh = search(index, unit(2, seed=2), k=50, limit=2)
    assert all(sorted(i.tolist()) == [0, 1] for i in neigh.ids)


def test_k_larger_than_the_bundle_through_predict(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=2)
    build_index(images, out=tmp_path / "b", model=TINY)
    code, out = cli("predict", str(images / "red" / "red_000.jpg"), "--index",
                    str(tmp_path / "b"), "-k", "1000", "-n", "1000", "--json")
    assert code == 0, out
    row = json.loads(out.splitlines()[0])
    # Every other image once; the query itself (indexed) never is its own neighbour.
    assert len(row["neighbours"]) == 5 and len({n["id"] for n in row["neighbours"]}) == 5
    assert "red/red_000.jpg" not in {n["id"] for n in row["neighbours"]}
    assert row["label"] == "red"
    code, out = cli("predict", str(images / "red" / "red_000.jpg"), "--index",
                    str(tmp_path / "b"), "-k", "0")
    assert code != 0 and "Traceback" not in out
    assert "k must be at least 1" in out or "0 is not in the range x>=1" in out


def test_one_class_index(tmp_path: Path, queries: dict[str, Path]) -> None:
    images = make_collection(tmp_path / "images", per_class=4, classes=("red",))
    build_index(images, out=tmp_path / "b", model=TINY)
    preds = Predictor(tmp_path / "b").predict([queries["blue"], queries["red"]], k=3)
    assert [p.label for p in preds] == ["red", "red"]
    assert all(p.confidence == 1.0 and p.probabilities == {"red": 1.0} for p in preds)
    clf = KNNClassifier(3).fit(unit(4), ["only"] * 4)
    assert clf.predict(unit(2, seed=3)).tolist() == ["only", "only"]
    assert clf.predict_proba(unit(2, seed=3)).tolist() == [[1.0], [1.0]]


def test_empty_index() -> None:
    index, info = make_index(np.zeros((0, 8), np.float32))
    assert info["ntotal"] == 0
    neigh = search(index, unit(2), k=5)
    assert [len(i) for i in neigh.ids] == [0, 0]
    with pytest.raises(EmbedsearchError, match="zero labelled vectors"):
        KNNClassifier(3).fit(np.zeros((0, 8), np.float32), [])


def test_bundle_whose_rows_are_all_held_out(tmp_path: Path, queries: dict[str, Path]) -> None:
    # Only test/ images: a valid bundle with zero reference rows for the classifier.
    images = make_collection(tmp_path / "images", splits={"test": 2})
    build_index(images, out=tmp_path / "b", model=TINY)
    b = load_bundle(tmp_path / "b")
    assert b.reference_rows == 0
    with pytest.raises(EmbedsearchError, match="no reference images"):
        Predictor(b).predict([queries["red"]])
    code, out = cli("predict", str(queries["red"]), "--index", str(tmp_path / "b"))
    assert code != 0 and "Traceback" not in out and "all 6 are held-out test images" in out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_vectors_are_refused(bad: float) -> None:
    x = unit(4)
    x[1, 2] = bad
    with pytest.raises(EmbedsearchError, match="NaN or infinite"):
        make_index(x)
    with pytest.raises(EmbedsearchError, match="NaN or infinite"):
        KNNClassifier(2).fit(x, list("abab"))
    index, _ = make_index(unit(4))
    with pytest.raises(EmbedsearchError, match="NaN or infinite"):
        search(index, x, k=2)


def test_dimension_mismatch_is_explained() -> None:
    index, _ = make_index(unit(4, d=8))
    with pytest.raises(EmbedsearchError, match=r"shape \(2, 16\).*8-d"):
        search(index, unit(2, d=16), k=2)


def test_encoder_producing_nan_stops_with_a_clear_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import embedsearch_test_encoders as fam

    images = make_collection(tmp_path / "images", per_class=2)
    monkeypatch.setattr(fam.TinyEncoder, "_forward",
                        lambda self, batch: batch.flatten(1)[:, :64] * float("nan"))
    code, out = cli("build-index", str(images), "--out", str(tmp_path / "b"), "--model", TINY)
    assert code == 3 and "NaN or infinite" in out and "Traceback" not in out


# -- item 9: nothing usable in the input -------------------------------------------------
def assert_clean_failure(args: list[str], exit_code: int, *needles: str) -> None:
    code, out = cli(*args)
    assert code == exit_code, out
    assert "Traceback" not in out and out.startswith("error:")
    for needle in needles:
        assert needle in out, out
    # --debug shows the traceback (the exception propagates out of the command).
    r = CliRunner().invoke(main, ["-q", "--debug", *args])
    assert r.exit_code != 0 and isinstance(r.exception, EmbedsearchError)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_clean_failure(["build-index", str(tmp_path / "empty"), "--model", TINY], 2,
                         "no images found", "supported formats")


def test_folder_without_images(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "readme.txt").write_text("hello")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (folder / ".hidden.jpg").write_bytes(badfiles.good_jpeg())
    assert_clean_failure(["build-index", str(folder), "--model", TINY], 2, "no images found")


def test_folder_with_only_skipped_files_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "svg"
    folder.mkdir()
    (folder / "a.svg").write_bytes(badfiles.SVG)
    assert_clean_failure(["build-index", str(folder), "--model", TINY], 2,
                         "no images found", "1 unsupported_format")


def test_missing_data_path(tmp_path: Path) -> None:
    assert_clean_failure(["build-index", str(tmp_path / "nope"), "--model", TINY], 2,
                         "no such file or folder")


def test_csv_pointing_at_missing_files(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=1)
    csv = images / "list.csv"
    pd.DataFrame({"path": ["red/red_000.jpg", "red/gone.jpg", "/abs/missing.png"],
                  "label": ["r", "r", "x"]}).to_csv(csv, index=False)
    assert_clean_failure(["build-index", str(csv), "--model", TINY, "--out",
                          str(tmp_path / "b")], 2,
                         "2 of 3 listed images do not exist", "red/gone.jpg",
                         "/abs/missing.png", "--skip-missing")
    code, out = cli("build-index", str(csv), "--model", TINY, "--out", str(tmp_path / "b"),
                    "--skip-missing")
    assert code == 0 and "1 embedded, 2 skipped" in out
    reasons = load_bundle(tmp_path / "b").failures["reason"].tolist()
    assert reasons == ["missing_file", "missing_file"]


def test_csv_where_every_file_is_missing(tmp_path: Path) -> None:
    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": ["a.jpg", "b.jpg"]}).to_csv(csv, index=False)
    assert_clean_failure(["build-index", str(csv), "--model", TINY, "--skip-missing"], 2,
                         "lists no existing images")


def test_csv_with_unknown_columns(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=1)
    csv = images / "list.csv"
    pd.DataFrame({"picture": ["red/red_000.jpg"], "kind": ["r"]}).to_csv(csv, index=False)
    assert_clean_failure(["build-index", str(csv), "--model", TINY], 2,
                         "cannot tell which column holds the image paths", "picture",
                         "--path-col")
    assert_clean_failure(["build-index", str(csv), "--model", TINY, "--path-col", "picture",
                          "--label-col", "genre"], 2,
                         "no column 'genre' for the label", "--label-col")
    code, out = cli("build-index", str(csv), "--model", TINY, "--path-col", "picture",
                    "--label-col", "kind", "--out", str(tmp_path / "b"))
    assert code == 0, out


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage\x00" * 20,
                                     b'path\n"unterminated\n'])
def test_unreadable_csv(tmp_path: Path, content: bytes) -> None:
    csv = tmp_path / "list.csv"
    csv.write_bytes(content)
    code, out = cli("build-index", str(csv), "--model", TINY)
    assert code == 2, out
    assert "Traceback" not in out and str(csv) in out


def test_predict_on_an_empty_folder_and_a_missing_file(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=1)
    build_index(images, out=tmp_path / "b", model=TINY)
    (tmp_path / "q").mkdir()
    code, out = cli("predict", str(tmp_path / "q"), "--index", str(tmp_path / "b"))
    assert code != 0 and "no images found" in out and "Traceback" not in out
    code, out = cli("predict", str(tmp_path / "nope.jpg"), "--index", str(tmp_path / "b"))
    assert code != 0 and "no such file" in out and "Traceback" not in out


def test_unknown_encoder_and_missing_weights(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=1)
    assert_clean_failure(["build-index", str(images), "--model", "nope:thing"], 3,
                         "unknown encoder", "efficientnet-lite0")
    code, out = cli("build-index", str(images), "--model", "torchvision:mobilenet_v2",
                    "--weights", str(tmp_path / "missing.safetensors"))
    assert code != 0 and "missing.safetensors" in out and "Traceback" not in out


def test_library_raises_input_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        build_index(tmp_path / "empty", model=TINY)
    with pytest.raises(EncoderError):
        from embedsearch.encoders import load_encoder

        load_encoder(TINY, weights=__file__)

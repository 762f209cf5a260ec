"""Augmented views: embedded once at build time, verified, reused, used by heads; TTA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from embedsearch.bundle import load_bundle
from embedsearch.cli import main
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.pipeline import build_index
from embedsearch.predict import Predictor
from embedsearch.query import embed_paths
from embedsearch.training import fit_head
from embedsearch.views import bundle_views, parse_views

TINY = "test:tiny"


def test_parse_views() -> None:
    assert parse_views("flip,crop2") == ["flip", "crop1", "crop2"]
    assert parse_views("crop1, flip, crop1") == ["crop1", "flip"]
    assert parse_views(None) == parse_views("none") == []
    with pytest.raises(EmbedsearchError, match="unknown view 'rotate'"):
        parse_views("flip,rotate")


def test_views_are_stored_verified_and_reused(split_collection: Path) -> None:
    res = build_index(split_collection, name="c", model=TINY, views="flip,crop2")
    m = res.manifest
    # 6 training images x 3 classes, 3 views each; validation and test images get none.
    assert m["views"]["rows"] == 54 and m["views"]["images"] == 18 and res.views_encoded == 54
    assert {"views", "view_items"} <= set(m["roles"])
    assert all(m["roles"][r] in m["files"] for r in ("views", "view_items"))
    b = load_bundle("c")
    X, labels, rows = bundle_views(b)
    assert X.shape == (54, b.dim) and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    assert (b.items["split"].to_numpy()[rows] == "train").all()
    assert (b.items["label"].to_numpy()[rows] == labels).all()
    # Views differ from their image's own embedding (flip: for most images), yet stay close.
    sims = (X * np.asarray(b.embeddings)[rows]).sum(1)
    assert (sims < 0.99999).mean() > 0.5 and sims.min() > 0.5

    # Rebuilding without --views keeps them (sticky) and re-encodes none; same vectors.
    again = build_index(split_collection, name="c", model=TINY)
    assert again.views_encoded == 0 and again.manifest["views"]["rows"] == 54
    X2, _, rows2 = bundle_views(load_bundle("c"))
    order = np.lexsort((rows, np.arange(len(rows)) % 3))
    order2 = np.lexsort((rows2, np.arange(len(rows2)) % 3))
    assert np.array_equal(X[order], X2[order2])
    # A second bundle of the same files gets bit-identical crops (seeded per file).
    other = build_index(split_collection, out=Path("other"), model=TINY, views="flip,crop2")
    assert other.manifest["files"][other.manifest["roles"]["views"]]["sha256"] == \
        m["files"][m["roles"]["views"]]["sha256"]

    # Tampering is refused like any bundle file; --views none drops them.
    vfile = b.path / again.manifest["roles"]["views"]
    data = bytearray(vfile.read_bytes())
    data[-1] ^= 0xFF
    vfile.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match manifest"):
        load_bundle("c")
    # --overwrite re-encodes everything, views included, and keeps the choice.
    fresh = build_index(split_collection, name="c", model=TINY, overwrite=True)
    assert fresh.views_encoded == 54 and fresh.manifest["views"]["spec"] == "flip,crop1,crop2"
    dropped = build_index(split_collection, name="c", model=TINY, views="none")
    assert "views" not in dropped.manifest and "views" not in dropped.manifest["roles"]
    assert not list((b.path / "data").glob("view*"))


def test_heads_train_on_views_unless_told_not_to(split_collection: Path) -> None:
    build_index(split_collection, name="c", model=TINY, views="flip,crop1")
    b = load_bundle("c")
    res = fit_head(b, "linear", extra_train=bundle_views(b), save=False)
    assert res.head.info["trained_on"]["extra_rows"] == 36
    runner = CliRunner()
    out = runner.invoke(main, ["train", "--index", "c", "--head", "mlp", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["validation"]["n"] == 6
    assert "36 extra views" in runner.invoke(main, ["train", "--index", "c"]).output
    plain = runner.invoke(main, ["train", "--index", "c", "--no-views", "--head-name", "p"])
    assert plain.exit_code == 0 and "extra views" not in plain.output


def test_tta_flip_averages_with_the_mirror_image(split_collection: Path,
                                                 tmp_path: Path) -> None:
    build_index(split_collection, name="c", model=TINY)
    b = load_bundle("c")
    image = Image.open(next((split_collection / "test").rglob("*.jpg"))).convert("RGB")
    src, mirror = tmp_path / "query.png", tmp_path / "mirror.png"  # lossless: same pixels
    image.save(src)
    ImageOps.mirror(image).save(mirror)
    plain = embed_paths(b, [src, mirror])[0]
    tta = embed_paths(b, [src], tta="flip")[0][0]
    expect = plain.sum(0) / np.linalg.norm(plain.sum(0))
    assert np.allclose(tta, expect, atol=1e-5) and not np.allclose(tta, plain[0], atol=1e-3)
    out = CliRunner().invoke(main, ["predict", str(src), "--index", "c", "--tta", "flip"])
    assert out.exit_code == 0, out.output
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")  # a batch with nothing decodable still answers, with its reason
    assert Predictor(b).predict([empty], tta="flip")[0].status == "empty_file"


def test_benchmark_adds_heads_trained_with_views(tmp_path: Path) -> None:
    from tests.test_report import make_data

    data = make_data(tmp_path / "d", {"train": 6, "val": 2, "test": 3})
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["-q", "benchmark", str(data), "--model", TINY, "--out",
                                  str(out), "--k", "1,3", "--no-zero-shot", "--workers", "0",
                                  "--views", "flip,crop1"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    (enc,) = res["encoders"]
    n_train = res["splits"]["folds"][0]["train"]
    for mid in ("linear", "mlp"):
        plain, viewed = enc["methods"][mid], enc["methods"][f"{mid}-views"]
        assert plain["selection"]["trained_on"]["extra_rows"] == 0
        # Two views of every training image, none of the validation or test images.
        assert viewed["selection"]["trained_on"]["extra_rows"] == 2 * n_train
        assert viewed["name"] == f"{'linear' if mid == 'linear' else 'MLP'} head + views"
    assert res["call"]["views"] == "flip,crop1" and "linear head + views" in r.output

"""Benchmark reports on generated collections: completeness, independent scikit-learn
checks of every figure, valid PNGs, escaping, duplicate handling and determinism."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from embedsearch.report import metrics as M
from embedsearch.report.splits import connected_groups, group_split, plan_splits

#: Confusable colour classes (pairs of close hues), so every method makes some mistakes.
#: One name needs escaping in HTML and Markdown.
CLASSES = {"red": (200, 50, 40), "orange": (205, 115, 40), "blue": (40, 70, 200),
           "navy & <dark>|": (45, 45, 140)}
KS = (1, 3, 10, 30, 100)
FAST = {"mlp": {"max_epochs": 12, "hidden": 64}}


def draw(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(colour, np.float32) + rng.normal(0, 38, 3)  # per-image colour jitter
    arr = np.clip(base + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    x, y = rng.integers(0, 40, 2)
    r = int(rng.integers(8, 24))
    d.rectangle([x, y, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def make_data(root: Path, splits: dict[str, int] | None = None, per_class: int = 20,
              seed0: int = 0) -> Path:
    seed = seed0
    for split, n in (splits or {"": per_class}).items():
        for cls, colour in CLASSES.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                draw(colour, seed).save(folder / f"img_{i:03d}.jpg", quality=90)
    return root


class FakeTextEncoder:
    """Stands in for a CLIP text tower: the prompt embedding of a class is the mean colour
    feature of the class seen through the test encoder, so zero-shot is far from random."""

    supports_text = True

    def __init__(self) -> None:
        from embedsearch.encoders import load_encoder

        self.enc = load_encoder("test:tiny")
        self.dim = self.enc.dim

    def identity(self) -> dict[str, Any]:
        return {**self.enc.identity(), "supports_text": True}

    def encode_text(self, texts: list[str]) -> np.ndarray:
        out = []
        for t in texts:
            name = next(c for c in sorted(CLASSES, key=len, reverse=True)
                        if c.replace("_", " ") in t or c in t)
            img = Image.new("RGB", (64, 64), CLASSES[name])
            out.append(self.enc.encode_images([img])[0])
        return np.asarray(out, np.float32)


def fake_zero_shot(enc: Any, classes: list[str]) -> tuple[Any, float]:
    from embedsearch.classify.zeroshot import ZeroShotClassifier

    clf = ZeroShotClassifier(FakeTextEncoder(), classes, names={c: c for c in classes})  # type: ignore[arg-type]
    return clf.fit(), 0.01


def run(data: Path, out: Path, bundles: Path, **kw: Any) -> Any:
    from embedsearch.report import run_benchmark

    # The generated images are all distinct, but the hand-made test encoder sees many as
    # near-identical below ~0.99; real encoders use the dedupe default.
    args: dict[str, Any] = {"ks": KS, "seed": 0, "n_bootstrap": 300, "head_options": FAST,
                            "num_workers": 0, "gallery_size": 8, "command": ["pytest"],
                            "near_duplicate_threshold": 0.999}
    args.update(kw)
    return run_benchmark(data, ["test:tiny"], out=out, bundles=bundles, **args)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("study")
    data = make_data(root / "data", {"train": 14, "val": 5, "test": 8})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("embedsearch.report.methods._zero_shot", fake_zero_shot)
        result = run(data, root / "out", root / "bundles")
    return {"root": root, "data": data, "result": result,
            "results": json.loads(result.json.read_text())}


def drop_timings(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k != "timings"}


# -- completeness ---------------------------------------------------------------------------
def test_report_has_every_method_and_metric(study: dict[str, Any]) -> None:
    res = study["results"]
    (enc,) = res["encoders"]
    ks = res["splits"]["ks_evaluated"]
    assert ks == [1, 3, 10, 30], "k=100 exceeds the 76 reference images and is skipped"
    assert any("k = 100 skipped" in n for n in res["splits"]["notes"])
    expected = {"majority", "knn", "linear", "mlp", "zeroshot",
                *(f"knn-{k}-{v}" for k in ks for v in ("plain", "weighted"))}
    assert set(enc["methods"]) == expected
    classes = sorted(CLASSES)
    assert res["dataset"]["classes"] == classes
    for mid, m in enc["methods"].items():
        fig = m["metrics"]
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            lo, hi = fig["ci"][key]
            assert 0 <= lo <= fig[key] <= hi <= 1, (mid, key)
        assert set(fig["per_class"]) == set(classes)
        for c in classes:
            assert set(fig["per_class"][c]) >= {"precision", "recall", "f1", "support"}
        timing = res["timings"]["encoders"][enc["slug"]]["methods"][mid]
        assert set(timing) == {"fit_seconds", "predict_ms_per_image_batched",
                               "predict_ms_per_image_single"}
        assert m["model_bytes"] >= 0
    # kNN index size: reference vectors × dim × 4 bytes.
    assert enc["methods"]["knn-1-plain"]["model_bytes"] == 4 * 19 * 4 * enc["identity"]["dim"]
    enc_t = res["timings"]["encoders"][enc["slug"]]["encode"]
    assert enc_t["measured_now"] and enc_t["images"] == 4 * 27 and enc_t["images_per_second"] > 0
    # Some mistakes exist, so the comparison and gallery are not vacuous.
    assert enc["methods"]["knn-1-plain"]["metrics"]["accuracy"] < 1.0
    assert {c["a"] for c in res["comparisons"]} == {"linear", "mlp", "zeroshot"}
    prov = res["environment"]
    assert prov["packages"]["numpy"] == np.__version__
    assert prov["machine"]["logical_cores"] >= 1 and prov["machine"]["cpu"]
    assert "revision" in prov["git"]
    assert re.fullmatch(r"[0-9a-f]{64}", res["dataset"]["fingerprint"])
    assert res["command"] == "pytest"
    assert enc["identity"]["spec"] == "test:tiny"


def test_metrics_match_an_independent_sklearn_computation(study: dict[str, Any]) -> None:
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    res = study["results"]
    preds = res["predictions"]
    y_true = preds["y_true"]
    classes = res["dataset"]["classes"]
    # The test set is the collection's test folder, as published.
    data = study["data"]
    on_disk = sorted(p.relative_to(data).as_posix() for p in (data / "test").rglob("*.jpg"))
    assert preds["ids"] == on_disk
    assert y_true == [i.split("/")[1] for i in on_disk]
    (enc,) = res["encoders"]
    for mid, m in enc["methods"].items():
        y_pred = preds[enc["slug"]][mid]["y_pred"]
        fig = m["metrics"]
        assert fig["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
        assert fig["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y_true, y_pred), abs=1e-12)
        assert fig["macro_f1"] == pytest.approx(
            f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                     zero_division=0)
        for i, c in enumerate(classes):
            pc = fig["per_class"][c]
            assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx(
                (p[i], r[i], f[i], s[i]), abs=1e-12), (mid, c)
        assert fig["confusion"] == confusion_matrix(y_true, y_pred, labels=classes).tolist()
    # Majority baseline = scikit-learn's most-frequent dummy fitted on train + val.
    ref = [p.parent.name for p in sorted(data.rglob("*.jpg")) if p.parts[-3] != "test"]
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(ref), 1)), ref)
    assert preds[enc["slug"]]["majority"]["y_pred"] == list(dummy.predict(
        np.zeros((len(y_true), 1))))
    # The k sweep table is the same numbers.
    sweep = enc["k_sweep"]["weighted"]
    assert sweep["accuracy"] == [enc["methods"][f"knn-{k}-weighted"]["metrics"]["accuracy"]
                                 for k in sweep["k"]]


def test_knn_predictions_match_brute_force(study: dict[str, Any]) -> None:
    """The kNN rows equal a plain numpy cosine kNN over the bundle's embeddings."""
    from embedsearch.bundle import load_bundle

    res, result = study["results"], study["result"]
    (enc,) = res["encoders"]
    b = load_bundle(result.bundles[enc["slug"]])
    items = b.items.reset_index(drop=True)
    X = np.asarray(b.embeddings, np.float64)
    pos = {i: n for n, i in enumerate(items["id"])}
    ref = [n for n, s in enumerate(items["split"]) if s != "test"]
    test = [pos[i] for i in res["predictions"]["ids"]]
    sims = X[test] @ X[ref].T
    labels = items["label"].to_numpy()[ref]
    for k in (1, 10):
        nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        expect = []
        for row in nn:
            vals, counts = np.unique(labels[row], return_counts=True)
            expect.append(vals[np.argmax(counts)])
        got = res["predictions"][enc["slug"]][f"knn-{k}-plain"]["y_pred"]
        agree = np.mean(np.array(got) == np.array(expect))
        assert agree >= 0.95, (k, agree)  # ties may break differently


def test_bootstrap_matches_sklearn_on_each_resample() -> None:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    t = rng.integers(0, 4, 60)
    p = np.where(rng.random(60) < 0.6, t, rng.integers(0, 4, 60))
    samples = M.resampled_metrics(t, p, 4, seed=11, n_boot=40)
    idx = np.concatenate(list(M.bootstrap_indices(60, 11, 40)))
    for b in range(40):
        tt = [labels[i] for i in t[idx[b]]]
        pp = [labels[i] for i in p[idx[b]]]
        assert samples["accuracy"][b] == pytest.approx(np.mean(np.array(tt) == np.array(pp)))
        assert samples["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(tt, pp))
        assert samples["macro_f1"][b] == pytest.approx(
            f1_score(tt, pp, average="macro", zero_division=0))
    fig, _ = M.evaluate([labels[i] for i in t], [labels[i] for i in p], labels, seed=11,
                        n_boot=40)
    assert fig["ci"]["accuracy"] == pytest.approx(list(np.percentile(samples["accuracy"],
                                                                     [2.5, 97.5])))


# -- pictures and documents -------------------------------------------------------------------
def test_figures_are_valid_pngs_and_embedded_in_html(study: dict[str, Any]) -> None:
    res, out = study["results"], study["result"].out
    (enc,) = res["encoders"]
    pngs = [res["figures"]["methods"], res["figures"]["k_sweep"],
            *enc["figures"]["confusion"].values(), *enc["figures"]["mistakes"].values()]
    assert set(enc["figures"]["confusion"]) == {"majority", "knn-1-plain", "knn", "linear",
                                                "mlp", "zeroshot"}
    assert set(enc["figures"]["mistakes"]) == {"knn", "linear", "mlp", "zeroshot"}
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for rel in pngs:
        path = out / rel
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, rel
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 300 and im.height >= 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10, f"{rel} looks blank"
        assert f"({rel})" in md.replace("<", "").replace(">", "")
        assert base64.b64encode(data).decode() in page
    # Self-contained: no external resource is referenced.
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    assert "<script" not in page and "<link" not in page


def test_report_text_is_escaped_and_complete(study: dict[str, Any]) -> None:
    out = study["result"].out
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "navy &amp; &lt;dark&gt;|" in page and "<dark>" not in page
    assert r"navy & \<dark\>\|" in md
    for text in ("majority class", "chosen on val", "linear head", "MLP head",
                 "CLIP zero-shot", "balanced accuracy", "macro-F1", "95 % CI",
                 "Most confident mistakes", "Per-class precision"):
        assert text in md and text in page, text
    # The Markdown tables keep their column count despite the pipe in a class name.
    for line in md.splitlines():
        if line.startswith("| navy"):
            assert line.count(" | ") == 4
    splits = list(csv.DictReader(io.StringIO((out / "splits.csv").read_text())))
    assert len(splits) == 4 * 27
    res = study["results"]
    digest = hashlib.sha256((out / "splits.csv").read_bytes()).hexdigest()
    assert res["splits"]["assignment"]["sha256"] == digest


def test_fixed_seed_gives_identical_results_json(study: dict[str, Any], tmp_path: Path
                                                 ) -> None:
    """Same seed → the same results.json apart from timings, also when the second run
    reuses the bundle instead of encoding."""
    root = study["root"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("embedsearch.report.methods._zero_shot", fake_zero_shot)
        again = run(study["data"], tmp_path / "out2", root / "bundles")
    second = json.loads(again.json.read_text())
    assert second["timings"]["encoders"]["test-tiny"]["encode"]["measured_now"] is False
    # The throughput measured when the vectors were encoded still shows (from the manifest).
    assert second["timings"]["encoders"]["test-tiny"]["encode"]["images_per_second"] > 0
    assert drop_timings(second) == drop_timings(study["results"])
    assert (tmp_path / "out2" / "splits.csv").read_bytes() == \
        (study["result"].out / "splits.csv").read_bytes()


# -- splits and duplicates --------------------------------------------------------------------
def test_own_split_keeps_duplicates_together_and_cv(tmp_path: Path) -> None:
    data = make_data(tmp_path / "flat", per_class=16)
    copies = []
    for i, cls in enumerate(sorted(CLASSES)):
        for j in range(3):
            src = data / cls / f"img_{j:03d}.jpg"
            dst = data / cls / f"copy_{j}.jpg"
            shutil.copy(src, dst)
            copies.append((f"{cls}/img_{j:03d}.jpg", f"{cls}/copy_{j}.jpg"))
        if i == 0:  # a file three times
            shutil.copy(data / cls / "img_000.jpg", data / cls / "copy_x.jpg")
    result = run(data, tmp_path / "out", tmp_path / "bundles", heads=(), zero_shot=False,
                 ks=(1, 5), near_duplicate_threshold=None)
    res = result.results
    role = {r["id"]: r["split"] for r in csv.DictReader(
        io.StringIO((result.out / "splits.csv").read_text()))}
    for a, b in copies:
        assert role[a] == role[b], (a, b)
    assert role["blue/copy_x.jpg"] == role["blue/img_000.jpg"]
    dup = res["splits"]["duplicates"]
    # 12 pairs + one triple of byte-identical files (look-alikes may join some groups).
    assert dup["exact_pairs"] == len(copies) + 1
    assert dup["images_in_groups"] >= 2 * len(copies) + 1 and dup["groups"] >= 2
    assert dup["straddling_groups"] == 0
    if importlib.util.find_spec("embedsearch.dedupe") is not None:
        # Look-alikes of the weak test encoder chain at the default threshold: it was
        # raised until groups stay plausible, and that is reported.
        assert dup["largest_group"] <= dup["max_plausible_group"] == 10
        assert dup["near_threshold"] > 0.9 and dup["near_notes"]
        # calibrated as dedupe does (no fixed 0.90 start), with its evidence recorded
        assert dup["near_threshold_source"] == "calibrated"
        assert dup["near_calibration"]["images"] == 4 * 16 + len(copies) + 1
        assert "calibrated" in dup["near_notes"][0]
        assert "calibrated on" in (result.out / "report.md").read_text()
    counts = res["splits"]["folds"][0]
    n = 4 * 16 + len(copies) + 1
    assert counts["train"] + counts["val"] + counts["test"] == n
    assert 0.6 * n < counts["train"] < 0.8 * n and counts["test"] > 0.1 * n
    assert "stratified" in res["splits"]["protocol"]

    cv = run(data, tmp_path / "cv", tmp_path / "bundles", heads=("linear",), zero_shot=False,
             ks=(1, 5), cv_folds=3)
    r = cv.results
    assert len(r["predictions"]["ids"]) == n  # every image is a test image exactly once
    assert sorted(set(r["predictions"]["fold"])) == [0, 1, 2]
    folds = {x["id"]: int(x["test_fold"]) for x in csv.DictReader(
        io.StringIO((cv.out / "splits.csv").read_text()))}
    for a, b in copies:
        assert folds[a] == folds[b]
    assert "linear" in r["encoders"][0]["methods"]


def test_published_split_with_leakage_is_repaired(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d", {"train": 10, "test": 5})
    leaks = ["red/img_000.jpg", "blue/img_001.jpg"]
    for rel in leaks:  # a test image also sits in train
        shutil.copy(data / "test" / rel, data / "train" / rel.replace("img_", "leak_"))
    result = run(data, tmp_path / "out", tmp_path / "bundles", heads=("linear",),
                 zero_shot=False, ks=(1, 5))
    res = result.results
    dup = res["splits"]["duplicates"]
    assert dup["straddling_groups"] == 2 and dup["removed_from_train_val"] == 2
    role = {r["id"]: r["split"] for r in csv.DictReader(
        io.StringIO((result.out / "splits.csv").read_text()))}
    for rel in leaks:
        assert role["test/" + rel] == "test"
        assert role["train/" + rel.replace("img_", "leak_")] == "excluded"
    # No validation folder: validation carved from train.
    f = res["splits"]["folds"][0]
    assert f["val"] > 0 and f["test"] == 4 * 5
    assert any("no validation split" in n for n in res["splits"]["notes"])


def test_group_split_and_connected_groups_units() -> None:
    groups = connected_groups(6, [(0, 3), (3, 5)])
    assert groups.tolist() == [0, 1, 2, 0, 4, 0]
    labels = np.array(["a"] * 50 + ["b"] * 10)
    g = np.arange(60)
    g[1:5] = 0  # one group of five "a"
    tr, va, te = group_split(labels, g, np.arange(60), (0.7, 0.15, 0.15), seed=1)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(60))
    for part in (tr, va, te):
        assert set(range(5)) <= set(part.tolist()) or not set(range(5)) & set(part.tolist())
        assert np.sum(labels[part] == "b") >= 1  # stratified: each part has the rare class
    plan = plan_splits(labels, np.array([""] * 60), g, seed=1)
    plan2 = plan_splits(labels, np.array([""] * 60), g, seed=1)
    assert plan.folds[0].test.tolist() == plan2.folds[0].test.tolist()


# -- CLI and imports --------------------------------------------------------------------------
def test_cli_benchmark(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedsearch.cli import main

    data = make_data(tmp_path / "d", {"train": 6, "val": 2, "test": 3})
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["-q", "benchmark", str(data), "--model", "test:tiny",
                                  "--out", str(out), "--k", "1,3", "--no-heads",
                                  "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "majority class" in r.output and "chosen on val" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["call"]["ks"] == [1, 3] and (out / "report.html").is_file()
    bad = CliRunner().invoke(main, ["benchmark", str(data), "--k", "1,x"])
    assert bad.exit_code != 0 and "comma-separated" in bad.output


def test_cli_benchmark_concatenation_beside_its_part(tmp_path: Path) -> None:
    """``--model A+B`` puts a concatenation (parts of different input sizes) in the same
    report as a single encoder; --finetune refuses a concatenation as the first encoder."""
    from click.testing import CliRunner

    from embedsearch.cli import main

    data = make_data(tmp_path / "d", {"train": 6, "val": 2, "test": 3})
    out = tmp_path / "rep"
    both = "test:tiny+efficientnet-lite0"
    r = CliRunner().invoke(main, ["-q", "benchmark", str(data), "--model", "test:tiny",
                                  "--model", both, "--out", str(out), "--k", "1,3",
                                  "--no-heads", "--workers", "0"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert [e["spec"] for e in res["encoders"]] == ["test:tiny", both]
    assert res["encoders"][1]["identity"]["spec"] == "concat:" + both
    assert both in (out / "report.md").read_text()
    bad = CliRunner().invoke(main, ["benchmark", str(data), "--model", both, "--finetune",
                                    "--out", str(tmp_path / "rep2")])
    assert bad.exit_code != 0 and "put a single encoder first" in bad.output


def test_importing_report_is_light() -> None:
    code = ("import sys, embedsearch.report, embedsearch.report.study; "
            "heavy = [m for m in ('torch', 'faiss', 'matplotlib', 'sklearn', 'pandas') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Trained heads (linear, MLP) on cached embeddings, CLIP zero-shot, and method choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch import build_index, load_bundle
from embedsearch.classify.heads import LinearHead, MLPHead
from embedsearch.cli import main
from embedsearch.errors import BundleError, BundleMismatchError, EmbedsearchError
from embedsearch.head_store import load_bundle_head, load_head, write_head
from embedsearch.predict import Predictor
from embedsearch.training import fit_head
from tests.conftest import COLOURS, draw_image

TINY = "test:tiny"


def blobs(n_per_class: tuple[int, ...], spread: float, seed: int, dim: int = 32,
          flip: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around random unit centres, as unit vectors (like embeddings);
    ``flip`` relabels that fraction of rows at random (label noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per_class), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    X = np.vstack([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, n_per_class,
                                                                          strict=True)])
    y = np.repeat([f"c{i}" for i in range(len(n_per_class))], n_per_class)
    if flip:
        noisy = rng.random(len(y)) < flip
        y[noisy] = rng.choice(np.unique(y), noisy.sum())
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


def split(X: np.ndarray, y: np.ndarray, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Shuffle and cut 60/20/20 into train/val/test."""
    order = np.random.default_rng(seed).permutation(len(y))
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    tr, va, te = order[:a], order[a:b], order[b:]
    return X[tr], y[tr], X[va], y[va], X[te], y[te]


HEADS = [LinearHead, lambda **kw: MLPHead(hidden=64, **kw)]


@pytest.mark.parametrize("make", HEADS, ids=["linear", "mlp"])
def test_separable_problem_is_learnt_perfectly(make) -> None:
    X, y = blobs((60, 60, 60), spread=0.05, seed=0)
    Xtr, ytr, Xva, yva, Xte, yte = split(X, y)
    head = make().fit(Xtr, ytr, Xva, yva)
    assert list(head.classes_) == ["c0", "c1", "c2"]
    assert (head.predict(Xte) == yte).all()
    proba = head.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    # Columns follow classes_: the column of the true class is the largest.
    assert (head.classes_[proba.argmax(1)] == yte).all()
    assert head.info["validation"]["accuracy"] == 1.0


@pytest.mark.parametrize("make", HEADS, ids=["linear", "mlp"])
def test_noisy_problem_better_than_chance_not_perfect(make) -> None:
    X, y = blobs((150, 150, 150), spread=0.25, seed=3, flip=0.25)
    Xtr, ytr, Xva, yva, Xte, yte = split(X, y)
    head = make().fit(Xtr, ytr, Xva, yva)
    acc = float(np.mean(head.predict(Xte) == yte))
    # Chance is 1/3; a quarter of the labels were redrawn at random, so ~0.83 is the ceiling.
    assert 0.65 < acc < 0.9, acc
    assert 0.65 < head.info["validation"]["accuracy"] < 0.9


def test_linear_head_matches_scikit_learn() -> None:
    """C is LogisticRegression's C on standardised inputs (the standardisation folded in)."""
    from sklearn.linear_model import LogisticRegression

    X, y = blobs((80, 50, 70), spread=0.7, seed=5)
    head = LinearHead(C=0.05, class_weight="none", refit=False).fit(X, y)
    Z = (X - X.mean(0)) / X.std(0)
    ref = LogisticRegression(C=0.05, max_iter=2000, tol=1e-8).fit(Z, y)
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(Z), atol=2e-3)
    assert head.info["selection"]["C"] == 0.05 and len(head.info["selection"]["grid"]) == 1


def test_heads_are_scikit_learn_estimators() -> None:
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    X, y = blobs((40, 40, 40), spread=0.3, seed=21)
    for head in (LinearHead(C=0.1, select_by="accuracy"), MLPHead(hidden=16)):
        twin = clone(head)
        assert twin.get_params() == head.get_params() and twin is not head
        scores = cross_val_score(head, X, y, cv=3, error_score="raise")
        assert scores.shape == (3,) and scores.min() > 0.8, scores
    assert LinearHead(C=0.3).set_params(C=1.0).C == 1.0


def test_estimators_in_grid_search_and_pipelines() -> None:
    """kNN and the linear head tune with GridSearchCV and run inside a Pipeline; a clone
    of a fitted estimator is unfitted; set_params reaches nested parameters."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.utils.validation import check_is_fitted

    from embedsearch.classify.knn import KNNClassifier

    X, y = blobs((40, 40, 40), spread=0.4, seed=22, flip=0.1)
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    knn = KNNClassifier(k=5, weighting="uniform")
    assert knn.get_params() == {"k": 5, "weighting": "uniform"}
    with pytest.raises(NotFittedError):
        check_is_fitted(knn)
    fitted = knn.fit(X, y)
    check_is_fitted(fitted)
    assert list(fitted.classes_) == ["c0", "c1", "c2"] and fitted.n_features_in_ == X.shape[1]
    assert not hasattr(clone(fitted), "classes_")  # clone: same parameters, not fitted
    assert fitted.score(X, y) == np.mean(fitted.predict(X) == y)
    grid = GridSearchCV(KNNClassifier(), {"k": [1, 15], "weighting": ["similarity", "uniform"]},
                        cv=cv, error_score="raise").fit(X, y)
    # 10 % of the labels were redrawn: one neighbour copies the noise, 15 outvote it.
    assert grid.best_params_["k"] == 15
    assert grid.cv_results_["mean_test_score"].shape == (4,)
    for est, param, values in ((KNNClassifier(), "k", [9, 15]),
                               (LinearHead(select_by="accuracy"), "C", [0.01, 1.0])):
        pipe = make_pipeline(StandardScaler(), Normalizer(), est)  # kNN: unit vectors
        name = type(est).__name__.lower()
        pipe.set_params(**{f"{name}__{param}": values[0]})
        assert getattr(pipe.steps[-1][1], param) == values[0]
        scores = cross_val_score(pipe, X, y, cv=cv, error_score="raise")
        assert scores.min() > 0.55, (name, scores)  # chance: 1/3
        search = GridSearchCV(pipe, {f"{name}__{param}": values}, cv=cv,
                              error_score="raise").fit(X, y)
        assert search.best_params_[f"{name}__{param}"] in values
        assert (search.predict(X[:5]) == search.best_estimator_.predict(X[:5])).all()
    # The MLP shares this estimator code (Head); cross_val_score above covers its fits.
    assert MLPHead().set_params(hidden=16, lr=0.01).get_params()["hidden"] == 16
    with pytest.raises(EmbedsearchError, match="k must be at least 1"):
        KNNClassifier(k=0).fit(X, y)
    with pytest.raises(EmbedsearchError, match="unknown weighting"):
        KNNClassifier(weighting="distance").fit(X, y)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_figures_are_scikit_learn_s() -> None:
    """Heads, fine-tuning and predict report scikit-learn's figures (one definition), also
    when a predicted class is absent from the truth; log loss skips unknown classes."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from embedsearch.classify.metrics import classification_figures

    t = np.array(["a", "a", "a", "b", "b", "c"])
    p = np.array(["a", "b", "d", "b", "b", "a"])  # "d" never true
    proba = np.full((6, 3), 1 / 3)
    fig = classification_figures(t, p, proba, ["a", "b", "d"])
    assert fig["accuracy"] == round(accuracy_score(t, p), 4)
    assert fig["balanced_accuracy"] == round(balanced_accuracy_score(t, p), 4)
    assert fig["macro_f1"] == round(f1_score(t, p, average="macro", zero_division=0), 4)
    assert fig["log_loss"] == round(float(np.log(3)), 4)  # the "c" row is left out
    assert classification_figures([], []) == {"n": 0}


@pytest.mark.parametrize("make", HEADS, ids=["linear", "mlp"])
def test_settings_chosen_by_the_declared_metric(make) -> None:
    X, y = blobs((60, 60, 60), spread=0.8, seed=7)
    Xtr, ytr, Xva, yva, _, _ = split(X, y)
    head = make(select_by="balanced_accuracy").fit(Xtr, ytr, Xva, yva)
    sel = head.info["selection"]
    assert sel["protocol"] == "validation split" and sel["metric"] == "balanced_accuracy"
    scored = [(g["val_balanced_accuracy"], -g["val_loss"]) for g in sel["grid"]]
    chosen = [g for g in sel["grid"] if g.get("tau", 0.0) == sel.get("tau", 0.0)
              and all(g[k] == sel[k] for k in ("C", "best_epoch") if k in sel)]
    assert len(chosen) == 1
    assert (chosen[0]["val_balanced_accuracy"], -chosen[0]["val_loss"]) == max(scored)
    assert head.info["validation"]["balanced_accuracy"] == pytest.approx(
        chosen[0]["val_balanced_accuracy"], abs=1e-4)
    assert head.info["trained_on"] == {"rows": len(ytr) + len(yva),
                                       "refit_on_train_and_val": True, "extra_rows": 0}
    with pytest.raises(EmbedsearchError, match="selection metric"):
        make(select_by="auc").fit(Xtr, ytr)


def test_linear_cross_validates_without_validation_rows() -> None:
    X, y = blobs((60, 60, 60), spread=0.8, seed=7)
    cv = LinearHead().fit(X, y)
    assert cv.info["selection"]["protocol"] == "5-fold cross-validation"
    assert cv.info["validation"]["n"] == len(y)  # out-of-fold predictions of every row


def test_C_at_the_edge_of_its_grid_extends_the_grid() -> None:
    X, y = blobs((40, 40, 40), spread=0.3, seed=8)
    head = LinearHead(grid=(1e-5, 3e-5), select_by="accuracy").fit(X, y)
    sel = head.info["selection"]
    tried = sorted({g["C"] for g in sel["grid"]})
    assert len(tried) > 2 and tried[-1] > 3e-5 and sel["C"] == pytest.approx(sel["C"])
    assert any("extended" in n for n in sel["notes"])


def test_class_weight_auto_corrects_for_a_rare_class() -> None:
    # 400 vs 25 rows (16x): "auto" searches a prior correction; chosen by balanced accuracy
    # it finds more of the rare class than no weighting at all.
    X, y = blobs((400, 25), spread=0.9, seed=11)
    Xte, yte = blobs((400, 400), spread=0.9, seed=11)  # same centres, balanced test
    Xte, yte = Xte[np.r_[0:100, 400:500]], yte[np.r_[0:100, 400:500]]
    auto = LinearHead(C=0.1, select_by="balanced_accuracy").fit(X, y)
    none = LinearHead(C=0.1, class_weight="none").fit(X, y)
    balanced = LinearHead(C=0.1, class_weight="balanced").fit(X, y)
    assert auto.info["class_weight"]["used"] == "prior correction"
    assert auto.info["selection"]["tau"] > 0
    assert auto.info["counts"]["train"] == {"c0": 400, "c1": 25}
    assert none.info["class_weight"]["used"] == "none" and "tau" not in none.info["selection"]
    assert balanced.info["class_weight"]["weights"]["c1"] > 1
    rare = yte == "c1"
    recall = {n: np.mean(h.predict(Xte[rare]) == "c1")
              for n, h in (("auto", auto), ("none", none), ("balanced", balanced))}
    assert recall["auto"] > recall["none"] + 0.1, recall
    assert recall["balanced"] > recall["none"] + 0.1, recall


def test_refit_corrects_for_the_class_mix_it_was_fitted_on() -> None:
    """Train 90:10, validation 10:90: the refit on both sees 100:100. Its prior correction
    and balanced weights must use that mix, not train's: on features that carry no class
    information a corrected head then splits evenly (with train's prior it said "b" for
    nearly everything)."""
    rng = np.random.default_rng(0)
    X, Xv, Xte = (rng.normal(size=(n, 5)).astype(np.float32) for n in (100, 100, 1000))
    y = np.array(["a"] * 90 + ["b"] * 10)
    yv = np.array(["a"] * 10 + ["b"] * 90)
    for cw in ("auto", "balanced"):
        head = LinearHead(C=0.01, class_weight=cw).fit(X, y, Xv, yv)
        if cw == "auto":
            assert head.info["selection"]["tau"] > 0
        share_b = np.mean(head.predict(Xte) == "b")
        assert 0.2 < share_b < 0.8, (cw, share_b)


def test_mlp_is_deterministic_for_a_seed() -> None:
    X, y = blobs((60, 60, 60), spread=0.6, seed=2)
    a = MLPHead(hidden=32, seed=4, max_epochs=16).fit(X, y)
    b = MLPHead(hidden=32, seed=4, max_epochs=16).fit(X, y)
    c = MLPHead(hidden=32, seed=5, max_epochs=16).fit(X, y)
    for key in a.params:
        assert np.array_equal(a.params[key], b.params[key])
    assert not np.array_equal(a.params["w1"], c.params["w1"])
    sel = a.info["selection"]
    assert sel["protocol"] == "5-fold cross-validation"  # as the linear head below 1,500 rows
    # Epoch 0 (its linear base alone) or one in the annealed half of the cosine schedule:
    # never a collapse to one epoch.
    assert sel["best_epoch"] == 0 or sel["epochs"] // 2 < sel["best_epoch"] <= sel["epochs"]
    assert sel["grid"][0]["best_epoch"] == 0
    dropped = any(n.startswith("hidden layer not kept") for n in sel.get("notes", []))
    assert sel["grid"][-1]["best_epoch"] == (0 if dropped else sel["epochs"])


def test_mlp_selects_like_the_linear_head_and_keeps_only_a_significant_gain() -> None:
    # Imbalanced, noisy, no validation rows: the MLP's base is the linear head's own choice
    # (same folds), and a hidden layer that gains nothing significant is dropped, the head
    # then predicting exactly as the linear head.
    X, y = blobs((150, 40, 12), spread=0.9, seed=3, flip=0.15)
    lin = LinearHead().fit(X, y)
    mlp = MLPHead(hidden=32).fit(X, y)
    sl, sm = lin.info["selection"], mlp.info["selection"]
    assert sm["protocol"] == sl["protocol"] == "5-fold cross-validation"
    assert (sm["C"], sm.get("tau")) == (sl["C"], sl.get("tau"))
    if sm["best_epoch"] == 0:
        np.testing.assert_allclose(mlp.decision_function(X), lin.decision_function(X),
                                   atol=1e-3)
    # A problem no linear map separates (each class two opposite clusters, x and -x): the
    # hidden layer's gain is large and kept.
    Xa, ya = blobs((120, 120), spread=0.2, seed=5)
    Xa[::2] *= -1
    xor = MLPHead(hidden=32, max_epochs=20).fit(Xa, ya).info["selection"]
    assert xor["best_epoch"] > 0
    assert not any(n.startswith("hidden layer not kept") for n in xor.get("notes", []))


def test_mlp_gain_within_the_noise_is_not_kept() -> None:
    # Held-out logits of the base (epoch 0) right on 160 of 200 rows; an epoch right on one
    # more row is noise and dropped, one right on 30 more is a real gain and kept.
    head = MLPHead(select_by="accuracy")
    head.classes_ = np.array(["a", "b"])
    head._log_prior, head._taus = np.log([0.5, 0.5]), (0.0,)
    truth = head._held_truth = np.repeat([0, 1], 100)
    right = np.zeros(200, bool)
    right[np.random.default_rng(0).permutation(200)[:160]] = True
    base = np.eye(2)[np.where(right, truth, 1 - truth)]

    def fixed(n: int) -> np.ndarray:
        out = base.copy()
        rows = np.flatnonzero(~right)[:n]
        out[rows] = np.eye(2)[truth[rows]]
        return out

    settings = [{"best_epoch": 0}, {"best_epoch": 7}]
    note = head._insignificant(settings, [base, fixed(1)], 5)
    assert note and "best epoch (7) gained +0.0050 accuracy" in note, note
    assert "5-fold cross-validation, not significant" in note
    assert head._insignificant(settings, [base, fixed(30)], 5) is None
    assert head._insignificant(settings, [base, base], 5) is None  # epoch 0 wins the tie


def test_mlp_is_never_below_its_linear_base_on_validation() -> None:
    X, y = blobs((120, 60, 30), spread=0.9, seed=17, flip=0.1)
    Xtr, ytr, Xva, yva, Xte, _ = split(X, y)
    lin = LinearHead().fit(Xtr, ytr, Xva, yva)
    mlp = MLPHead(hidden=32).fit(Xtr, ytr, Xva, yva)
    assert mlp.info["selection"]["C"] == lin.info["selection"]["C"]
    assert mlp.info["validation"]["macro_f1"] >= lin.info["validation"]["macro_f1"]
    assert "w0" in mlp.params  # the linear base, folded into the saved weights
    if mlp.info["selection"]["best_epoch"] == 0:  # no better: exactly the linear head
        np.testing.assert_allclose(mlp.decision_function(Xte), lin.decision_function(Xte),
                                   atol=1e-3)
    plain = MLPHead(hidden=32, base="none").fit(Xtr, ytr, Xva, yva)
    assert "w0" not in plain.params and plain.info["selection"]["best_epoch"] > 0


@pytest.mark.parametrize("make", HEADS, ids=["linear", "mlp"])
def test_saved_head_loads_with_identical_predictions(make, tmp_path: Path) -> None:
    X, y = blobs((40, 40, 40), spread=0.8, seed=9)
    head = make().fit(X, y)
    files = write_head(head, tmp_path / "h", encoder={"spec": "x", "dim": 32})
    assert set(files) == {"weights.safetensors", "head.json"}
    meta = json.loads((tmp_path / "h" / "head.json").read_text())
    assert meta["classes"] == ["c0", "c1", "c2"] and meta["encoder"]["spec"] == "x"
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(meta["validation"])
    assert meta["train_seconds"] >= 0 and meta["hyperparameters"]["seed"] == 0
    again = load_head(tmp_path / "h")
    assert type(again) is type(head)
    Q = blobs((30, 30, 30), spread=0.8, seed=10)[0]
    assert np.array_equal(again.predict_proba(Q), head.predict_proba(Q))
    assert list(again.classes_) == list(head.classes_)
    # Tampered weights are refused.
    w = tmp_path / "h" / "weights.safetensors"
    blob = w.read_bytes()  # the last 4 bytes flipped (they may be zeros: a zero residual)
    w.write_bytes(blob[:-4] + bytes(b ^ 0xFF for b in blob[-4:]))
    with pytest.raises(BundleError, match="modified"):
        load_head(tmp_path / "h")


def test_head_contract_errors() -> None:
    X, y = blobs((10, 10), spread=0.1, seed=0)
    with pytest.raises(EmbedsearchError, match="two classes"):
        LinearHead().fit(X, np.array(["a"] * 20))
    head = LinearHead(C=1.0).fit(X, y)
    with pytest.raises(EmbedsearchError, match="shape"):
        head.predict(np.zeros((2, 5), np.float32))
    with pytest.raises(EmbedsearchError, match="not fitted"):
        MLPHead().predict(X)


# -- on a bundle --------------------------------------------------------------------------
@pytest.fixture
def tiny_bundle(split_collection: Path):
    build_index(split_collection, name="tb", model=TINY)
    return load_bundle("tb")


def test_fit_head_on_bundle_uses_cached_embeddings_only(tiny_bundle, queries, monkeypatch
                                                        ) -> None:
    import embedsearch.encoders as encoders

    def no_encoder(*a, **kw):
        raise AssertionError("training must not load an encoder")

    with monkeypatch.context() as m:
        m.setattr(encoders, "load_encoder", no_encoder)
        res = fit_head(tiny_bundle, "linear")
    # 18 train + 6 val rows; the 9 test rows are scored only.
    assert res.counts["train"] == {c: 6 for c in COLOURS}
    assert res.counts["val"] == {c: 2 for c in COLOURS}
    assert res.head.info["trained_on"]["rows"] == 24
    assert res.test["n"] == 9 and res.test["accuracy"] == 1.0
    assert res.validation["macro_f1"] == 1.0 and res.knn_validation["n"] == 6
    assert (res.path / "weights.safetensors").is_file()

    b = load_bundle("tb")
    assert [h["name"] for h in b.heads()] == ["linear"]
    assert b.heads()[0]["encoder"]["spec"] == TINY
    head = load_bundle_head(b, "linear")
    X = np.asarray(b.embeddings)
    assert np.array_equal(head.predict_proba(X), res.head.predict_proba(X))
    preds = Predictor(b).predict(list(queries.values()), method="head")
    assert [p.label for p in preds] == list(queries)
    assert preds[0].method.startswith("head:linear (linear, C=")
    assert all(p.confidence > 0.5 for p in preds)


def test_several_heads_side_by_side_and_auto_choice(tiny_bundle, queries) -> None:
    fit_head(tiny_bundle, "linear")
    fit_head(tiny_bundle, "mlp", name="mlp-small", hidden=16)
    b = load_bundle("tb")
    assert {h["name"] for h in b.heads()} == {"linear", "mlp-small"}
    X = np.asarray(b.embeddings[b.reference_rows:])
    ids = b.items["id"].iloc[b.reference_rows:].tolist()
    truth = b.items["label"].iloc[b.reference_rows:].tolist()
    preds = Predictor(b).predict_vectors(X, ids, k=3, method="all")
    for p, t in zip(preds, truth, strict=True):
        assert set(p.methods) == {"knn", "head:linear", "head:mlp-small"}
        assert {m["label"] for m in p.methods.values()} == {t}
        assert p.label == t and p.method.startswith("head:")
        assert len(p.neighbours) == 5
        d = p.as_dict()
        assert json.loads(json.dumps(d))["methods"]["knn"]["probabilities"][t] > 0.5
    # auto == the best head on validation (both perfect here: ties go to the first best).
    auto = Predictor(b).predict_vectors(X, ids, method="auto")
    assert auto[0].method == preds[0].method
    knn = Predictor(b).predict_vectors(X, ids, k=3, method="knn")
    assert knn[0].method == "knn(k=3, similarity)" and not knn[0].methods
    # The shared classes_: every method's predict_proba has the same column order.
    for m in ("knn", "head"):
        assert list(Predictor(b).classifier(m).classes_) == b.classes


def test_auto_prefers_knn_when_it_beat_the_head(tiny_bundle) -> None:
    fit_head(tiny_bundle, "linear")
    b = load_bundle("tb")
    b.manifest["heads"]["linear"]["validation"]["macro_f1"] = 0.5  # pretend a poor head
    X = np.asarray(b.embeddings[:2])
    p = Predictor(b)
    assert p.predict_vectors(X, ["a", "b"])[0].method.startswith("knn")
    assert p.predict_vectors(X, ["a", "b"], method="head")[0].method.startswith("head:linear")


def test_head_from_another_encoder_is_refused(tiny_bundle, split_collection: Path) -> None:
    import embedsearch_test_encoders as fam

    fit_head(tiny_bundle, "linear")
    other = fam.build_tiny("test:tiny", "tiny", None)
    other.spec = "test:other"
    build_index(split_collection, name="other", encoder=other)
    ob = load_bundle("other")
    with pytest.raises(BundleMismatchError, match="retrain"):
        load_bundle_head(ob, tiny_bundle.path / "heads" / "linear")
    # Copied in with its manifest entry: still refused by name, and "auto" passes it over.
    shutil.copytree(tiny_bundle.path / "heads", ob.path / "heads")
    ob.manifest["heads"] = tiny_bundle.manifest["heads"]
    with pytest.raises(BundleMismatchError, match="test:tiny"):
        load_bundle_head(ob, "linear")
    pred = Predictor(ob).predict_vectors(np.asarray(ob.embeddings[:1]), ["q"])[0]
    assert pred.method.startswith("knn")


def test_tampered_head_file_refused(tiny_bundle) -> None:
    res = fit_head(tiny_bundle, "linear")
    meta = json.loads((res.path / "head.json").read_text())
    meta["classes"] = list(reversed(meta["classes"]))
    (res.path / "head.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="modified"):
        load_bundle_head(load_bundle("tb"), "linear")


def test_heads_survive_an_incremental_rebuild(tiny_bundle, split_collection: Path) -> None:
    fit_head(tiny_bundle, "linear")
    draw_image("red", 777).save(split_collection / "train" / "red" / "extra.jpg")
    res = build_index(split_collection, name="tb", model=TINY)
    assert res.encoded == 1
    assert load_bundle_head(load_bundle("tb")).classes_.tolist() == sorted(COLOURS)


def test_zeroshot_refused_for_image_only_encoder(tiny_bundle) -> None:
    with pytest.raises(EmbedsearchError, match="zero-shot needs a CLIP encoder"):
        Predictor(tiny_bundle).predict_vectors(np.asarray(tiny_bundle.embeddings[:1]), ["q"],
                                               method="zeroshot")


def test_cli_train_and_predict_all(split_collection: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["-q", "build-index", str(split_collection / "train"),
                                "--name", "tr", "--model", TINY]).exit_code == 0
    out = runner.invoke(main, ["train", "--index", "tr", "--head", "linear"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "red" in text and "C=" in text and "5-fold cross-validation" in text
    assert "macro-F1 1.000" in text and "took" in text
    out = runner.invoke(main, ["train", "--index", "tr", "--head", "mlp", "--hidden", "16",
                               "--head-name", "m", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["kind"] == "mlp" and summary["selection"]["best_epoch"] >= 0
    assert summary["selection"]["C"] > 0  # of its linear base
    out = runner.invoke(main, ["predict", str(split_collection / "test"), "--index", "tr",
                               "--method", "all"])
    assert out.exit_code == 0, out.output
    header = out.output.splitlines()[0].split()
    assert header == ["image", "true", "knn", "head:linear", "head:m"]
    assert "macro-F1 1.000  on 9 images" in out.output
    out = runner.invoke(main, ["predict", str(split_collection / "test"), "--index", "tr",
                               "--method", "zeroshot"])
    assert out.exit_code == 1 and "zero-shot needs a CLIP encoder" in out.output
    out = runner.invoke(main, ["train", "--index", "tr", "--head", "mlp", "-C", "1"])
    assert out.exit_code == 1 and "does not apply" in out.output


# -- zero-shot with a randomly initialised CLIP built locally (no download) -------------------
CLIP = "openclip:ViT-S-32"


@pytest.fixture(scope="module")
def clip():
    from embedsearch.encoders import load_encoder

    return load_encoder(CLIP)  # no tag: random weights, nothing is downloaded


def test_zeroshot_prompt_ensemble(clip) -> None:
    from embedsearch.classify.zeroshot import ZeroShotClassifier, prompt_name

    assert prompt_name("art_nouveau") == "art nouveau"
    assert prompt_name("long-sleeve") == "long sleeve" and prompt_name("t-shirt") == "t-shirt"
    zs = ZeroShotClassifier(clip, ["t-shirt", "red_car", "blue-sky"], "art").fit()
    assert list(zs.classes_) == ["blue-sky", "red_car", "t-shirt"]
    assert len(zs.templates) > 3 and "a painting in the style of {}." in zs.templates
    expected = clip.encode_text([t.format("red car") for t in zs.templates]).mean(0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(zs.text_embeddings[1], expected, atol=1e-5)
    assert zs.logit_scale == pytest.approx(float(clip.model.logit_scale.exp()), rel=1e-5)
    # A query equal to a class's text embedding is that class; rows are distributions.
    proba = zs.predict_proba(zs.text_embeddings)
    assert list(proba.argmax(1)) == [0, 1, 2]
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    custom = ZeroShotClassifier(clip, ["a", "b"], ["a sketch of {}."])
    assert custom.templates == ["a sketch of {}."]
    with pytest.raises(EmbedsearchError, match="exactly once"):
        ZeroShotClassifier(clip, ["a", "b"], ["no placeholder"])


def test_zeroshot_on_an_unlabelled_clip_bundle(clip, tmp_path: Path, monkeypatch) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, cls in enumerate(list(COLOURS) * 2):
        draw_image(cls, 300 + i).save(flat / f"img_{i}.png")
    build_index(flat, name="clip", encoder=clip)
    b = load_bundle("clip")
    assert not b.labelled
    monkeypatch.setattr(b, "encoder", lambda *a, **kw: clip)
    X, ids = np.asarray(b.embeddings), b.items["id"].tolist()
    names = ["red", "green", "blue"]
    preds = Predictor(b).predict_vectors(X, ids, classes=names)  # auto: zero-shot, no labels needed
    assert all(p.label in names and p.method.startswith("zeroshot") for p in preds)
    assert all(len(p.neighbours) == 5 for p in preds)
    expected = [p.label for p in preds]
    assert len(list((b.path / "zeroshot").glob("*.safetensors"))) == 1
    # Cached: a fresh load predicts the same without the text tower (no encoder at all).
    b2 = load_bundle("clip")

    def no_encoder(*a, **kw):
        raise AssertionError("text embeddings should come from the cache")

    monkeypatch.setattr(b2, "encoder", no_encoder)
    again = Predictor(b2).predict_vectors(X, ids, classes=names, method="all")
    assert [p.label for p in again] == expected
    assert set(again[0].methods) == {"zeroshot"}
    with pytest.raises(EmbedsearchError, match="class names"):
        Predictor(b2).predict_vectors(X, ids, method="zeroshot")  # unlabelled and no classes given
    # Another template set is another cache entry (so here it needs the encoder).
    with pytest.raises(AssertionError, match="cache"):
        Predictor(b2).zeroshot(names, "art")


# -- real weights, real photos --------------------------------------------------------------
@pytest.mark.slow
def test_heads_beat_knn_on_clothing(clothing_bundle) -> None:
    """Linear head ≥ 0.86 test accuracy and ≥ 10-NN on clothing-small; MLP reported."""
    b = clothing_bundle
    lin = fit_head(b, "linear", save=False)
    mlp = fit_head(b, "mlp", save=False)
    knn_acc = lin.knn_test["accuracy"]
    print(f"\nclothing-small test accuracy: 10-NN {knn_acc:.3f}, linear "
          f"{lin.test['accuracy']:.3f} ({lin.seconds:.1f} s), MLP {mlp.test['accuracy']:.3f} "
          f"({mlp.seconds:.1f} s)")
    assert lin.test["n"] == 372
    assert lin.test["accuracy"] >= 0.86
    assert lin.test["accuracy"] >= knn_acc
    assert mlp.test["accuracy"] >= 0.84
    # Cross-check the reported kNN figure against the bundle's own kNN predictions.
    test = b.items.iloc[b.reference_rows:]
    preds = Predictor(b).predict_vectors(np.asarray(b.embeddings[b.reference_rows:]),
                                         test["id"].tolist(), k=10, method="knn")
    assert np.mean([p.label == t for p, t in zip(preds, test["label"], strict=True)]) \
        == pytest.approx(knn_acc, abs=1e-3)


@pytest.mark.parametrize("make", HEADS, ids=["linear", "mlp"])
def test_extra_train_rows_train_but_never_score(make) -> None:
    X, y = blobs((40, 40, 40), spread=0.6, seed=13)
    Xtr, ytr, Xva, yva, _, _ = split(X, y)
    noise = np.random.default_rng(0).normal(scale=0.01, size=Xtr.shape).astype(np.float32)
    views = (Xtr + noise, ytr, np.arange(len(ytr)))
    with_val = make().fit(Xtr, ytr, Xva, yva, extra_train=views)
    assert with_val.info["validation"]["n"] == len(yva)  # extras are never scored
    assert with_val.info["trained_on"]["extra_rows"] == len(ytr)
    held_out = make().fit(Xtr, ytr, extra_train=views[:2])  # no source: internal split safe
    assert held_out.info["validation"]["n"] <= len(ytr)
    with pytest.raises(EmbedsearchError, match="absent from training"):
        make().fit(Xtr, ytr, extra_train=(Xtr[:2], np.array(["zz", "zz"])))


def test_cli_train_auto_names_metric_protocols_and_choice(tiny_bundle) -> None:
    out = CliRunner().invoke(main, ["train", "--index", "tb", "--head", "auto",
                                    "--select-by", "accuracy", "--hidden", "16"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "select    by validation accuracy, ties to the lower log loss, on validation " \
        "split" in text
    assert "kept linear (accuracy: linear 1.000, mlp 1.000; linear on a tie)" in text
    assert "(validation split, train as reference)" in text
    assert "held-out test images, report only" in text and "scikit-learn's C on " \
        "standardised inputs" in text
    b = load_bundle("tb")
    assert b.manifest["heads"]["linear"]["select_by"] == "accuracy"
    meta = json.loads((b.path / "heads" / "linear" / "head.json").read_text())
    assert meta["selection"]["metric"] == "accuracy"
    assert meta["head_choice"]["chosen"] == "linear"

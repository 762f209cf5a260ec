"""Do augmented views, test-time flips or a second encoder make the heads better?

    python benchmarks/embedding_options.py --bundle indexes/clothing-views \
        --second indexes/clothing-mobilenet --out benchmarks/results/embedding_options

``--bundle``: a labelled train/val/test bundle built with ``build-index --views ...``;
``--second`` (optional): a bundle of the same images from another encoder, for
concatenation. Two collections are measured from the same cached embeddings:

* the bundle as it is (clothing-small: 3,068 train / 341 validation / 372 test);
* an imbalanced few-shot version: per class (alphabetical rank i) a seeded random
  ``max(6, round(n × 0.6^i))`` of its training images are kept (241 … 6 per class), views
  of the dropped images go with them; validation and test are unchanged.

Per collection: 10-NN (similarity vote, reference = train + validation), linear and MLP
heads (``class_weight="auto"``, validation picks the setting, refit on train +
validation) without and with the views as ``extra_train``, each scored on the test
embeddings as they are and with test-time flip averaging (``predict --tta flip``), and
the heads on L2-normalised concatenated embeddings (``--second``), with the views and the
test-time flips concatenated the same way when both bundles hold views (the same crops:
they are seeded per image and view). Only the test flips are encoded here (the views and
both encoders' embeddings are read from the bundles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def few_shot_mask(labels: np.ndarray, train: np.ndarray, seed: int = 0) -> np.ndarray:
    """Training rows kept in the imbalanced few-shot collection."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), bool)
    for i, c in enumerate(sorted(set(labels[train]))):
        rows = np.flatnonzero(train & (labels == c))
        n = max(6, round(len(rows) * 0.6 ** i))
        keep[rng.choice(rows, min(n, len(rows)), replace=False)] = True
    return keep


def _normalise(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def view_table(bundle: Any) -> tuple[np.ndarray, np.ndarray, Any] | None:
    """The bundle's views: (vectors, bundle rows, table with id and view name) or None."""
    from embedsearch.store.io import read_parquet
    from embedsearch.views import bundle_views

    views = bundle_views(bundle)
    if views is None:
        return None
    return views[0], views[2], read_parquet(bundle.file("view_items"))


def concatenated(b1: Any, b2: Any) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``b2``'s images joined to ``b1``'s rows (by id) as L2-normalised concatenations,
    and the views both bundles hold for the same (image, view) joined the same way (crops
    are seeded per image and view, so both encoders saw the same pixels): (matrix aligned
    with ``b1.items``, (view vectors, their ``b1`` rows) or None)."""
    pos = b2.items.reset_index().set_index("id").loc[b1.items["id"], "row"].to_numpy()
    X = _normalise(np.hstack([np.asarray(b1.embeddings, np.float32),
                              np.asarray(b2.embeddings, np.float32)[pos]]))
    v1, v2 = view_table(b1), view_table(b2)
    if v1 is None or v2 is None:
        return X, None
    key2 = {k: i for i, k in enumerate(zip(v2[2]["id"], v2[2]["view"], strict=True))}
    pairs = [(i, key2[k]) for i, k in enumerate(zip(v1[2]["id"], v1[2]["view"], strict=True))
             if k in key2]
    a, b = np.array(pairs).T
    return X, (_normalise(np.hstack([v1[0][a], v2[0][b]])).astype(np.float32), v1[1][a])


def evaluate(X: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, te: np.ndarray,
             views: tuple[np.ndarray, np.ndarray] | None, X_tta: np.ndarray | None,
             class_weights: tuple[str, ...] = ("auto",),
             heads: tuple[str, ...] = ("linear", "mlp")) -> dict[str, Any]:
    """kNN, linear and MLP (± views, per class weighting: "auto" unnamed, others named) on
    one embedding matrix; each head scored on the test rows as embedded and, given
    ``X_tta``, with flip averaging."""
    from embedsearch.classify.heads import make_head
    from embedsearch.classify.metrics import classification_figures
    from embedsearch.training import knn_figures

    ref = tr | va
    out: dict[str, Any] = {"10-NN": knn_figures(X[ref], y[ref], X[te], y[te], 10)}
    if X_tta is not None:
        out["10-NN + TTA flip"] = knn_figures(X[ref], y[ref], X_tta, y[te], 10)
    tr_rows = np.flatnonzero(tr)
    for kind in heads:
        variants: list[tuple[str, Any]] = [("", None)]
        if views is not None:
            vX, vrow = views
            pos = np.full(len(y), -1)
            pos[tr_rows] = np.arange(len(tr_rows))
            keep = pos[vrow] >= 0
            variants.append((" + views", (vX[keep], y[vrow[keep]], pos[vrow[keep]])))
        for (suffix, extra), cw in ((v, c) for c in class_weights for v in variants):
            if cw != "auto":
                suffix = f" ({cw})" + suffix
            head = make_head(kind, seed=0, class_weight=cw)
            t = time.perf_counter()
            head.fit(X[tr], y[tr], X[va], y[va], extra_train=extra)
            seconds = time.perf_counter() - t
            for tta_suffix, Q in (("", X[te]), (" + TTA flip", X_tta)):
                if Q is None:
                    continue
                proba = head.predict_proba(Q)
                fig = classification_figures(y[te], head.classes_[proba.argmax(1)])
                val = {f"val_{m}": head.info["validation"][m]
                       for m in ("accuracy", "balanced_accuracy", "macro_f1")}
                out[f"{kind}{suffix}{tta_suffix}"] = {**fig, **val,
                                                      "train_seconds": round(seconds, 2),
                                                      "extra_rows": 0 if extra is None
                                                      else len(extra[0])}
    return out


def chosen_on_validation(res: dict[str, Any]) -> dict[str, Any]:
    """The head (any embeddings, ± views, any class weighting; no test-time flip: the
    validation rows are not flipped) with the best validation accuracy, ties to the better
    validation macro-F1, then to the first listed (the cheaper), with its test figures."""
    best: tuple[float, float] | None = None
    pick: dict[str, Any] = {}
    for mname, methods in res.items():
        if not isinstance(methods, dict) or mname == "train_counts":
            continue
        for meth, f in methods.items():
            if "val_accuracy" not in f or "TTA" in meth:
                continue
            key = (f["val_accuracy"], f["val_macro_f1"])
            if best is None or key > best:
                best, pick = key, {"embeddings": mname, "method": meth, **f}
    return pick


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--second", type=Path, help="bundle of the same images, another encoder")
    ap.add_argument("--name", help="collection name in the report (default: the bundle's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "embedding_options")
    ap.add_argument("--class-weights", default="auto,balanced",
                    help="heads' class weightings to compare (auto = the default)")
    ap.add_argument("--heads", default="linear,mlp", help="head kinds to train")
    args = ap.parse_args()
    class_weights = tuple(args.class_weights.split(","))
    heads = tuple(args.heads.split(","))
    from embedsearch.bundle import load_bundle
    from embedsearch.query import embed_paths
    from embedsearch.report.provenance import git_revision, machine, package_versions
    from embedsearch.views import bundle_views

    b = load_bundle(args.bundle)
    items = b.items
    y = items["label"].astype(str).to_numpy()
    split = items["split"].astype(str).to_numpy()
    X = np.asarray(b.embeddings, np.float32)
    views = bundle_views(b)
    vX, vrow = (views[0], views[2]) if views is not None else (None, None)
    te = split == "test"
    t = time.perf_counter()
    src = Path(b.manifest["source"]["path"])
    test_paths = [src / i for i in items["id"][te]]
    X_tta = embed_paths(b, test_paths, tta="flip")[0]
    tta_seconds = time.perf_counter() - t
    # name -> (matrix, views or None, test-time flip matrix or None)
    matrices: dict[str, tuple[np.ndarray, Any, np.ndarray | None]] = {
        b.encoder_identity["spec"]: (X, (vX, vrow) if vX is not None else None, X_tta)}
    if args.second:
        b2 = load_bundle(args.second)
        pos = b2.items.reset_index().set_index("id").loc[items["id"], "row"].to_numpy()
        X2 = np.asarray(b2.embeddings, np.float32)[pos]
        Xc, views_c = concatenated(b, b2)
        # The concatenation's test-time flip: each part's flip-averaged query, joined.
        tta_c = _normalise(np.hstack([X_tta, embed_paths(b2, test_paths, tta="flip")[0]]))
        matrices[f"{b.encoder_identity['spec']} + {b2.encoder_identity['spec']} (concatenated)"] \
            = (Xc, views_c, tta_c)
        matrices.setdefault(b2.encoder_identity["spec"], (X2, None, None))
    name = args.name or b.name
    collections = {name: split == "train"}
    collections[f"{name}, imbalanced few-shot train"] = few_shot_mask(
        y, split == "train")
    results: dict[str, Any] = {"views": b.manifest.get("views"), "collections": {}}
    for cname, tr in collections.items():
        va = split == "val"
        counts = {c: int(n) for c, n in zip(*np.unique(y[tr], return_counts=True),
                                            strict=True)}
        res: dict[str, Any] = {"train_counts": counts}
        for mname, (M, mviews, M_tta) in matrices.items():
            res[mname] = evaluate(M, y, tr, va, te, mviews, M_tta, class_weights, heads)
            print(cname, mname, json.dumps({k: (v.get("accuracy"), v.get("balanced_accuracy"))
                                            for k, v in res[mname].items()}), file=sys.stderr)
        res["chosen_on_validation"] = chosen_on_validation(res)
        results["collections"][cname] = res
    results["provenance"] = {"command": " ".join(["python", *sys.argv]),
                             "tta_encode_seconds": round(tta_seconds, 1),
                             "test_images": int(te.sum()), "packages": package_versions(),
                             "machine": machine(), "git": git_revision(str(REPO))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Embedding options: {args.bundle.name}", "",
             f"Command: `{results['provenance']['command']}`", "",
             "Test accuracy / balanced accuracy on the unchanged test split "
             f"({int(te.sum())} images). Views: {(results['views'] or {}).get('spec')}.", ""]
    for cname, res in results["collections"].items():
        lines += [f"## {cname}", "", "train images per class: " +
                  ", ".join(f"{c} {n}" for c, n in res["train_counts"].items()), "",
                  "| embeddings | method | accuracy | balanced accuracy | macro-F1 "
                  "| head training | validation accuracy / macro-F1 (selection) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for mname, methods in res.items():
            if mname in ("train_counts", "chosen_on_validation"):
                continue
            for meth, f in methods.items():
                secs = f"{f['train_seconds']:.1f} s" if "train_seconds" in f else "–"
                val = (f"{f['val_accuracy']:.3f} / {f['val_macro_f1']:.3f}"
                       if "val_accuracy" in f else "–")
                lines.append(f"| {mname} | {meth} | {f['accuracy']:.3f} | "
                             f"{f['balanced_accuracy']:.3f} | {f['macro_f1']:.3f} | {secs} "
                             f"| {val} |")
        c = res["chosen_on_validation"]
        lines += ["", f"Chosen on validation (best validation accuracy, then macro-F1, among "
                  f"the heads without test-time flips): **{c['embeddings']} / {c['method']}**, "
                  f"validation accuracy {c['val_accuracy']:.3f}, test accuracy "
                  f"**{c['accuracy']:.3f}** (balanced {c['balanced_accuracy']:.3f}).", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

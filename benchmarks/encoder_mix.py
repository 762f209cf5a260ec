"""Which encoder, or concatenation of encoders, should the heads use? Chosen without the test split.

    python benchmarks/encoder_mix.py --bundle lite0=B0 --bundle lite1=B1 --bundle lite2=B2 \
        --mix lite0 --mix lite1 --mix lite2 --mix lite0+lite2 --mix lite0+lite1+lite2 \
        --out benchmarks/results/encoder_mix

Each ``--bundle NAME=PATH`` is one encoder's bundle of the same labelled collection (rows
matched by image id). A ``--mix A+B`` is the concatenation ``build-index --model A+B``
builds: each part L2-normalised, joined, normalised again (:mod:`embedsearch.encoders.combine`).

Protocol (the test split is never read): the train and validation images are pooled and
split ``--resplits`` times into stratified 80 / 20 parts (seeded). On each, the product's
linear head (:class:`embedsearch.classify.linear.LinearHead`, defaults: it chooses its
regularisation and class-prior correction on its own hold-out of the 80 %) is fitted on the
80 % and scored on the 20 %. A second collection keeps an imbalanced few-shot subset of
each 80 % (per class, alphabetical rank i: ``max(6, round(n × 0.6^i))``), scored on the same
natural 20 %. Each collection's choice is the mix with its best mean accuracy over the
resplits; the paired per-resplit differences to the first mix say how sure that is.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from embedding_options import _normalise, few_shot_mask  # noqa: E402


def load(bundles: dict[str, Path]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray,
                                            dict[str, float]]:
    """Each bundle's vectors on the first bundle's rows, labels, splits, and the images per
    second each bundle recorded when it encoded."""
    from embedsearch.bundle import load_bundle

    first = load_bundle(next(iter(bundles.values())))
    ids = first.items["id"]
    vectors, speed = {}, {}
    for name, path in bundles.items():
        b = load_bundle(path)
        pos = b.items.reset_index().set_index("id").loc[ids, "row"].to_numpy()
        vectors[name] = _normalise(np.asarray(b.embeddings, np.float64)[pos])
        speed[name] = float((b.manifest.get("encoding") or {}).get("images_per_second") or 0)
    return (vectors, first.items["label"].astype(str).to_numpy(),
            first.items["split"].astype(str).to_numpy(), speed)


def mix_matrix(vectors: dict[str, np.ndarray], mix: str) -> np.ndarray:
    parts = mix.split("+")
    if len(parts) == 1:
        return vectors[mix]
    return _normalise(np.hstack([vectors[p] for p in parts]))


def score(X: np.ndarray, y: np.ndarray, pool: np.ndarray, resplits: int) -> dict[str, Any]:
    """Per task and resplit: the linear head's accuracy and balanced accuracy on the 20 %."""
    from sklearn.model_selection import StratifiedShuffleSplit

    from embedsearch.classify.heads import make_head
    from embedsearch.classify.metrics import classification_figures

    sss = StratifiedShuffleSplit(n_splits=resplits, test_size=0.2, random_state=0)
    out: dict[str, Any] = {"full": [], "few-shot": []}
    seconds = 0.0
    for s, (a, b) in enumerate(sss.split(pool, y[pool])):
        fit_rows, held = pool[a], pool[b]
        in_fit = np.zeros(len(y), bool)
        in_fit[fit_rows] = True
        for task, rows in (("full", fit_rows),
                           ("few-shot", np.flatnonzero(few_shot_mask(y, in_fit, seed=s)))):
            head = make_head("linear", seed=0)
            t = time.perf_counter()
            head.fit(X[rows], y[rows])
            seconds += time.perf_counter() - t
            pred = head.classes_[head.predict_proba(X[held]).argmax(1)]
            fig = classification_figures(y[held], pred)
            out[task].append({"accuracy": fig["accuracy"],
                              "balanced_accuracy": fig["balanced_accuracy"]})
    out["head_seconds"] = round(seconds, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--mix", action="append", required=True,
                    help="a bundle name or names joined by + (the first is the reference)")
    ap.add_argument("--resplits", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "encoder_mix")
    args = ap.parse_args()
    bundles = dict(b.split("=", 1) for b in args.bundle)
    vectors, y, split, speed = load({k: Path(v) for k, v in bundles.items()})
    pool = np.flatnonzero(split != "test")
    results: dict[str, Any] = {"pool_rows": len(pool), "resplits": args.resplits, "mixes": {}}
    for mix in args.mix:
        t = time.perf_counter()
        res = score(mix_matrix(vectors, mix), y, pool, args.resplits)
        res["images_per_second"] = round(1 / sum(1 / speed[p] for p in mix.split("+")), 1) \
            if all(speed[p] for p in mix.split("+")) else None
        results["mixes"][mix] = res
        print(mix, {k: round(float(np.mean([r["accuracy"] for r in res[k]])), 4)
                    for k in ("full", "few-shot")}, f"{time.perf_counter() - t:.0f} s",
              flush=True)
    ref = args.mix[0]

    def accs(mix: str, task: str, metric: str = "accuracy") -> np.ndarray:
        return np.array([r[metric] for r in results["mixes"][mix][task]])

    tasks = ("full", "few-shot")
    chosen = {t: max(args.mix, key=lambda m, t=t: float(np.mean(accs(m, t)))) for t in tasks}
    results["chosen"] = chosen
    lines = [
        "# Encoder or concatenation for the heads, chosen without the test split", "",
        f"Command: `python benchmarks/encoder_mix.py {' '.join(sys.argv[1:])}`", "",
        __doc__.split("\n\n", 2)[2].strip(), "",
        f"Pool: {len(pool):,} train + validation rows; {args.resplits} resplits. Encoding speed "
        "is the bundles' recorded images per second, combined for a mix as if encoded "
        "part after part (one `build-index --model A+B` decodes each image once and is a "
        "little faster).", ""]
    for task in tasks:
        lines += [f"## {task}", "",
                  f"| mix | accuracy | balanced accuracy | Δ accuracy vs {ref}, points: mean "
                  "(min … max over resplits) | head fits, all resplits of both collections "
                  "| images/s |",
                  "|---|---:|---:|---|---:|---:|"]
        for mix in args.mix:
            d = accs(mix, task) - accs(ref, task)
            delta = "–" if mix == ref else \
                f"{100 * d.mean():+.1f} ({100 * d.min():+.1f} … {100 * d.max():+.1f}; " \
                f"better on {int((d > 0).sum())} of {len(d)})"
            r = results["mixes"][mix]
            name = f"**{mix}**" if mix == chosen[task] else mix
            lines.append(f"| {name} | {np.mean(accs(mix, task)):.3f} | "
                         f"{np.mean(accs(mix, task, 'balanced_accuracy')):.3f} | {delta} | "
                         f"{r['head_seconds']} s | {r['images_per_second'] or '–'} |")
        lines += ["", f"Chosen for {task}: **{chosen[task]}**.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

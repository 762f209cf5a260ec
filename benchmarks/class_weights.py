"""Class weighting of the linear head: the default class-prior search ("auto") against
balanced class weights in the fit ("balanced"), on several collections, from cached
embeddings only.

    PYTHONPATH=. python benchmarks/class_weights.py --bundle B1 --second B2
    PYTHONPATH=. python benchmarks/class_weights.py --render   # rewrite the .md from the .json

``--bundle``: clothing-small with the default encoder; ``--second``: the same images with
another encoder (its embeddings are concatenated to the first's, as in
``embedding_options.py``). Collections per embedding: clothing-small's own split, the
imbalanced few-shot train of ``embedding_options.py`` (same validation and test), and the
50:1 imbalanced (3 seeds) and 20:1 binary (2 seeds) subsets of ``heads_selection.py`` (no
validation split: the head holds out its own rows). Selection by macro-F1 (the default).
Writes benchmarks/results/class_weights.{json,md}.
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
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))


def run(bundle: Path, second: Path) -> dict[str, Any]:
    from embedding_options import few_shot_mask
    from heads_selection import binary, figures, imbalanced

    from embedsearch.bundle import load_bundle
    from embedsearch.classify.heads import LinearHead

    b1, b2 = load_bundle(bundle), load_bundle(second)
    E1 = np.asarray(b1.embeddings, np.float32)
    pos = b2.items.reset_index().set_index("id").loc[b1.items["id"], "row"].to_numpy()
    E2 = np.asarray(b2.embeddings, np.float32)[pos]
    Ec = np.hstack([E1, E2])
    Ec = (Ec / np.linalg.norm(Ec, axis=1, keepdims=True)).astype(np.float32)
    y = b1.items["label"].astype(str).to_numpy()
    sp = b1.items["split"].astype(str).to_numpy()
    tr, va, te = sp == "train", sp == "val", sp == "test"
    out: dict[str, Any] = {}
    for ename, E in (("lite0", E1), ("concat", Ec)):
        def own(mask: np.ndarray, E: np.ndarray = E) -> tuple[np.ndarray, ...]:
            return E[mask], y[mask], E[va], y[va], E[te], y[te]
        cols = {"clothing": own(tr), "few-shot": own(few_shot_mask(y, tr))}
        cols.update({f"imb50 s{s}": imbalanced(own(tr), s) for s in range(3)})
        cols.update({f"bin20 s{s}": binary(own(tr), s) for s in range(2)})
        for cname, (Xtr, ytr, Xv, yv, Xt, yt) in cols.items():
            for cw in ("auto", "balanced"):
                head = LinearHead(class_weight=cw)
                t = time.perf_counter()
                head.fit(Xtr, ytr, Xv, yv)
                sel = head.info["selection"]
                val = head.info["validation"]
                out[f"{ename} {cname} | {cw}"] = {
                    "test": figures(yt, head.predict(Xt)),
                    "val": {k: round(val[k], 4) for k in ("accuracy", "balanced_accuracy",
                                                          "macro_f1")},
                    "C": sel.get("C"), "tau": sel.get("tau"),
                    "seconds": round(time.perf_counter() - t, 1)}
                print(f"{ename} {cname} {cw}", out[f"{ename} {cname} | {cw}"], flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Class weighting of the linear head: prior search (auto) vs balanced weights",
             "", f"Command: `{res['command']}` (2 shared cores; selection by macro-F1).", "",
             "| embeddings, collection | auto: test acc / bal acc | balanced: test acc / "
             "bal acc | Δ acc | Δ bal acc | auto C, τ | balanced C |",
             "|---|---:|---:|---:|---:|---|---|"]
    rows = res["rows"]
    for key in dict.fromkeys(k.split(" | ")[0] for k in rows):
        a, b = rows[f"{key} | auto"], rows[f"{key} | balanced"]
        da = 100 * (b["test"]["accuracy"] - a["test"]["accuracy"])
        db = 100 * (b["test"]["balanced_accuracy"] - a["test"]["balanced_accuracy"])
        lines.append(f"| {key} | {a['test']['accuracy']:.3f} / "
                     f"{a['test']['balanced_accuracy']:.3f} | {b['test']['accuracy']:.3f} / "
                     f"{b['test']['balanced_accuracy']:.3f} | {da:+.1f} | {db:+.1f} | "
                     f"{a['C']:.2g}, {a['tau']} | {b['C']:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--second", type=Path)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md")
    args = ap.parse_args()
    path = RESULTS / "class_weights.json"
    if args.render:
        res = json.loads(path.read_text())
    else:
        if not (args.bundle and args.second):
            ap.error("--bundle and --second are required (or --render)")
        res = {"command": " ".join(["python", *sys.argv]),
               "rows": run(args.bundle, args.second)}
        path.write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "class_weights.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

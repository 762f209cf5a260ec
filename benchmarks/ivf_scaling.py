"""Exact (flat) vs IVF search as the collection grows: build time, query latency, recall@10.

    python benchmarks/ivf_scaling.py --sizes 50000 200000 \
        --seed-bundle ../shared/... --out benchmarks/results/ivf_scaling

Real embeddings at this scale are out of reach on 2 cores (~1 h per 100k images), so the
vectors are synthetic but shaped like real ones: each is a random convex mix (Dirichlet
weights) of three real embeddings of the seed bundle (default encoder on clothing-small)
plus Gaussian noise, re-normalised, so neighbourhoods form a continuum as in real data
(pure random vectors have no structure and make any IVF look bad; near-copies of a few
seeds would make it look too good). Vectors go to a memory-mapped .npy and the IVF index is
built from it the way a bundle's is (sample-trained, filled block by block, nprobe tuned on held-out
queries, recall measured against exact search).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synth(seeds: np.ndarray, n: int, path: Path, seed: int = 0, block: int = 50_000
          ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = seeds.shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, block):
        m = min(block, n - s)
        # A random convex mix of three real embeddings, plus noise: neighbourhoods form a
        # continuum (no tight clusters of near-copies, which would flatter IVF).
        w = rng.dirichlet((1.0, 1.0, 1.0), m).astype(np.float32)
        x = sum(w[:, i:i + 1] * seeds[rng.integers(0, len(seeds), m)] for i in range(3))
        x += rng.normal(0, 0.2 / np.sqrt(d), (m, d)) * np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def latency(index: Any, queries: np.ndarray) -> dict[str, float]:
    one = []
    for q in queries[:20]:
        t = time.perf_counter()
        index.search(q[None], 10)
        one.append(time.perf_counter() - t)
    t = time.perf_counter()
    index.search(queries, 10)
    batch = time.perf_counter() - t
    return {"single_query_ms_median": round(1000 * statistics.median(one), 2),
            "batch_queries_per_s": round(len(queries) / batch, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--pq-size", type=int, default=0, help="also build IVF-PQ at this size")
    ap.add_argument("--seed-bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ivf_scaling")
    ap.add_argument("--append", action="store_true",
                    help="keep rows of OUT.json for other (n, index) pairs")
    args = ap.parse_args()
    import faiss

    from embedsearch.bundle import load_bundle
    from embedsearch.index import make_index

    seed_b = load_bundle(args.seed_bundle)
    seeds = np.asarray(seed_b.embeddings, np.float32)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(set(args.sizes + ([args.pq_size] if args.pq_size else []))):
            x = synth(seeds, n, Path(tmp) / f"x{n}.npy")
            queries = np.ascontiguousarray(x[np.random.default_rng(9).choice(n, 200)])
            kinds = ["flat", "ivf"] if n in args.sizes else []
            if n == args.pq_size:
                kinds.append("ivfpq")
            for kind in kinds:
                t = time.perf_counter()
                index, info = make_index(x, kind)
                build = time.perf_counter() - t
                row = {"n": n, "dim": int(x.shape[1]), "type": kind,
                       "build_s": round(build, 1), **latency(index, queries),
                       "index_bytes": int(faiss.serialize_index(index).size)}
                for key in ("nlist", "nprobe", "recall_at_10", "recall_queries", "train_rows",
                            "train_seconds", "add_seconds", "pq_m", "recall_sweep"):
                    if key in info:
                        row[key] = info[key]
                rows.append(row)
                print(json.dumps(row), flush=True)
                del index
            del x
    command = " ".join([Path(sys.executable).name, *sys.argv])
    if args.append and args.out.with_suffix(".json").exists():
        old = json.loads(args.out.with_suffix(".json").read_text())
        done = {(r["n"], r["type"]) for r in rows}
        kept = [{**r, "command": old["command"], "time": old["time"]} for r in old["rows"]
                if (r["n"], r["type"]) not in done and "command" not in r] + \
            [r for r in old["rows"] if (r["n"], r["type"]) not in done and "command" in r]
        rows = sorted(kept + rows, key=lambda r: (r["n"], ["flat", "ivf", "ivfpq"].index(
            r["type"])))
    report = {
        "command": command,
        "seed_bundle": {"encoder": seed_b.manifest["encoder"]["spec"],
                        "rows": len(seeds), "source": seed_b.manifest["source"]["path"]},
        "versions": {"python": platform.python_version(), "faiss": faiss.__version__},
        "machine": {"platform": platform.platform(), "omp_threads": faiss.omp_get_max_threads(),
                    "note": "shared 2-core machine: other work may overlap"},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Flat vs IVF as n grows ({report['seed_bundle']['encoder']}-shaped synthetic "
             f"vectors, {rows[0]['dim'] if rows else '?'}-d)", "",
             f"`{report['command']}` — {report['time']}, {report['machine']['platform']}, "
             + ("(rows marked † are from the earlier run "
                f"`{next(r['command'] for r in rows if 'command' in r)}`) "
                if any("command" in r for r in rows) else "") +
             f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", "",
             "| n | index | build s | 1 query ms | batch q/s | nlist | nprobe | recall@10 "
             "| index MB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['type']}{' †' if 'command' in r else ''} | "
                     f"{r['build_s']} | "
                     f"{r['single_query_ms_median']} | {r['batch_queries_per_s']} | "
                     f"{r.get('nlist', '')} | {r.get('nprobe', '')} | "
                     f"{r.get('recall_at_10', 1.0)} | {r['index_bytes'] / 2**20:.0f} |")
    lines += ["", "recall@10: held-out rows as queries (1,000, or n/10), each query's own row "
              "excluded, against exact search over all rows; flat is exact by construction."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

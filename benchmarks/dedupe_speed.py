"""Time :func:`embedsearch.dedupe.find_duplicates` on 100,000 synthetic 1280-d embeddings.

Two kinds of synthetic vectors, each with planted near-duplicates (a vector plus noise,
descriptor cosine about 0.90–0.99 to its original) and exact copies:

- ``gaussian``: isotropic random directions, the worst case for the projected search
  (no low-dimensional structure at all);
- ``clustered``: non-negative, CNN-like features (ReLU of a mixture of 200 Gaussian
  clusters), where distinct images are much more alike, as in real collections.

Reports wall-clock and CPU seconds of the whole call (descriptor, search, grouping) and
the recall of the planted pairs. Run:

    .venv/bin/python benchmarks/dedupe_speed.py [--n 100000] [--dim 1280]

Writes benchmarks/results/dedupe_speed.{json,md}. ``--memmap DIR`` writes the vectors to
an ``.npy`` file in DIR and passes them memory-mapped, as a bundle's embeddings are read
(``store.io.read_npy``); the 1M run uses it (benchmarks/results/dedupe_speed_1m.md). Peak
resident memory is reported for the whole process and for the ``find_duplicates`` call alone
(``VmHWM`` reset through ``/proc/self/clear_refs`` before the call, where Linux allows it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def synthetic(kind: str, n: int, dim: int, n_dups: int, n_exact: int, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(vectors, planted i, planted j, sha256) with rows j near-duplicates of rows i."""
    rng = np.random.default_rng(seed)
    base = n - n_dups - n_exact
    if kind == "gaussian":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((200, dim), dtype=np.float32)
        x = centres[rng.integers(0, 200, n)] + 0.8 * rng.standard_normal((n, dim),
                                                                          dtype=np.float32)
        np.maximum(x, 0, out=x)
    src = rng.choice(base, n_dups, replace=False)
    dst = np.arange(base, base + n_dups)
    # Noise scaled per copy so the planted similarities spread over roughly 0.9–0.99.
    scale = rng.uniform(0.04, 0.20, n_dups).astype(np.float32)[:, None]
    noise = rng.standard_normal((n_dups, dim), dtype=np.float32) * np.abs(x[src]).mean(1,
                                                                                     keepdims=True)
    x[dst] = x[src] + scale * noise * 2.5
    if kind == "clustered":
        np.maximum(x[dst], 0, out=x[dst])
    for k in range(0, n, 65536):  # block by block: no second n × dim array
        x[k:k + 65536] /= np.linalg.norm(x[k:k + 65536], axis=1, keepdims=True)
    ex_src = rng.choice(base, n_exact, replace=False)
    ex_dst = np.arange(base + n_dups, n)
    x[ex_dst] = x[ex_src]
    sha = [f"h{k}" for k in range(n)]
    for a, b in zip(ex_src, ex_dst, strict=True):
        sha[b] = sha[a]
    return x, src, dst, sha


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _monitor(every: float = 15.0) -> None:
    """Print elapsed time and memory to stderr every ``every`` s (a run stopped by a time
    limit still shows how far it got and its memory so far)."""
    import threading

    t0 = time.perf_counter()

    def loop() -> None:
        while True:
            time.sleep(every)
            mem = {f: _status_kib(f) for f in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
            print(f"[{time.perf_counter() - t0:7.1f} s] " + ", ".join(
                f"{k} {v / 2**20:.2f} GiB" for k, v in mem.items() if v is not None),
                file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True).start()


def vectors_for(kind: str, n: int, dim: int, memmap: Path | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[Path]]:
    """(vectors, planted i, planted j, sha256, files made here). With ``memmap``, the
    vectors are memory-mapped from DIR (written there first, unless an earlier run with
    ``--prepare-only`` left them: then they are reused and kept)."""
    from embedsearch.store.io import read_npy

    if memmap is None:
        return (*synthetic(kind, n, dim, n_dups=2000, n_exact=500), [])
    memmap.mkdir(parents=True, exist_ok=True)
    path = memmap / f"dedupe_speed_{kind}_{n}x{dim}.npy"
    planted = path.with_suffix(".planted.npz")
    made = []
    if not (path.is_file() and planted.is_file()):
        x, src, dst, sha = synthetic(kind, n, dim, n_dups=2000, n_exact=500)
        np.save(path, x)
        del x
        np.savez(planted, src=src, dst=dst, sha=np.array(sha))
        made = [path, planted]
    with np.load(planted) as z:
        src, dst, sha = z["src"], z["dst"], z["sha"].tolist()
    return read_npy(path, mmap=True), src, dst, sha, made


def run(kind: str, n: int, dim: int, threshold: float, memmap: Path | None = None,
        prepare_only: bool = False) -> dict | None:
    from embedsearch.dedupe import find_duplicates
    from embedsearch.dedupe.search import DEFAULT_POWER, as_unit_vectors

    x, src, dst, sha, made = vectors_for(kind, n, dim, memmap)
    if prepare_only:
        return None
    desc_sim = np.einsum("ij,ij->i", *(as_unit_vectors(x[r], DEFAULT_POWER) for r in (src, dst)))
    reset = _reset_peak_rss()
    w0, c0 = time.perf_counter(), time.process_time()
    res = find_duplicates(x, threshold=threshold, sha256=sha)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    hwm = _status_kib("VmHWM") if reset else None
    del x
    for f in made:
        f.unlink()
    g = res.group_of
    planted = desc_sim >= threshold
    found = g[src] == g[dst]
    s = res.summary()
    return {"kind": kind, "n": n, "dim": dim, "threshold": threshold,
            "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "method": res.method, "groups": s["groups"], "removed": s["removed"],
            "removed_exact": s["removed_exact"],
            "planted_pairs_at_or_above_threshold": int(planted.sum()),
            "recall_of_those": round(float(found[planted].mean()), 4),
            "planted_similarity_range": [round(float(desc_sim.min()), 3),
                                         round(float(desc_sim.max()), 3)],
            "vectors": "memory-mapped .npy" if memmap is not None else "in memory",
            "call_peak_rss_gib": None if hwm is None else round(hwm / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--kinds", default="gaussian,clustered")
    ap.add_argument("--memmap", type=Path, default=None, metavar="DIR",
                    help="pass the vectors memory-mapped from an .npy written in DIR "
                         "(deleted after), as a bundle's embeddings are read")
    ap.add_argument("--prepare-only", action="store_true",
                    help="with --memmap: only write the vectors into DIR, for a later run "
                         "to reuse (and keep): synthesis then stays out of that run's time")
    ap.add_argument("--progress", action="store_true",
                    help="print elapsed time and memory every 15 s, and the search's log")
    ap.add_argument("--out", type=Path, default=RESULTS / "dedupe_speed",
                    help="results path without suffix (.json and .md are written)")
    args = ap.parse_args()
    from embedsearch.dedupe import DEFAULT_THRESHOLD

    if args.prepare_only and args.memmap is None:
        ap.error("--prepare-only needs --memmap DIR")
    if args.progress:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("embedsearch.dedupe").setLevel(logging.DEBUG)
        _monitor()
    rows = [r for k in args.kinds.split(",")
            if (r := run(k, args.n, args.dim, DEFAULT_THRESHOLD, args.memmap,
                         args.prepare_only)) is not None]
    if args.prepare_only:
        print(f"vectors written to {args.memmap}")
        return
    load = os.getloadavg()
    result = {"benchmark": "dedupe_speed",
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "rows": rows,
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count(), "load_average_1_5_15": [round(v, 2)
                                                                           for v in load]},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Dedupe speed: synthetic embeddings", "",
             f"Command: `{result['command']}` ({result['created']}); {os.cpu_count()} CPUs, "
             f"load average at the end {load[0]:.1f} (other work on the machine slows the "
             "wall clock: CPU seconds ÷ cores estimates the wall time on an idle machine).",
             "",
             "| vectors | n | dim | wall s | CPU s | method | planted pairs >= threshold "
             "| their recall | removed (exact) | input | call peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['n']:,} | {r['dim']} | {r['wall_seconds']} "
                     f"| {r['cpu_seconds']} | {r['method']} "
                     f"| {r['planted_pairs_at_or_above_threshold']} | {r['recall_of_those']} "
                     f"| {r['removed']} ({r['removed_exact']}) | {r['vectors']} "
                     f"| {r['call_peak_rss_gib']} |")
    lines.append(f"\nPeak resident memory of the whole process: {result['peak_rss_gib']} GiB.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

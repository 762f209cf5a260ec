"""Encoding throughput of the local engine vs the Ray engine with 1 and 2 encoder actors.

    python benchmarks/scaling_throughput.py --images 300 --repeats 3 \
        --out benchmarks/results/scaling_throughput

Same images (the first N of clothing-small/train, sorted), same encoder (default:
efficientnet-lite0, fp32), same chunking as a build. For each run: total wall time
(including, for Ray, starting the actors and loading the model in each) and steady-state
throughput: for Ray, images ÷ (last batch end − first batch start) on the actors' clocks;
for the local engine (no start-up to speak of: the encoder is loaded once before), images
after the first chunk ÷ time from the first chunk to the last.
Per-image cost in core-seconds = cores the engine occupies ÷ steady throughput (what a
cluster bills). A local Ray runtime with 2 CPUs is started once for all Ray runs.
Results: JSON + Markdown with versions and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"


def _cpu() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(chunks: Any, ray_stats: dict[str, float] | None = None) -> dict[str, float]:
    """Wall times, and CPU seconds per image: this process and its reaped children (the
    local engine's decode workers), plus the Ray actors' own accounting when given."""
    t0 = time.perf_counter()
    c0 = _cpu()
    first = None
    n_first = n = 0
    for _, infos in chunks:
        if first is None:
            first, n_first = time.perf_counter(), len(infos)
        n += len(infos)
    end = time.perf_counter()
    cpu = _cpu() - c0
    steady = (n - n_first) / (end - first) if first and end > first else 0.0
    out = {"images": n, "total_s": end - t0, "startup_s": (first or end) - t0,
           "steady_images_per_s": steady, "driver_cpu_s_per_image": cpu / n}
    if ray_stats is not None:
        out["worker_cpu_s_per_image"] = ray_stats["worker_cpu_s"] / ray_stats["images"]
        # Actors' own clocks, first batch start → last batch end: model loading and actor
        # start-up left out (output blocks reach the driver in bunches, so driver-side
        # arrival times would overstate the rate).
        out["steady_images_per_s"] = n / (ray_stats["t_last"] - ray_stats["t_first"])
    return out


def _summary(runs: list[dict[str, float]], cores: float) -> dict[str, Any]:
    steady = statistics.median(r["steady_images_per_s"] for r in runs)
    total = statistics.median(r["total_s"] for r in runs)
    n = runs[0]["images"]
    cpu = statistics.median(r.get("worker_cpu_s_per_image", 0) + r["driver_cpu_s_per_image"]
                            for r in runs)
    worker = [r["worker_cpu_s_per_image"] for r in runs if "worker_cpu_s_per_image" in r]
    return {"cores": cores, "repeats": len(runs),
            "cpu_seconds_per_image": round(cpu, 4),
            **({"actor_cpu_seconds_per_image": round(statistics.median(worker), 4)}
               if worker else {}),
            "steady_images_per_s": round(steady, 2),
            "total_s_median": round(total, 2),
            "end_to_end_images_per_s": round(n / total, 2),
            "core_seconds_per_image": round(cores / steady, 4),
            "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=CLOTHING / "train",
                    help="image folder to sample (default: clothing-small/train)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64, help="shard size (commit unit)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scaling_throughput")
    args = ap.parse_args()
    train = args.data
    if not train.exists():
        sys.exit(f"{train} is absent")
    from embedsearch.data.scan import scan
    from embedsearch.encoders import load_encoder
    from embedsearch.engines.ray_engine import RayOptions, encode_chunks, ray_runtime
    from embedsearch.pipeline import _local_chunks

    paths = sorted(r.path for r in scan(train).records)[:args.images]
    enc = load_encoder(args.model)
    enc.fingerprint()
    import torch

    raw: dict[str, list[dict[str, float]]] = {"local": [], "ray_1": [], "ray_2": []}
    load = [os.getloadavg()[0]]
    with ray_runtime(RayOptions(init_kwargs={"num_cpus": 2})) as ray:
        # Engines interleaved within each repeat, so load from other work on this shared
        # machine falls on all of them alike.
        for rep in range(args.repeats):
            raw["local"].append(_timed(_local_chunks(enc, paths, args.chunk, args.batch_size,
                                                     None, None)))
            for workers in (1, 2):
                st: dict[str, float] = {}
                opts = RayOptions(num_workers=workers, batch_size=args.batch_size)
                raw[f"ray_{workers}"].append(
                    _timed(encode_chunks(enc, paths, args.chunk, opts, stats=st), st))
            load.append(os.getloadavg()[0])
            print(rep, {k: round(v[-1]["steady_images_per_s"], 1) for k, v in raw.items()},
                  flush=True)
        ray_version = ray.__version__
    # Decode + preprocess alone, one process, one image at a time: the CPU part that a GPU
    # worker still has to do on its CPUs (the GPU projection in docs/scaling.md uses it).
    from embedsearch.data.images import load_image

    c0 = time.process_time()
    for p in paths:
        img = load_image(p, target_size=enc.preprocess.resize)
        enc.preprocess.worker_transform(img.image)
    decode_cpu = (time.process_time() - c0) / len(paths)
    # Local engine: decode workers (spare cores) + torch threads in the main process: the
    # whole machine.
    results = {"local": _summary(raw["local"], float(os.cpu_count() or 2)),
               "ray_1": _summary(raw["ray_1"], 1.0), "ray_2": _summary(raw["ray_2"], 2.0)}
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "encoder": args.model, "precision": enc.precision, "images": len(paths),
        "dataset": str(train.resolve().relative_to(REPO.parent.resolve())
                       if train.resolve().is_relative_to(REPO.parent.resolve()) else train),
        "batch_size": args.batch_size,
        "chunk": args.chunk, "torch_threads_local": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ray": ray_version},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_1min": [round(x, 1) for x in load],
                    "note": "shared 2-core machine: other test runs may overlap"},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    report = {**meta, "results": results,
              "decode_preprocess_cpu_seconds_per_image": round(decode_cpu, 4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Encoding throughput: local vs Ray ({args.model}, {len(paths)} images)", "",
             f"`{meta['command']}` — {meta['time']}, {meta['machine']['platform']}, "
             f"{meta['machine']['cpus']} CPUs, ray {ray_version}, torch {torch.__version__}; "
             f"1-min load average during the runs: {meta['machine']['load_average_1min']}", "",
             "| engine | cores | steady img/s | core-s / image (cores ÷ rate) | "
             "CPU-s / image (measured) | end-to-end s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['cores']:g} | {r['steady_images_per_s']} | "
                     f"{r['core_seconds_per_image']} | {r['cpu_seconds_per_image']} | "
                     f"{r['total_s_median']} |")
    lines += ["", f"Decode + preprocess alone: {decode_cpu:.4f} CPU-s per image.", "",
              f"Median of {args.repeats} runs. Steady = after the first chunk arrives "
              "(Ray: actors started, model loaded). End-to-end includes that start-up. "
              "CPU-s / image: CPU time actually used (driver process and its decode "
              "workers; plus the Ray actors' own process time), which contention from other "
              "work on the machine inflates far less than wall time."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Throughput of every stage, side by side in one run, against the model-only limit.

    python benchmarks/throughput.py                       # default encoder, clothing-small
    python benchmarks/throughput.py --models efficientnet-lite0 openclip:ViT-B-32 \
        --images 1024 --out benchmarks/results/throughput

For each encoder: (a) model-only forward on pre-made tensors, (b) the full build-index
pipeline on real JPEGs, and (b)/(a). Also decode-only throughput, kNN query latency (one
image end to end, warm; 1,000 queries batched), head training time, dedupe time on
synthetic vectors, and peak memory. ``--accuracy`` also embeds the whole of clothing-small
in fp32 and bf16 and compares kNN accuracy and prediction agreement.
Results: JSON + Markdown, with versions and machine description.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"


def median_rate(fn: Callable[[], Any], items: int, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"images_per_s": round(items / med, 2), "seconds_median": round(med, 4),
            "seconds_min": round(min(times), 4), "seconds_max": round(max(times), 4),
            "repeats": repeats}


def model_only(spec: str, precision: str, channels_last: bool, batch: int, batches: int,
               repeats: int) -> dict:
    import torch

    from embedsearch.encoders import load_encoder

    enc = load_encoder(spec, precision=precision, channels_last=channels_last)
    size = enc.preprocess.crop
    x = torch.randn(batch, 3, size, size)

    def run() -> None:
        for _ in range(batches):
            enc.encode_tensors(x)

    return median_rate(run, batch * batches, repeats)


def decode_only(files: list[Path], spec: str) -> dict:
    from embedsearch.data.images import load_image
    from embedsearch.encoders import load_encoder

    prep = load_encoder(spec).preprocess
    datas = [f.read_bytes() for f in files]

    def run() -> None:
        for d in datas:
            loaded = load_image(d, target_size=prep.resize)
            prep.worker_transform(loaded.image)  # type: ignore[union-attr]

    return median_rate(run, len(datas), 3)


def pipeline(data: Path, spec: str, precision: str, repeats: int, workers: int | None) -> dict:
    from embedsearch import build_index

    rates = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            res = build_index(data, out=Path(tmp) / "b", model=spec, precision=precision,
                              num_workers=workers)
            rates.append(res.images_per_second)
    return {"images_per_s": round(statistics.median(rates), 2),
            "runs": [round(r, 2) for r in rates], "images": res.encoded}


def subset(files: list[Path], n: int, dest: Path) -> Path:
    for f in files[:n]:
        target = dest / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)  # a copy: symlinks leaving the root are not followed
    return dest


def knn_latency(data: Path, query: Path) -> dict:
    from embedsearch import build_index, load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        build_index(data, out=Path(tmp) / "b")
        bundle = load_bundle(Path(tmp) / "b")
        bundle.predict([query], num_workers=0)  # warm: model loaded, caches filled
        single = []
        for _ in range(20):
            t = time.perf_counter()
            bundle.predict([query], num_workers=0)
            single.append(time.perf_counter() - t)
        emb = np.asarray(bundle.embeddings)
        rng = np.random.default_rng(0)
        q = emb[rng.integers(0, len(emb), 1000)] + rng.normal(0, 0.01, (1000, emb.shape[1]))
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        clf = bundle.knn(10)
        t = time.perf_counter()
        clf.predict_proba(q)
        batched = time.perf_counter() - t
    return {"single_image_end_to_end_ms_median": round(1000 * statistics.median(single), 1),
            "single_image_ms_min": round(1000 * min(single), 1),
            "batched_1000_queries_ms": round(1000 * batched, 1),
            "per_query_batched_ms": round(batched, 4)}


def cli_cold_start(data: Path, query: Path) -> dict:
    import subprocess

    from embedsearch import build_index

    exe = str(Path(sys.executable).parent / "embedsearch")
    with tempfile.TemporaryDirectory() as tmp:
        build_index(data, out=Path(tmp) / "b")
        times = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([exe, "-q", "predict", str(query), "--index", str(Path(tmp) / "b")],
                           check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, capture_output=True)
        help_s = time.perf_counter() - t
    return {"predict_one_image_cold_s_median": round(statistics.median(times), 2),
            "help_s": round(help_s, 3)}


def heads_timing(dim: int = 1280, n: int = 3000, classes: int = 10) -> dict:
    try:
        from embedsearch.classify.heads import LinearHead, MLPHead
    except ImportError:
        return {"skipped": "embedsearch.classify.heads not available"}
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(0, 3, (n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = np.array([f"c{i}" for i in y])
    out = {}
    for name, cls in (("linear", LinearHead), ("mlp", MLPHead)):
        t = time.perf_counter()
        cls().fit(x[: int(n * 0.85)], labels[: int(n * 0.85)], x[int(n * 0.85):],
                  labels[int(n * 0.85):])
        out[f"{name}_train_s"] = round(time.perf_counter() - t, 2)
    out["n"], out["dim"] = n, dim
    return out


def dedupe_timing(sizes: list[int], dim: int = 1280) -> dict:
    try:
        from embedsearch.dedupe import find_duplicates
    except ImportError:
        return {"skipped": "embedsearch.dedupe not available"}
    out = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"img{i}" for i in range(n)]
        t = time.perf_counter()
        find_duplicates(x, ids)
        out[f"{n}"] = round(time.perf_counter() - t, 2)
        del x
    return out


def accuracy_bf16(spec: str) -> dict:
    from embedsearch import build_index, load_bundle

    out: dict[str, Any] = {}
    preds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            res = build_index(CLOTHING, out=Path(tmp) / precision, model=spec,
                              precision=precision)
            b = load_bundle(res.path)
            n = b.reference_rows
            test = b.items.iloc[n:]
            p = b.predict_vectors(np.asarray(b.embeddings[n:]), test["id"].tolist(), k=10)
            labels = np.array([x.label for x in p])
            preds[precision] = labels
            out[precision] = {"knn10_accuracy": round(float(np.mean(labels == test["label"])), 4),
                              "encode_images_per_s": round(res.images_per_second, 2)}
        e32 = np.asarray(load_bundle(Path(tmp) / "fp32").embeddings)
        e16 = np.asarray(load_bundle(Path(tmp) / "bf16").embeddings)
        out["agreement"] = round(float(np.mean(preds["fp32"] == preds["bf16"])), 4)
        out["embedding_cosine_min"] = round(float((e32 * e16).sum(1).min()), 5)
        out["embedding_cosine_median"] = round(float(np.median((e32 * e16).sum(1))), 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--images", type=int, default=768, help="clothing-small images to embed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--dedupe-sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--accuracy", action="store_true", help="bf16 vs fp32 on clothing-small")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="sections to skip: decode knn cli heads dedupe")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "throughput")
    args = ap.parse_args()
    if not CLOTHING.exists():
        sys.exit(f"{CLOTHING} is absent: this benchmark needs ../shared/datasets/clothing-small")
    files = sorted((CLOTHING / "train").glob("*/*.jpg"))
    query = sorted((CLOTHING / "test").glob("*/*.jpg"))[0]
    from embedsearch.report.provenance import git_revision, machine, package_versions

    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "versions": package_versions(), "machine": machine(),
                               "git": git_revision(str(REPO)), "encoders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(files, args.images, Path(tmp) / "subset")
        for spec in args.models:
            r: dict[str, Any] = {}
            for precision in args.precisions:
                # Interleaved (model, pipeline, model, …) so drift of the shared machine
                # hits both alike; the ratio is taken pair by pair.
                pairs = []
                for _ in range(args.repeats):
                    mo = model_only(spec, precision, True, 32, args.images // 32, 1)
                    pl = pipeline(data, spec, precision, 1, args.workers)
                    pairs.append((mo["images_per_s"], pl["images_per_s"]))
                r[precision] = {
                    "model_only_images_per_s": statistics.median(m for m, _ in pairs),
                    "pipeline_images_per_s": statistics.median(p for _, p in pairs),
                    "ratio_median_of_pairs": round(statistics.median(p / m for m, p in pairs), 3),
                    "pairs": pairs,
                }
                print(spec, precision, json.dumps(r[precision]), flush=True)
            r["fp32_no_channels_last_model_only"] = model_only(spec, "fp32", False, 32,
                                                               max(2, args.images // 128),
                                                               args.repeats)
            if "decode" not in args.skip:
                r["decode_only"] = decode_only(files[: args.images], spec)
            results["encoders"][spec] = r
        if "knn" not in args.skip:
            results["knn_latency"] = knn_latency(data, query)
        if "cli" not in args.skip:
            results["cli"] = cli_cold_start(data, query)
    if "heads" not in args.skip:
        results["heads"] = heads_timing()
    if "dedupe" not in args.skip:
        results["dedupe_seconds"] = dedupe_timing(args.dedupe_sizes)
    if args.accuracy:
        results["bf16_accuracy"] = accuracy_bf16(args.models[0])
    results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

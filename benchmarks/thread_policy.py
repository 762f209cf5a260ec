"""Thread counts and wait policies under contention: images/s idle and beside a busy loop.

    python benchmarks/thread_policy.py --policies torch torch:passive torch:threads=1 \
        openvino --rounds 3 --out benchmarks/results/thread_policy

A policy is ``BACKEND[:OPTION,...]``; options: ``passive`` (OMP_WAIT_POLICY=PASSIVE),
``active`` (OMP_WAIT_POLICY=ACTIVE), ``threads=N`` (torch.set_num_threads / the runtime's
thread count), ``streams=N`` (OpenVINO streams), ``chunk=N`` (OpenVINO images per request;
16 = the old even split of a 32-image batch over 2 streams), ``fixed`` (torch runs each
batch as one call at its own thread count instead of as single-threaded streams, one per
core, ``Encoder.cpu_streams``). The previous policy, ``governor`` (a thread count chosen
between batches by encoders/threads.py), was measured at commit e4ba41e and removed with
that module. Each (round, policy) cell runs in a fresh
process (wait policies are read once, when the OpenMP runtime loads), which measures
model-only images/s (``encode_tensors`` on pre-made batches of 32) with no competitor and
beside one ``while True: pass`` process that it starts and stops itself
(:class:`throughput.BusyLoad`), in alternating order; ``--pipeline N`` also times
``build_index`` of N clothing-small JPEGs both ways. Rounds run every policy in turn, so
drift of a shared machine hits them alike; ratios are taken within a process, minutes
apart at most. JSON + Markdown with versions, machine and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
# Every build must encode: the shared embedding cache would serve repeated builds of the
# same images without running the model (exports still go to the user cache folder).
os.environ["EMBEDSEARCH_CACHE_DIR"] = "off"

from throughput import CLOTHING, BusyLoad, subset  # noqa: E402


def parse_policy(policy: str) -> tuple[str, dict[str, str], dict[str, int]]:
    """(backend, environment, numeric options) of ``BACKEND[:OPTION,...]``."""
    backend, _, rest = policy.partition(":")
    env: dict[str, str] = {}
    opts: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        if item in ("passive", "active"):
            env["OMP_WAIT_POLICY"] = item.upper()
        elif item == "fixed":
            opts["fixed"] = 1
        elif "=" in item and item.split("=")[0] in ("threads", "streams", "chunk"):
            key, value = item.split("=")
            opts[key] = int(value)
        else:
            raise SystemExit(f"unknown policy option {item!r} in {policy!r}")
    return backend, env, opts


def child(policy: str, spec: str, batches: int, pipeline_images: int, busy_first: bool) -> dict:
    """One process: load the encoder under ``policy``, then one idle and one busy measure."""
    import torch

    from embedsearch import build_index
    from embedsearch.encoders import load_encoder
    from embedsearch.encoders.backends import OnnxRuntime, OpenVINORuntime, _export_dir

    backend, _, opts = parse_policy(policy)
    if "threads" in opts:
        torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    enc = load_encoder(spec, backend=backend)
    if enc.backend != backend:
        return {"error": f"backend {backend} not usable (got {enc.backend})"}
    enc.cpu_streams = "fixed" not in opts
    if backend != "torch" and opts:
        folder = _export_dir(enc, backend)
        if backend == "openvino":
            enc.runtime = OpenVINORuntime(folder / "model.xml", threads=opts.get("threads"),
                                          **{k: opts[k] for k in ("streams", "chunk")
                                             if k in opts})
        else:
            enc.runtime = OnnxRuntime(folder / "model.onnx", threads=opts.get("threads"))
    size = enc.preprocess.crop
    x = torch.randn(32, 3, size, size)
    one_call = enc.encode_tensors(x)  # warm
    streams = enc._streams(len(x))
    if streams > 1:  # the streams' vectors against one call at torch's thread count
        enc.cpu_streams = False
        diff = float(abs(enc.encode_tensors(x) - one_call).max())
        enc.cpu_streams = True
    data = None
    scratch = tempfile.TemporaryDirectory(prefix="tp-")  # removed when the child exits
    if pipeline_images:
        files = sorted((CLOTHING / "train").rglob("*.jpg"))[::7][:pipeline_images]
        data = subset(files, pipeline_images, Path(scratch.name))
    out: dict[str, Any] = {"threads_torch": torch.get_num_threads(), "streams": streams}
    if streams > 1:
        out["max_abs_diff_vs_one_call"] = diff
    for load in ((1, 0) if busy_first else (0, 1)):
        with BusyLoad(load):
            t = time.perf_counter()
            for _ in range(batches):
                enc.encode_tensors(x)
            out[f"model_load{load}"] = 32 * batches / (time.perf_counter() - t)
            if data is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    res = build_index(data, out=Path(tmp) / "b", encoder=enc)
                out[f"pipeline_load{load}"] = res.images_per_second
    scratch.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=["torch", "torch:passive", "openvino"])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=12, help="batches of 32 per measure")
    ap.add_argument("--pipeline", type=int, default=0, metavar="N",
                    help="also time build_index of N clothing-small train JPEGs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "thread_policy")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--busy-first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batches, args.pipeline,
                               args.busy_first)))
        return
    from embedsearch.report.provenance import git_revision, machine, package_versions

    load_before = os.getloadavg()
    cells: dict[str, list[dict]] = {p: [] for p in args.policies}
    for r in range(args.rounds):
        for policy in args.policies:
            _, env, _ = parse_policy(policy)
            cmd = [sys.executable, __file__, "--child", policy, "--model", args.model,
                   "--batches", str(args.batches), "--pipeline", str(args.pipeline)]
            if r % 2:
                cmd.append("--busy-first")
            proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True,
                                  text=True, check=False)
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                res = {"error": proc.stderr[-500:]}
            res["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
            cells[policy].append(res)
            print(policy, {k: round(v, 1) if isinstance(v, float) else v
                           for k, v in res.items()}, flush=True)
    rows = []
    for policy, runs in cells.items():
        ok = [c for c in runs if "error" not in c]
        row: dict[str, Any] = {"policy": policy, "runs": runs}
        for stage in ("model", "pipeline"):
            pairs = [(c[f"{stage}_load0"], c[f"{stage}_load1"]) for c in ok
                     if f"{stage}_load0" in c]
            if pairs:
                row[f"{stage}_idle"] = round(statistics.median(p[0] for p in pairs), 1)
                row[f"{stage}_busy"] = round(statistics.median(p[1] for p in pairs), 1)
                row[f"{stage}_ratio"] = round(statistics.median(p[1] / p[0] for p in pairs), 3)
                row[f"{stage}_ratios"] = [round(p[1] / p[0], 3) for p in pairs]
        rows.append(row)
    load_after = os.getloadavg()
    result = {"benchmark": "thread_policy",
              "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "model": args.model, "rows": rows,
              "load_average_1_5_15_before": [round(v, 2) for v in load_before],
              "load_average_1_5_15_after": [round(v, 2) for v in load_after],
              "machine": machine(), "versions": package_versions(),
              "git": git_revision(str(REPO)), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Thread policy under contention: {args.model}", "",
             f"Command: `{result['command']}` ({result['created']}); {os.cpu_count()} CPUs; "
             f"1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
             "(other people's work included: 'idle' = no competitor started by this script).",
             "", "| policy | model idle | model busy | busy/idle (pairs) "
             "| pipeline idle | pipeline busy | busy/idle (pairs) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cols = []
        for stage in ("model", "pipeline"):
            if f"{stage}_idle" in r:
                cols += [str(r[f"{stage}_idle"]), str(r[f"{stage}_busy"]),
                         f"**{r[f'{stage}_ratio']}** ({', '.join(map(str, r[f'{stage}_ratios']))})"]
            else:
                cols += ["–", "–", "–"]
        lines.append(f"| {r['policy']} | " + " | ".join(cols) + " |")
    lines.append("\nimages/s, medians over rounds; one busy competitor = one `while True: pass` "
                 "process started and stopped by the measuring process.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

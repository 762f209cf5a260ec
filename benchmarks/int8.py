"""int8 against fp32 on OpenVINO: speed, and what it costs in 10-NN predictions.

    python benchmarks/int8.py --reference CLOTHING_FULL_BUNDLE \
        --models efficientnet-lite0 openclip:ViT-B-32 --out benchmarks/results/int8

A measurement, not an option: embedsearch has no int8 mode. Each encoder's cached OpenVINO
export (the default backend's graph) is quantised post-training with NNCF
(``nncf.quantize``, its default symmetric preset; ``model_type=TRANSFORMER`` for ViTs),
calibrated on ``--calibration`` clothing-small train images preprocessed by the encoder's
own transform. Then, in one run, paired:

- model-only images/s (``encode_tensors`` on pre-made batches of 32) and the full
  ``build_index`` pipeline on ``--images`` train JPEGs, fp32 and int8, with no competitor
  and beside one busy-loop process (``throughput.BusyLoad``);
- with ``--reference`` (a torch fp32 bundle of all of clothing-small) and the reference's
  encoder: all of clothing-small re-embedded with int8 and its 10-NN test predictions
  compared with torch fp32's (``throughput.encoder_agreement``), plus the cosine of every
  int8 vector to its torch one. Random-weight encoders (ViT-B-32 here: model hubs are
  unreachable) get the cosine to their own fp32 vectors and, with ``--subset N``, the same
  10-NN comparison against their own fp32 (OpenVINO) bundle of N clothing-small images
  (train and test in the dataset's proportions), since there is no torch reference bundle.

Needs ``pip install nncf`` (a benchmark-only peer, not a dependency of embedsearch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
# Every build must encode (the shared embedding cache keys vectors by encoder identity,
# which int8 does not change: it would hand back the fp32 vectors).
os.environ["EMBEDSEARCH_CACHE_DIR"] = "off"

from throughput import CLOTHING, BusyLoad, _encoder, encoder_agreement, subset  # noqa: E402


def preprocessed(enc: Any, files: list[Path]) -> list[np.ndarray]:
    """Each file as the (1, 3, crop, crop) float32 array the exported graph takes."""
    from embedsearch.data.images import load_image

    prep = enc.preprocess
    return [prep.finish(prep.worker_transform(
        load_image(f.read_bytes(), target_size=prep.resize).image)[None]).numpy()
        for f in files]


def quantize(enc: Any, calibration: list[np.ndarray], folder: Path) -> Path:
    """NNCF post-training int8 of the encoder's cached OpenVINO export, saved in folder."""
    import nncf
    import openvino as ov

    from embedsearch.encoders.backends import _export_dir

    model = ov.Core().read_model(_export_dir(enc, "openvino") / "model.xml")
    kind = nncf.ModelType.TRANSFORMER if "vit" in enc.spec.lower() else None
    q = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration),
                      **({"model_type": kind} if kind else {}))
    ov.save_model(q, folder / "model.xml", compress_to_fp16=False)
    return folder / "model.xml"


def int8_encoder(spec: str, xml: Path) -> Any:
    """The default-backend (OpenVINO fp32) encoder with its runtime swapped for int8."""
    from embedsearch.encoders.backends import OpenVINORuntime

    enc = _encoder(spec, "openvino")
    enc.runtime = OpenVINORuntime(xml)
    enc._fingerprint = None  # recomputed through the int8 graph
    return enc


def speed(encs: dict[str, Any], data: Path, images: int, rounds: int) -> dict:
    """Paired model-only and pipeline images/s per encoder, idle and with one busy process."""
    from embedsearch import build_index

    size = next(iter(encs.values())).preprocess.crop
    x = __import__("torch").randn(32, 3, size, size)
    cells: dict[str, list[float]] = {}
    for _ in range(rounds):
        for load in (0, 1):
            with BusyLoad(load):
                for name, enc in encs.items():
                    enc.encode_tensors(x)  # warm
                    t = time.perf_counter()
                    for _ in range(max(1, images // 32)):
                        enc.encode_tensors(x)
                    cells.setdefault(f"{name}|model|{load}", []).append(
                        32 * max(1, images // 32) / (time.perf_counter() - t))
                    with tempfile.TemporaryDirectory() as tmp:
                        res = build_index(data, out=Path(tmp) / "b", encoder=enc)
                    cells.setdefault(f"{name}|pipeline|{load}", []).append(
                        res.images_per_second)
                    print(name, f"load={load}", round(cells[f"{name}|model|{load}"][-1], 1),
                          round(res.images_per_second, 1), flush=True)
    out: dict[str, Any] = {}
    for name in encs:
        r: dict[str, Any] = {}
        for stage in ("model", "pipeline"):
            idle, busy = cells[f"{name}|{stage}|0"], cells[f"{name}|{stage}|1"]
            r[f"{stage}_idle"] = round(statistics.median(idle), 1)
            r[f"{stage}_busy"] = round(statistics.median(busy), 1)
            r[f"{stage}_busy_over_idle"] = round(statistics.median(
                b / i for b, i in zip(busy, idle, strict=True)), 3)
            r[f"runs_{stage}"] = [[round(i, 1), round(b, 1)]
                                  for i, b in zip(idle, busy, strict=True)]
            if name != "fp32":
                r[f"{stage}_speedup_over_fp32_idle"] = round(statistics.median(
                    a / f for a, f in zip(idle, cells[f"fp32|{stage}|0"], strict=True)), 2)
        out[name] = r
    return out


def own_cosine(fp32: Any, int8: Any, batch: list[np.ndarray]) -> dict:
    """Cosine of int8 to fp32 vectors of the same images (one batch)."""
    import torch

    x = torch.from_numpy(np.concatenate(batch))
    a, b = fp32.encode_tensors(x), int8.encode_tensors(x)
    a, b = (np.asarray(v, np.float64) for v in (a, b))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"images": len(cos), "cosine_min": round(float(cos.min()), 5),
            "cosine_median": round(float(np.median(cos)), 5)}


def own_agreement(fp32: Any, xml: Path, n: int, work: Path) -> dict:
    """10-NN test predictions of int8 against the fp32 encoder's own bundle of ``n``
    clothing-small images (every k-th train and test image, class folders kept)."""
    from embedsearch import build_index

    files = sorted(CLOTHING.glob("*/*/*.jpg"))
    step = max(1, len(files) // n)
    data = work / "data"
    for f in files[::step][:n]:
        target = data / f.relative_to(CLOTHING)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    ref = build_index(data, out=work / "fp32", encoder=fp32).path
    return encoder_agreement(ref, {"openvino-int8": lambda s: int8_encoder(s, xml)}, data=data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0"])
    ap.add_argument("--reference", type=Path, default=None,
                    help="torch fp32 bundle of all of clothing-small (for the 10-NN check)")
    ap.add_argument("--calibration", type=int, default=300)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8")
    ap.add_argument("--subset", type=int, default=0, metavar="N",
                    help="models without --reference: 10-NN agreement of int8 with fp32 on "
                    "N clothing-small images (every k-th of train and test)")
    args = ap.parse_args()
    if not CLOTHING.is_dir():
        sys.exit(f"{CLOTHING} is absent: this benchmark needs ../shared/datasets/clothing-small")
    from embedsearch.report.provenance import git_revision, machine, package_versions

    files = sorted((CLOTHING / "train").glob("*/*.jpg"))
    result: dict[str, Any] = {
        "benchmark": "int8", "command": " ".join(["python", *sys.argv]),
        "versions": {**package_versions(), **package_versions(("nncf", "openvino"))},
        "machine": machine(), "git": git_revision(str(REPO)),
        "load_average_start": [round(v, 2) for v in os.getloadavg()], "models": {}}

    def save() -> None:
        result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    rng = np.random.default_rng(0)
    calib_files = [files[i] for i in sorted(rng.choice(len(files), args.calibration,
                                                       replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(files, args.images, Path(tmp) / "subset")
        for spec in args.models:
            fp32 = _encoder(spec, "openvino")
            t = time.perf_counter()
            calib = preprocessed(fp32, calib_files)
            folder = Path(tmp) / spec.replace(":", "-")
            folder.mkdir()
            xml = quantize(fp32, calib, folder)
            r: dict[str, Any] = {"calibration_images": len(calib),
                                 "quantize_seconds": round(time.perf_counter() - t, 1)}
            int8 = int8_encoder(spec, xml)
            r["cosine_int8_to_fp32"] = own_cosine(fp32, int8, calib[:64])
            r["speed"] = speed({"fp32": fp32, "int8": int8}, data, args.images, args.rounds)
            result["models"][spec] = r
            save()
            if args.reference is not None and \
                    spec == json.loads((args.reference / "manifest.json").read_text()
                                       )["encoder"]["spec"]:
                del fp32, int8
                r["agreement_with_torch_fp32"] = encoder_agreement(
                    args.reference, {"openvino-int8": lambda s, xml=xml: int8_encoder(s, xml)})
                save()
            elif args.subset:
                r["agreement_with_own_fp32"] = own_agreement(fp32, xml, args.subset,
                                                             Path(tmp) / f"{folder.name}-agree")
                save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

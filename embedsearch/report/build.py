"""Turn a study's ``results`` document into report.md, report.html and results.json.

Everything shown is read from ``results`` (the same document results.json holds), so a
report can be rebuilt from a results.json alone; the figures it shows come from
:mod:`embedsearch.report.figures`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from embedsearch.render.document import (
    Bold,
    Bullets,
    Code,
    CodeBlock,
    Details,
    Document,
    Heading,
    Image,
    ImageRow,
    Link,
    Para,
    Table,
    to_html,
    to_markdown,
)
from embedsearch.report.metrics import METRIC_NAMES as METRIC_LABELS
from embedsearch.report.metrics import METRICS
from embedsearch.report.results import (
    HEAD_METHODS,
    METHOD_NAMES,
    EncoderResult,
    Results,
    dumps,
    headline,
    plain,
)


# -- formatting ---------------------------------------------------------------------------
def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(fig: dict[str, Any], metric: str) -> str:
    lo, hi = fig["ci"][metric]
    return f"{_f(fig[metric])} [{_f(lo)}, {_f(hi)}]"


def _bytes(n: int) -> str:
    if n <= 0:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _secs(s: float) -> str:
    if s < 0.001:
        return "<1 ms"
    if s < 1:
        return f"{1000 * s:.0f} ms"
    return f"{s:.1f} s"


def _ms(ms: float) -> str:
    if ms < 0.001:
        return "<0.001"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.1f}"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


# -- the document -------------------------------------------------------------------------
def build_document(results: Results, out: Path) -> Document:
    ds, sp = results["dataset"], results["splits"]
    timings = results["timings"]["encoders"]
    doc = Document(results["title"])
    encs = results["encoders"]
    doc.add(Para([
        f"{ds['images']:,} labelled images in {len(ds['classes'])} classes from ",
        Code(ds["source"]), f"; {sp['protocol']}. Encoders: ",
        *_join([Code(e["label"]) for e in encs]),
        f". Seed {results['seed']}. Each encoder embedded the collection once; every method "
        "below works from those cached embeddings.",
    ]))

    doc.add(Heading(2, "Summary"))
    rows = []
    for e in encs:
        tm = timings[e["slug"]]["methods"]
        for mid in headline(e["methods"]):
            m = e["methods"][mid]
            fig = m["metrics"]
            rows.append([e["label"], m["name"],
                         _ci(fig, "accuracy"), _ci(fig, "balanced_accuracy"),
                         _ci(fig, "macro_f1"), _secs(tm[mid]["fit_seconds"]),
                         _ms(tm[mid]["predict_ms_per_image_batched"]),
                         _bytes(m["model_bytes"])])
    doc.add(Table(["encoder", "method", "accuracy [95 % CI]", "balanced accuracy",
                   "macro-F1", "training", "predict ms/img", "model in memory"], rows,
                  "llrrrrrr"))
    doc.add(Para(f"Test images: {len(results['predictions']['ids']):,}. Intervals: "
                 f"percentile bootstrap over the test images "
                 f"({results['call']['n_bootstrap']} resamples, paired across methods). "
                 "Training = fitting on the cached embeddings (index build for kNN); predict = "
                 "classifying an already-embedded image, batched (encoding it costs "
                 "1 / throughput on top, see below); the per-encoder tables also give the "
                 "single-image latency (one image per call, one thread)."))
    doc.add(Bullets(_conclusions(results)))
    doc.add(Image(out / results["figures"]["methods"], "methods × metric",
                  "Accuracy, balanced accuracy and macro-F1 per method with 95 % bootstrap "
                  "intervals."))
    doc.add(Image(out / results["figures"]["k_sweep"], "k sweep",
                  "kNN test accuracy against k, plain and similarity-weighted vote (bands: "
                  "95 % CI); dashed lines: the other methods; star: the k chosen on the "
                  "validation split."))

    doc.add(Heading(2, "Data and splits"))
    doc.add(*_data_blocks(results))

    for e in encs:
        doc.add(*_encoder_blocks(results, e, out))

    doc.add(Heading(2, "Reproduce"))
    env = results["environment"]
    git = env.get("git", {})
    pk = env.get("packages", {})
    mc = env.get("machine", {})
    doc.add(Para("Command:"))
    doc.add(CodeBlock(results["command"] or "(run from Python: see call in results.json)"))
    doc.add(Bullets([
        ["library call: ", Code(json.dumps(results["call"], ensure_ascii=False))],
        ["git revision: ", Code(str(git.get("revision"))),
         " (uncommitted changes)" if git.get("dirty") else ""],
        ["dataset fingerprint: ", Code(ds["fingerprint"]), f" ({ds['fingerprint_method']})"],
        ["packages: ", ", ".join(f"{k} {v}" for k, v in pk.items() if v)],
        ["machine: ", f"{mc.get('cpu')}, {mc.get('usable_cores')} of "
                      f"{mc.get('logical_cores')} cores usable, {mc.get('ram_gib')} GiB RAM, "
                      f"{mc.get('platform')}, Python {mc.get('python')}"],
        ["every figure above, the predictions behind it and this provenance: ",
         Link("results.json", "results.json"), "; the split of every image: ",
         Link("splits.csv", "splits.csv")],
        [f"generated {results['timings']['created']} in "
         f"{results['timings']['total_seconds']:.0f} s; 1-minute load average "
         f"{_load(results)} (timings on a busy machine read slow)"],
    ]))
    return doc


def _load(results: Results) -> str:
    la = results["timings"].get("load_average_1min") or {}
    return f"{la.get('start')} at the start, {la.get('end')} at the end"


def _join(parts: list[Any], sep: str = ", ") -> list[Any]:
    out: list[Any] = []
    for i, p in enumerate(parts):
        if i:
            out.append(sep)
        out.append(p)
    return out


def _comparison(results: Results, slug: str, a: str, metric: str
                ) -> dict[str, Any] | None:
    for c in results["comparisons"]:
        if c.get("encoder") == slug and c["a"] == a and c["b"] == "knn" \
                and c["metric"] == metric:
            return c
    return None


def _conclusions(results: Results) -> list[Any]:
    """One bullet per (encoder, trained method): the paired difference to kNN with its
    interval, a plain-words verdict, and what the difference costs."""
    out: list[Any] = []
    timings = results["timings"]["encoders"]
    for e in results["encoders"]:
        methods, tm = e["methods"], timings[e["slug"]]["methods"]
        if "knn" not in methods:
            continue
        knn = methods["knn"]
        for mid in (*HEAD_METHODS, "zeroshot"):
            if mid not in methods:
                continue
            parts = []
            for metric in METRICS:
                c = _comparison(results, e["slug"], mid, metric)
                if c is None:
                    continue
                lo, hi = c["ci"]
                verdict = "better" if lo > 0 else "worse" if hi < 0 else "not distinguishable"
                parts.append(f"{METRIC_LABELS[metric]} {_pts(c['difference'])} points "
                             f"(95 % CI {_pts(lo)} to {_pts(hi)}: {verdict})")
            if not parts:
                continue
            m = methods[mid]
            out.append([
                Bold(f"{e['label']}, {m['name']}"),
                f" vs {knn['name']} (accuracy {m['metrics']['accuracy']:.3f} vs "
                f"{knn['metrics']['accuracy']:.3f}): " + "; ".join(parts) + ". Cost: "
                f"{_secs(tm[mid]['fit_seconds'])} of training vs "
                f"{_secs(tm['knn']['fit_seconds'])} to index; "
                f"{_ms(tm[mid]['predict_ms_per_image_batched'])} vs "
                f"{_ms(tm['knn']['predict_ms_per_image_batched'])} ms per image; "
                f"{_bytes(m['model_bytes'])} vs {_bytes(knn['model_bytes'])} in memory.",
            ])
        if "finetune" in methods:
            out.append(_finetune_verdict(e, timings[e["slug"]]))
        maj = methods.get("majority")
        if maj:
            acc = maj["metrics"]["accuracy"]
            text = (f"{e['label']}: the majority-class baseline scores {acc:.3f} accuracy, "
                    f"{maj['metrics']['balanced_accuracy']:.3f} balanced accuracy.")
            if acc >= 0.5:
                text += (" The classes are strongly imbalanced: read balanced accuracy and "
                         "macro-F1, not accuracy, to compare methods.")
            out.append(text)
    names = {e["slug"]: e["label"] for e in results["encoders"]}
    for c in results["comparisons"]:
        if "method" in c:
            lo, hi = c["ci"]
            out.append(f"{names[c['a']]} vs {names[c['b']]}, {METHOD_NAMES[c['method']]}: "
                       f"{_pts(c['difference'])} accuracy points (95 % CI {_pts(lo)} to "
                       f"{_pts(hi)}).")
    return out


def _share(part: float, whole: float) -> str:
    """``part / whole`` as a percentage; "n/a" when ``whole`` is 0 (a fine-tune that scored
    nothing, or took no measurable time)."""
    return f"{part / whole:.0%}" if whole else "n/a"


def _finetune_verdict(e: EncoderResult, timing: dict[str, Any]) -> list[Any]:
    """"Frozen embeddings + head reach X of the fine-tuned accuracy at Y of its cost"."""
    methods, tm = e["methods"], timing["methods"]
    ft, ft_tm = methods["finetune"], tm["finetune"]
    frozen = [m for m in ("knn", *HEAD_METHODS) if m in methods]
    best = max(frozen, key=lambda m: methods[m]["metrics"]["accuracy"])
    acc, ft_acc = methods[best]["metrics"]["accuracy"], ft["metrics"]["accuracy"]
    encode_s = float(timing.get("encode", {}).get("seconds") or 0.0)
    frozen_s = encode_s + tm[best]["fit_seconds"]
    ft_s = ft_tm["fit_seconds"]
    gpu = ft_tm.get("train_gpu_seconds")
    return [
        Bold(f"{e['label']}: frozen embeddings + {methods[best]['name']} reach "
             f"{_share(acc, ft_acc)} of the fine-tuned accuracy at {_share(frozen_s, ft_s)} "
             "of its cost"),
        f" ({acc:.3f} vs {ft_acc:.3f} accuracy; {_secs(frozen_s)} = {_secs(encode_s)} "
        f"encoding once + {_secs(tm[best]['fit_seconds'])} training, vs {_secs(ft_s)} of "
        f"fine-tuning, {ft_tm.get('train_cpu_seconds')} CPU-s"
        + (f", {gpu} GPU-s" if gpu is not None else "") + "; "
        f"{_bytes(methods[best]['model_bytes'])} vs {_bytes(ft['model_bytes'])} of trained "
        f"weights). The fine-tune trained {ft['params'].get('blocks')} blocks on "
        f"{ft['params'].get('device')} for {ft_tm.get('epochs_run')} epochs (stopped by "
        f"{ft_tm.get('stopped_by')}; budget {ft['params'].get('budget_minutes')} min), so "
        "it is a lower bound on what fine-tuning can reach.",
    ]


def _data_blocks(results: Results) -> list[Any]:
    ds, sp = results["dataset"], results["splits"]
    blocks: list[Any] = []
    classes = ds["classes"]
    if len(sp["folds"]) == 1:
        f = sp["folds"][0]
        bc = f["by_class"]
        rows = [[c, *(str(bc[r].get(c, 0)) for r in ("train", "val", "test")),
                 str(ds["class_counts"][c])] for c in classes]
        rows.append([Bold("all"), *(Bold(str(f[r])) for r in ("train", "val", "test")),
                     Bold(str(ds["images"]))])
        blocks.append(Table(["class", "train", "validation", "test", "total"], rows, "lrrrr"))
    else:
        rows = [[c, str(ds["class_counts"][c])] for c in classes]
        blocks.append(Table(["class", "images"], rows, "lr"))
        blocks.append(Para(f"{len(sp['folds'])} folds; test images per fold: "
                           + ", ".join(str(f["test"]) for f in sp["folds"]) + "."))
    d = sp["duplicates"]
    near = (f"near-identical embeddings ({d['near_encoder']}, similarity ≥ "
            f"{d['near_threshold']:g}{_how_chosen(d)})" if d.get("near_threshold")
            else d.get("near", ""))
    if d.get("enabled") and not d.get("groups"):
        blocks.append(Para(f"Duplicates: none found (byte-identical files; {near})."))
    elif d.get("enabled"):
        text = (f"Duplicates: {d['groups']} group(s) of identical or near-identical images, "
                f"{d['images_in_groups']} images in all (byte-identical pairs: "
                f"{d['exact_pairs']}; {near}). {d.get('straddling_groups', 0)} group(s) "
                "straddled splits")
        if d.get("straddling_groups"):
            text += (f": {d.get('removed_from_train_val', 0)} image(s) removed from train/val "
                     f"and {d.get('moved_val_to_train', 0)} moved from validation to train")
        text += f". Handling: {d.get('handling', '')}."
        blocks.append(Para(text))
    if d.get("enabled") and d.get("near_notes"):
        blocks.append(Bullets(list(d["near_notes"])))
    if d.get("label_conflicts"):
        blocks.append(Para(f"{d['label_conflicts']} duplicate group(s) carry different labels "
                           "(the same picture filed under two classes), e.g.:"))
        blocks.append(Bullets([", ".join(g) for g in d["label_conflict_examples"][:5]]))
    if not d.get("enabled"):
        blocks.append(Para("Duplicate detection was switched off: duplicates across splits, "
                           "if any, inflate every method's score."))
    nu = ds.get("not_used", {})
    if nu.get("unreadable_or_skipped") or nu.get("unlabelled"):
        blocks.append(Para(f"Not used: {nu.get('unreadable_or_skipped', 0)} unreadable or "
                           f"skipped files {nu.get('by_reason') or ''}, "
                           f"{nu.get('unlabelled', 0)} unlabelled images."))
    if sp.get("notes"):
        blocks.append(Bullets(list(sp["notes"])))
    return blocks


def _encoder_blocks(results: Results, e: EncoderResult, out: Path) -> list[Any]:
    methods = e["methods"]
    tim = results["timings"]["encoders"][e["slug"]]
    ident = e["identity"]
    w = ident.get("weights", {})
    enc = tim["encode"]
    blocks: list[Any] = [Heading(2, e["label"], anchor=e["slug"])]
    pre = ident.get("preprocess", {})
    blocks.append(Para([
        "Encoder ", Code(ident.get("spec", "")), f": {ident.get('dim')}-d, weights ",
        Code(str(w.get("source"))),
        f" (sha256 {str(w['sha256'])[:16]}…)" if w.get("sha256") else "", ", preprocessing "
        f"resize {pre.get('resize_shorter_side')} / crop {pre.get('center_crop')} "
        f"{pre.get('interpolation', '')}, L2-normalised float32.",
    ]))
    if enc.get("images_per_second"):
        txt = (f"Encoding: {enc['images']:,} images in {enc['seconds']:.0f} s, "
               f"{enc['images_per_second']:.1f} images/s")
        txt += "" if enc.get("measured_now") else " (recorded in the bundle's manifest when "\
            "these embeddings were encoded; this run reused every one)"
        txt += " — one pass, shared by every method."
    else:
        txt = "Encoding: every embedding was reused (a bundle or the shared embedding cache; "\
              "no throughput recorded)."
    blocks.append(Para(txt))
    if e.get("notes"):
        blocks.append(Bullets(list(e["notes"])))

    blocks.append(Heading(3, "All methods"))
    rows = []
    for mid, m in methods.items():
        fig, tm = m["metrics"], tim["methods"][mid]
        rows.append([m["name"], _ci(fig, "accuracy"),
                     _ci(fig, "balanced_accuracy"), _ci(fig, "macro_f1"),
                     _secs(tm["fit_seconds"]), _ms(tm["predict_ms_per_image_batched"]),
                     _ms(tm["predict_ms_per_image_single"]), _bytes(m["model_bytes"])])
    blocks.append(Table(["method", "accuracy [95 % CI]", "balanced accuracy [95 % CI]",
                         "macro-F1 [95 % CI]", "training", "ms/img batched",
                         "ms/img single", "model in memory"], rows, "lrrrrrrr"))
    sel = methods.get("knn", {}).get("selection", {})
    if sel.get("grid"):
        best = max(sel["grid"], key=lambda g: g["val_accuracy"])
        blocks.append(Para(f"kNN selection on the validation split (reference = train): best "
                           f"k={sel['k']}, {sel['vote']} vote, validation accuracy "
                           f"{best['val_accuracy']:.3f}."))
    for mid in ("linear", "mlp"):
        s = methods.get(mid, {}).get("selection", {}).get("selection")
        if s:
            choice = (f"C={s.get('C')}" if "C" in s else f"{s.get('best_epoch')} epochs")
            if "tau" in s:
                choice += f", class-prior correction tau={s['tau']}"
            blocks.append(Para(f"{methods[mid]['name']}: {choice} chosen by "
                               f"{s.get('criterion')} ({s.get('protocol')}), then refit on "
                               "train + validation."))

    per_class = []
    classes = results["dataset"]["classes"]
    for mid in headline(methods):
        if mid == "majority":
            continue
        pc = methods[mid]["metrics"]["per_class"]
        rows = [[c, str(pc[c]["support"]), _f(pc[c]["precision"]), _f(pc[c]["recall"]),
                 _f(pc[c]["f1"])] for c in classes]
        per_class.append(Heading(4, methods[mid]["name"]))
        per_class.append(Table(["class", "support", "precision", "recall", "F1"], rows,
                               "lrrrr"))
    blocks.append(Details("Per-class precision, recall, F1 and support", per_class))

    blocks.append(Heading(3, "Confusion matrices"))
    blocks.append(Para("Rows: true class (test images, count in brackets), normalised to 100 %; "
                       "columns: predicted class."))
    blocks.append(ImageRow([Image(out / rel, f"confusion matrix, {methods[mid]['name']}")
                            for mid, rel in e["figures"]["confusion"].items()]))
    blocks.append(Heading(3, "Most confident mistakes"))
    for mid, rel in e["figures"]["mistakes"].items():
        blocks.append(Image(out / rel, f"most confident mistakes, {methods[mid]['name']}"))
    return blocks


# -- files --------------------------------------------------------------------------------
def write_report(results: Results, out: Path) -> tuple[Path, Path, Path]:
    """Write results.json, report.md and the self-contained report.html (atomically)."""
    from embedsearch.store.io import atomic_write

    clean = plain(results)
    results.clear()
    results.update(clean)
    doc = build_document(results, out)
    paths = out / "report.md", out / "report.html", out / "results.json"
    md = to_markdown(doc, out).encode("utf-8")
    page = to_html(doc).encode("utf-8")
    blob = (dumps(results) + "\n").encode("utf-8")
    atomic_write(paths[2], lambda fh: fh.write(blob))
    atomic_write(paths[0], lambda fh: fh.write(md))
    atomic_write(paths[1], lambda fh: fh.write(page))
    return paths


__all__ = ["build_document", "write_report"]


def _how_chosen(dup: dict[str, Any]) -> str:
    """How the near-duplicate threshold was chosen, in dedupe's words."""
    evidence = dup.get("near_calibration")
    if dup.get("near_threshold_source") == "given":
        return ", given"
    if not evidence:
        return ""
    from embedsearch.dedupe.calibrate import Calibration

    said = Calibration(float(evidence["raw"]), evidence).describe()
    return ", " + said.split(", ", 1)[1]  # "calibrated on N images: …"

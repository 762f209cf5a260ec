"""Every method of the study on one encoder: run per fold, pooled over folds, scored on
the test images with scikit-learn metrics and a paired bootstrap, and compared with kNN.

The methods themselves live in :mod:`.knn`, :mod:`.heads` and :mod:`.finetune`; the
majority-class baseline and CLIP zero-shot (no training) are here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedsearch.report.encoding import Encoded, table_views
from embedsearch.report.finetune import finetune_outcome
from embedsearch.report.heads import head_outcomes
from embedsearch.report.knn import knn_outcomes
from embedsearch.report.metrics import METRICS, evaluate, majority_class, paired_difference
from embedsearch.report.results import HEAD_METHODS, METHOD_NAMES, Outcome, StudyTable
from embedsearch.report.splits import Fold, SplitPlan
from embedsearch.report.timing import proba_fn, time_predict


def _majority(Xt: np.ndarray, yr: np.ndarray) -> Outcome:
    t = time.perf_counter()
    label = majority_class(yr)
    prior = float(np.mean(yr == label))
    fit = time.perf_counter() - t

    def majority(Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(Q), label, dtype=object).astype(str), np.full(len(Q), prior)

    pred, conf, bms, sms = time_predict(majority, Xt)
    return Outcome("majority", METHOD_NAMES["majority"], "baseline",
                   {"class": label, "trained_on": "train+val"}, pred, conf, fit, bms, sms, 0)


def _zero_shot(enc: Encoded, classes: list[str]) -> tuple[Any, float] | None:
    """The fitted zero-shot classifier and its prompt-encoding seconds; None without a
    text tower."""
    if not enc.bundle.encoder_identity.get("supports_text"):
        return None
    from embedsearch.classify.zeroshot import ZeroShotClassifier

    t = time.perf_counter()
    clf = ZeroShotClassifier(enc.bundle.encoder(enc.weights), classes).fit()
    return clf, time.perf_counter() - t


def _zero_shot_outcome(zs: tuple[Any, float], Xt: np.ndarray) -> Outcome:
    clf, fit = zs
    pred, conf, bms, sms = time_predict(proba_fn(clf), Xt)
    return Outcome("zeroshot", METHOD_NAMES["zeroshot"], "zeroshot",
                   {"templates": len(clf.templates), "classes": len(clf.classes_),
                    "trained_on": "nothing (class names only)"},
                   pred, conf, fit, bms, sms, int(clf.text_embeddings.nbytes))


def run_fold(X: np.ndarray, y: np.ndarray, fold: Fold, ks: list[int], seed: int,
             heads: Sequence[str], head_options: dict[str, dict[str, Any]],
             zs: tuple[Any, float] | None, notes: list[str],
             views: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Outcome]:
    """Every method trained on one fold and predicting its test images."""
    ref = np.sort(np.concatenate([fold.train, fold.val]))
    Xt = X[fold.test]
    out = {"majority": _majority(Xt, y[ref])}
    out.update(knn_outcomes(X, y, fold, ks))
    out.update(head_outcomes(X, y, fold, seed, heads, head_options, notes, views))
    if zs is not None:
        out["zeroshot"] = _zero_shot_outcome(zs, Xt)
    return out


def merge(per_fold: list[dict[str, Outcome]], folds: list[Fold]) -> dict[str, Outcome]:
    """One outcome per method with predictions in test-row order (pooled over folds)."""
    if len(per_fold) == 1:
        return per_fold[0]
    test_rows = np.concatenate([f.test for f in folds])
    order = np.argsort(test_rows, kind="stable")
    merged = {}
    for mid in per_fold[0]:
        if not all(mid in pf for pf in per_fold):
            continue
        outs = [pf[mid] for pf in per_fold]
        o = outs[0]
        same_params = all(x.params == o.params for x in outs)
        name = o.name if all(x.name == o.name for x in outs) else METHOD_NAMES[mid] + \
            " per fold"
        merged[mid] = Outcome(
            mid, name, o.family,
            o.params if same_params else {"per_fold": [x.params for x in outs]},
            np.concatenate([x.pred for x in outs])[order],
            np.concatenate([x.conf for x in outs])[order],
            float(np.mean([x.fit_seconds for x in outs])),
            float(np.mean([x.batch_ms for x in outs])),
            float(np.median([x.single_ms for x in outs])),
            int(np.mean([x.model_bytes for x in outs])),
            {"per_fold": [x.selection for x in outs]} if o.selection else {})
    return merged


def evaluate_encoder(enc: Encoded, table: StudyTable, plan: SplitPlan, ks: list[int],
                     seed: int, heads: Sequence[str], head_options: dict[str, dict[str, Any]],
                     zero_shot: bool, n_boot: int,
                     classes: list[str], test_rows: np.ndarray,
                     finetune: dict[str, Any] | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(results["encoders"] entry, its timings, bootstrap samples per method)."""
    X = np.ascontiguousarray(np.asarray(enc.bundle.embeddings)[table.rows[enc.slug]],
                             dtype=np.float32)
    y = table.labels
    notes: list[str] = []
    zs = _zero_shot(enc, classes) if zero_shot else None
    views = table_views(enc, table)
    per_fold = [run_fold(X, y, f, ks, seed, heads, head_options, zs, notes, views)
                for f in plan.folds]
    outcomes = merge(per_fold, plan.folds)
    if finetune is not None:
        if len(plan.folds) == 1:
            outcomes["finetune"] = finetune_outcome(enc, table, plan.folds[0], seed, finetune)
        else:
            notes.append("fine-tuned backbone skipped: it runs on a single train/val/test "
                         "split, not per cross-validation fold")
    y_true = y[test_rows]
    order = ["majority", "knn", *(f"knn-{k}-{v}" for k in ks for v in ("plain", "weighted")),
             *HEAD_METHODS, "zeroshot", "finetune"]
    methods, timings, samples, preds = {}, {}, {}, {}
    for mid in order:
        if mid not in outcomes:
            continue
        o = outcomes[mid]
        figures, boot = evaluate(y_true, o.pred, classes, seed, n_boot)
        samples[mid] = boot
        methods[mid] = {"name": o.name, "family": o.family, "params": o.params,
                        "metrics": figures, "model_bytes": o.model_bytes,
                        **({"selection": o.selection} if o.selection else {})}
        timings[mid] = {"fit_seconds": round(o.fit_seconds, 4),
                        "predict_ms_per_image_batched": round(o.batch_ms, 5),
                        "predict_ms_per_image_single": round(o.single_ms, 4), **o.timings}
        preds[mid] = {"y_pred": [str(v) for v in o.pred],
                      "confidence": [round(float(c), 4) for c in o.conf]}
    sweep = {v: {"k": ks, **{m: [methods[f"knn-{k}-{v}"]["metrics"][m] for k in ks]
                             for m in METRICS},
                 "accuracy_ci": [methods[f"knn-{k}-{v}"]["metrics"]["ci"]["accuracy"]
                                 for k in ks]}
             for v in ("plain", "weighted")}
    m = enc.bundle.manifest
    result = {
        "slug": enc.slug,
        "label": enc.label,
        "spec": enc.spec,
        "identity": enc.bundle.encoder_identity,
        "bundle": {"format": m.get("format"), "counts": m.get("counts"),
                   "index": m.get("index")},
        "methods": methods,
        "k_sweep": sweep,
        "notes": sorted(set(notes)),
        "_predictions": preds,
    }
    timing = {"encode": enc.build, "methods": timings,
              **({"zero_shot_prompt_seconds": round(zs[1], 3)} if zs else {})}
    return result, timing, samples


def comparisons(enc_results: list[dict[str, Any]], samples: dict[str, Any]
                ) -> list[dict[str, Any]]:
    """Paired-bootstrap differences: each head (and zero-shot) against the val-chosen kNN,
    and each encoder against the first on the same method."""
    out = []
    for res in enc_results:
        s, methods = samples[res["slug"]], res["methods"]
        if "knn" not in methods:
            continue
        for mid in (*HEAD_METHODS, "zeroshot"):
            if mid not in methods:
                continue
            for metric in METRICS:
                d = paired_difference(s[mid][metric], s["knn"][metric],
                                      methods[mid]["metrics"][metric],
                                      methods["knn"]["metrics"][metric])
                out.append({"encoder": res["slug"], "a": mid, "b": "knn", "metric": metric,
                            **d})
    base = enc_results[0]
    for res in enc_results[1:]:
        for mid in ("knn", "linear", "mlp"):
            if mid not in res["methods"] or mid not in base["methods"]:
                continue
            d = paired_difference(samples[res["slug"]][mid]["accuracy"],
                                  samples[base["slug"]][mid]["accuracy"],
                                  res["methods"][mid]["metrics"]["accuracy"],
                                  base["methods"][mid]["metrics"]["accuracy"])
            out.append({"method": mid, "a": res["slug"], "b": base["slug"],
                        "metric": "accuracy", **d})
    return out


__all__ = ["comparisons", "evaluate_encoder", "merge", "run_fold"]

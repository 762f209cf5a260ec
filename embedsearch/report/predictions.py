"""Scoring ``predict`` on labelled images: honest figures, a table per image, a confusion plot.

Only images that did not vote for themselves are scored: for kNN, a query that is an
indexed reference image counts once its own copies were left out of its neighbours (the
default); for a trained head, a query the head was trained on is left out of its figures
(the head is unchanged, its score on its own training images would just not be a test).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import EmbedsearchError, InputError

if TYPE_CHECKING:
    import pandas as pd

    from embedsearch.bundle import Bundle
    from embedsearch.predict import Prediction


@dataclass
class MethodScore:
    """One method's figures on the images it may be scored on."""

    key: str
    description: str
    figures: dict[str, Any]
    labels: list[str]
    #: Images left out because they voted for themselves (or trained the head).
    left_out: int = 0
    why: str = ""


@dataclass
class Evaluation:
    """Every method's score, and how many queries were indexed images."""

    scores: dict[str, MethodScore] = field(default_factory=dict)
    chosen: str | None = None
    in_index: int = 0
    self_votes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "in_index": self.in_index, "self_votes": self.self_votes,
                "methods": {k: {"description": s.description, "left_out": s.left_out,
                                "why": s.why, **s.figures} for k, s in self.scores.items()}}


def _method_results(p: Prediction) -> dict[str, dict[str, Any]]:
    """{key: {"label", "confidence", "method"}} of one prediction (its methods, or the one)."""
    if p.methods:
        return p.methods
    if p.label is None or p.method is None:
        return {}
    return {_key_of(p) or "": {"label": p.label, "confidence": p.confidence,
                               "method": p.method}}


def _head_training_splits(bundle: Bundle, key: str) -> set[Any] | None:
    """Splits of the reference rows a head was fitted on (None: not a head)."""
    if not key.startswith("head:"):
        return None
    from embedsearch.head_store import load_bundle_head

    try:
        info = load_bundle_head(bundle, key.split(":", 1)[1]).info
    except EmbedsearchError:  # an unloadable head has no figures to protect anyway
        return {None, "train", "val"}
    refit = info.get("trained_on", {}).get("refit_on_train_and_val", True)
    return {None, "train", "val"} if refit else {None, "train"}


def evaluate_predictions(preds: Sequence[Prediction], truth: dict[str, str],
                         bundle: Bundle) -> Evaluation:
    """Accuracy, balanced accuracy, macro-F1, per-class figures and confusion counts per
    method (scikit-learn), on the predicted images with a true label that did not vote for
    themselves."""
    from embedsearch.report.metrics import label_set, point_metrics

    ev = Evaluation()
    ok = [p for p in preds if p.status == "ok"]
    ev.in_index = sum(bool(p.in_index) for p in ok)
    ev.self_votes = sum(bool(p.in_index) and p.in_index.get("excluded") == 0 for p in ok)
    ev.chosen = next((_key_of(p) for p in ok if p.method), None)
    keys: list[str] = []
    for p in ok:
        keys.extend(k for k in _method_results(p) if k not in keys)
    for key in keys:
        trained = _head_training_splits(bundle, key)
        y_true, y_pred, left, desc = [], [], 0, ""
        for p in ok:
            res = _method_results(p).get(key)
            if p.id not in truth or not res or res.get("label") is None:
                continue
            desc = desc or str(res.get("method", key))
            own = p.in_index
            if own and (own.get("excluded") == 0 if trained is None
                        else own.get("split") in trained):
                left += 1
                continue
            y_true.append(truth[p.id])
            y_pred.append(str(res["label"]))
        if not y_true and not left:
            continue
        labels = label_set(y_true, y_pred)
        why = ("images it was trained on" if trained is not None
               else "images that voted for themselves (--allow-self)")
        ev.scores[key] = MethodScore(key, desc, point_metrics(y_true, y_pred, labels)
                                     if y_true else {"n": 0}, labels, left, why if left else "")
    return ev


def _key_of(p: Prediction) -> str | None:
    """"knn", "head:NAME" or "zeroshot" from a description such as "knn(k=10, …)"."""
    return p.method.split("(")[0].strip() if p.method else None


def predictions_frame(preds: Sequence[Prediction], truth: dict[str, str]) -> pd.DataFrame:
    """One row per image: id, true, predicted, confidence, method, status, the indexed copy
    it was kept from voting for, then ``<method>_predicted`` / ``<method>_confidence`` for
    every method (with ``--method all``)."""
    import pandas as pd

    rows = []
    for p in preds:
        row: dict[str, Any] = {"id": p.id, "true": truth.get(p.id), "predicted": p.label,
                               "confidence": p.confidence, "method": p.method,
                               "status": p.status, "in_index": p.in_index.get("id")}
        for key, res in p.methods.items():
            row[f"{key}_predicted"] = res.get("label")
            row[f"{key}_confidence"] = res.get("confidence")
        rows.append(row)
    return pd.DataFrame(rows)


def write_predictions(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """``.csv`` or ``.parquet``, written atomically."""
    from embedsearch.store.io import atomic_write, write_parquet

    out = Path(path)
    suffix = out.suffix.lower()
    if suffix in (".parquet", ".pq"):
        write_parquet(out, frame)
    elif suffix in (".csv", ".tsv"):
        data = frame.to_csv(index=False, sep="\t" if suffix == ".tsv" else ",").encode()
        atomic_write(out, lambda fh: fh.write(data))
    else:
        raise InputError(f"{out}: cannot tell the format from the suffix {suffix or '(none)'}",
                         hint="name it predictions.csv or predictions.parquet")
    return out


def confusion_png(score: MethodScore, path: str | os.PathLike[str], title: str) -> Path:
    """The method's confusion matrix (rows: true class, normalised) as a PNG."""
    from embedsearch.report.plots import confusion_matrix_png

    if not score.figures.get("n"):
        raise InputError(f"no labelled images to draw a confusion matrix for {score.key}")
    return confusion_matrix_png(np.asarray(score.figures["confusion"]), score.labels, title,
                                Path(path))

"""Train heads on a bundle's cached embeddings, and score them against kNN.

``fit_head(bundle, "linear")`` trains on the bundle's reference rows (``split == "val"``
rows as validation when there are any; ``test`` rows never), compares with kNN on the same
validation protocol, saves the head under ``bundle/heads/NAME/`` and registers it in the
manifest (:mod:`embedsearch.head_store`). Nothing here opens an image.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.classify.metrics import class_counts, classification_figures
from embedsearch.errors import EmbedsearchError

if TYPE_CHECKING:
    from embedsearch.bundle import Bundle
    from embedsearch.classify.heads import ExtraTrain, Head

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class TrainResult:
    """A trained (and usually saved) head with the figures ``embedsearch train`` prints."""

    name: str
    head: Head
    path: Path | None
    counts: dict[str, dict[str, int]]
    validation: dict[str, Any]
    knn_validation: dict[str, Any]
    test: dict[str, Any] = field(default_factory=dict)
    knn_test: dict[str, Any] = field(default_factory=dict)
    #: With ``kind="auto"``: the metric, both kinds' validation scores and the one kept.
    choice: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(self.head.info.get("train_seconds", 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.head.kind, "path": str(self.path or ""),
                "train_seconds": self.seconds, "counts": self.counts,
                "class_weight": self.head.info.get("class_weight"),
                "selection": self.head.info.get("selection"),
                "validation": self.validation, "knn_validation": self.knn_validation,
                "test": self.test, "knn_test": self.knn_test,
                **({"head_choice": self.choice} if self.choice else {})}


def _bundle(bundle: Bundle | str | os.PathLike[str]) -> Bundle:
    from embedsearch.bundle import Bundle, load_bundle

    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def _labelled_rows(bundle: Bundle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference rows with a label: (row numbers, labels, is-validation mask)."""
    from embedsearch.bundle import text_or_none

    items = bundle.items.iloc[: bundle.reference_rows]
    labels = np.array([text_or_none(v) for v in items["label"]], dtype=object)
    split = items["split"].astype(object).to_numpy()
    rows = np.flatnonzero(labels != None)  # noqa: E711 (object array comparison)
    return rows, labels[rows].astype(str), split[rows] == "val"


def _test_rows(bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    from embedsearch.bundle import text_or_none

    items = bundle.items.iloc[bundle.reference_rows:]
    labels = np.array([text_or_none(v) for v in items["label"]], dtype=object)
    keep = np.flatnonzero(labels != None)  # noqa: E711
    return keep + bundle.reference_rows, labels[keep].astype(str)


def knn_figures(X_ref: np.ndarray, y_ref: np.ndarray, X_query: np.ndarray, y_query: np.ndarray,
                k: int = 10, leave_one_out: bool = False) -> dict[str, Any]:
    """kNN (similarity-weighted) figures; ``leave_one_out`` queries the reference itself."""
    from embedsearch.classify.knn import vote
    from embedsearch.index import Neighbours, make_index, search

    if len(X_query) == 0 or len(X_ref) == 0:
        return {}
    classes, y_idx = np.unique(y_ref, return_inverse=True)
    index, _ = make_index(np.asarray(X_ref, np.float32), "flat")
    neigh = search(index, X_query, k + 1 if leave_one_out else k)
    if leave_one_out:
        ids, sims = [], []
        for i, (row_ids, row_sims) in enumerate(zip(neigh.ids, neigh.similarities, strict=True)):
            keep = row_ids != i
            ids.append(row_ids[keep][:k])
            sims.append(row_sims[keep][:k])
        neigh = Neighbours(ids, sims)
    proba = vote(neigh, y_idx, len(classes))
    out = classification_figures(y_query, classes[proba.argmax(1)], proba, classes)
    return {"k": k, "protocol": "leave-one-out over the training rows" if leave_one_out
            else "validation split, train as reference", **out}


def fit_head(bundle: Bundle | str | os.PathLike[str], kind: str = "linear", *,
             name: str | None = None, class_weight: str = "auto",
             select_by: str | None = None, seed: int = 0, save: bool = True, k: int = 10,
             extra_train: ExtraTrain | None = None, **params: Any) -> TrainResult:
    """Train a ``linear``, ``mlp`` or ``auto`` head on a bundle's cached embeddings and save it.

    ``params`` go to the head's constructor (``C``, ``hidden``, ``dropout``, ``max_epochs``…).
    ``select_by`` (accuracy, balanced_accuracy or macro_f1; default ``DEFAULT_SELECT_BY``)
    is the metric every setting is chosen by. ``auto`` trains both kinds and keeps the one
    with the better validation ``select_by`` (the linear head on a tie: it is cheaper);
    ``result.choice`` says what was compared. Test rows are never trained on; when they
    carry labels, the head and kNN(``k``) are scored on them for the report only (nothing
    is chosen on them). ``extra_train`` adds training-only rows (augmented views; see
    ``Head.fit``) as ``(vectors, labels)`` or ``(vectors, labels, source)`` where ``source``
    holds *bundle row numbers* (the row of ``bundle.items`` each view was made from);
    views of validation or test rows are dropped.
    """
    from embedsearch.classify import DEFAULT_SELECT_BY
    from embedsearch.classify.heads import HEAD_KINDS, check_choice, make_head
    from embedsearch.head_store import save_head

    b = _bundle(bundle)
    check_choice(kind, (*HEAD_KINDS, "auto"), "head")
    if name is not None and not _NAME.match(name):
        raise EmbedsearchError(f"head name {name!r} is not a simple name",
                               hint="use letters, digits, '_', '-' or '.', e.g. linear-balanced")
    if not b.labelled:
        raise EmbedsearchError(f"bundle {b.name} has no labels, so no head can be trained",
                               hint="zero-shot (--method zeroshot --classes a,b,c) needs no "
                               "labels with a CLIP encoder")
    select_by = select_by or DEFAULT_SELECT_BY
    rows, labels, is_val = _labelled_rows(b)
    emb = b.embeddings
    X = np.asarray(emb[rows[~is_val]], np.float32)
    y = labels[~is_val]
    X_val = np.asarray(emb[rows[is_val]], np.float32) if is_val.any() else None
    y_val = labels[is_val] if is_val.any() else None
    extra = _extra_for(extra_train, rows[~is_val])
    heads = []
    for kind_ in (HEAD_KINDS if kind == "auto" else (kind,)):
        own = {p: v for p, v in params.items() if kind == kind_ or p in _accepts(kind_)}
        head = make_head(kind_, class_weight=class_weight, select_by=select_by, seed=seed,
                         **own)
        log.info("training %s head on %d rows (%d validation)", kind_, len(y),
                 int(is_val.sum()))
        heads.append(head.fit(X, y, X_val, y_val, extra_train=extra))
    head = heads[0]
    choice: dict[str, Any] = {}
    if len(heads) > 1:
        scores = {h.kind: float(h.info["validation"].get(select_by, -1.0)) for h in heads}
        head = max(heads, key=lambda h: scores[h.kind])  # first max: linear on a tie
        choice = {"metric": select_by, "scores": scores, "chosen": head.kind,
                  "protocols": {h.kind: h.info["selection"]["protocol"] for h in heads},
                  "seconds": {h.kind: h.info["train_seconds"] for h in heads}}
        head.info["head_choice"] = choice
    name = name or head.kind
    if X_val is not None and y_val is not None:
        knn_val = knn_figures(X, y, X_val, y_val, k)
    else:
        knn_val = knn_figures(X, y, X, y, k, leave_one_out=True)
    counts = {"train": class_counts(y), **({"val": class_counts(y_val)}
                                            if y_val is not None else {})}
    test_rows, test_labels = _test_rows(b)
    test: dict[str, Any] = {}
    knn_test: dict[str, Any] = {}
    if len(test_rows):
        Xt = np.asarray(emb[test_rows], np.float32)
        proba = head.predict_proba(Xt)
        test = classification_figures(test_labels, head.classes_[proba.argmax(1)], proba,
                                      head.classes_)
        ref_X = np.asarray(emb[rows], np.float32)
        knn_test = knn_figures(ref_X, labels, Xt, test_labels, k)
        knn_test["protocol"] = "train + validation as reference" if X_val is not None \
            else "train as reference"
        counts["test"] = class_counts(test_labels)
    result = TrainResult(name, head, None, counts, dict(head.info.get("validation", {})),
                         knn_val, test, knn_test, choice)
    if save:
        result.path = save_head(b, head, name, extra={
            "knn_validation": knn_val,
            "held_out_test": {"note": "scored after training; nothing was chosen on it",
                              "head": test, "knn": knn_test} if test else {}})
    return result


def _accepts(kind: str) -> set[str]:
    """Constructor parameters of a head kind (``auto`` routes each option to its kind)."""
    import inspect

    from embedsearch.classify.heads import HEAD_CLASSES

    return set(inspect.signature(HEAD_CLASSES[kind].__init__).parameters) - {"self"}


def _extra_for(extra: ExtraTrain | None, train_rows: np.ndarray) -> ExtraTrain | None:
    """``extra_train`` with bundle row numbers turned into rows of the training matrix
    (views of rows outside it, i.e. validation or test images, dropped)."""
    if extra is None or len(extra) == 2:
        return extra
    Xe, ye, src = extra[0], np.asarray(extra[1]), np.asarray(extra[2], np.int64)
    pos = np.full(max(int(src.max(initial=-1)), int(train_rows.max(initial=-1))) + 1, -1,
                  np.int64)
    pos[train_rows] = np.arange(len(train_rows))
    mapped = np.where(src >= 0, pos[np.clip(src, 0, None)], -1)
    keep = (src < 0) | (mapped >= 0)
    if not keep.all():
        log.info("extra_train: %d views of validation/test images left out", int((~keep).sum()))
    return np.asarray(Xe)[keep], ye[keep], mapped[keep]

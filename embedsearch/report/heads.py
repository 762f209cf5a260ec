"""Trained heads in the study: the linear and MLP heads fitted on the fold's train images
(validation picks their settings), plain and, when the bundle has augmented views, with
the views of those training images too (``linear-views``, ``mlp-views``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedsearch.errors import EmbedsearchError
from embedsearch.report.results import METHOD_NAMES, Outcome
from embedsearch.report.splits import Fold
from embedsearch.report.timing import proba_fn, time_predict

DEFAULT_HEADS = ("linear", "mlp")


def head_variants(heads: Sequence[str], views: tuple[np.ndarray, np.ndarray] | None,
                  fold: Fold, y: np.ndarray) -> list[tuple[str, str, Any]]:
    """(method id, head kind, extra_train) per head: plain, then with the views of the
    fold's training images (``views`` = vectors, table row of each view)."""
    out: list[tuple[str, str, Any]] = [(kind, kind, None) for kind in heads]
    if views is not None:
        vX, vrow = views
        pos = np.full(int(max(vrow.max(initial=-1), fold.train.max(initial=-1))) + 1, -1)
        pos[fold.train] = np.arange(len(fold.train))
        keep = pos[vrow] >= 0
        extra = (vX[keep], y[vrow[keep]], pos[vrow[keep]])
        out += [(f"{kind}-views", kind, extra) for kind in heads]
    return out


def head_outcomes(X: np.ndarray, y: np.ndarray, fold: Fold, seed: int,
                  heads: Sequence[str], head_options: dict[str, dict[str, Any]],
                  notes: list[str], views: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> dict[str, Outcome]:
    """Each head variant fitted and timed on the fold; a head that cannot be fitted is
    skipped with a note."""
    from embedsearch.classify.heads import LinearHead, MLPHead

    Xt = X[fold.test]
    out: dict[str, Outcome] = {}
    for mid, kind, extra in head_variants(heads, views, fold, y):
        cls = {"linear": LinearHead, "mlp": MLPHead}[kind]
        head = cls(**{"seed": seed, **head_options.get(kind, {})})
        has_val = len(fold.val) > 0
        t = time.perf_counter()
        try:
            head.fit(X[fold.train], y[fold.train], X[fold.val] if has_val else None,
                     y[fold.val] if has_val else None, extra_train=extra)
        except EmbedsearchError as exc:
            notes.append(f"{METHOD_NAMES[mid]} skipped: {exc.message}")
            continue
        fit = time.perf_counter() - t
        pred, conf, bms, sms = time_predict(proba_fn(head), Xt)
        info = head.info
        selection = {k: info[k] for k in ("selection", "trained_on", "class_weight")
                     if k in info}
        out[mid] = Outcome(mid, METHOD_NAMES[mid], "head", head.hyperparameters(), pred,
                           conf, fit, bms, sms,
                           int(sum(p.nbytes for p in head.params.values())), selection)
    return out


__all__ = ["DEFAULT_HEADS", "head_outcomes", "head_variants"]

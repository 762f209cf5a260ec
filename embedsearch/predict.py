"""Predictions from a bundle: kNN, a trained head or CLIP zero-shot, and the choice between
them.

``Predictor(bundle).predict(paths)`` embeds the files (:mod:`embedsearch.query`), finds
their nearest reference images and classifies them with the method asked for, or the best
available one (:func:`choose_method`): a trained head that beat kNN on validation, else
kNN, else zero-shot on an unlabelled CLIP bundle given class names, else a similar-image
search. Heads come from :mod:`embedsearch.head_store`; training them is
:mod:`embedsearch.training`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.bundle import Bundle, load_bundle, text_or_none
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.head_store import best_head_name, head_beats_knn, load_bundle_head, require_head
from embedsearch.query import embed_files, neighbours, with_tta

if TYPE_CHECKING:
    from embedsearch.classify.knn import KNNClassifier
    from embedsearch.classify.zeroshot import ZeroShotClassifier

log = logging.getLogger(__name__)

METHODS = ("auto", "knn", "head", "zeroshot", "all")
#: Cached zero-shot text embeddings live in this folder of the bundle.
ZEROSHOT_DIR = "zeroshot"


@dataclass
class Prediction:
    """One query image's result (``status`` is "ok" or the reason it could not be read)."""

    id: str
    status: str = "ok"
    label: str | None = None
    confidence: float | None = None
    method: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    neighbours: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""
    #: With ``method="all"``: {"knn" | "head:NAME" | "zeroshot": {"label", "confidence",
    #: "probabilities", "method"}} (or {"error"} for a head that could not be loaded).
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: When the query is itself an indexed reference image (same sha256, or cosine >=
    #: SELF_COSINE): {"id": its indexed id, "split": its split, "excluded": how many of its
    #: copies were left out of the neighbours, 0 with allow_self: it voted for itself}.
    #: Empty when it is not an indexed reference image.
    in_index: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", [], {})
                or k in ("id", "status")}


class Predictor:
    """Classifies query images and vectors against one bundle (by name, path or object)."""

    def __init__(self, bundle: Bundle | str | os.PathLike[str]) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        #: Of the last :meth:`predict` call: files encoded, files whose vectors were
        #: reused (from the bundle or the shared embedding cache).
        self.embed_counts: dict[str, int] = {"encoded": 0, "reused": 0}

    def knn(self, k: int = 10, weighting: str = "similarity") -> KNNClassifier:
        """kNN over the bundle's reference rows (held-out test rows never vote)."""
        from embedsearch.classify.knn import KNNClassifier

        b = self.bundle
        labels = b.reference_labels()
        if b.labelled and len(labels) == 0:
            raise EmbedsearchError(
                f"bundle {b.name} has no reference images to classify against: all "
                f"{len(b.items)} are held-out test images",
                hint="build it from train/ (or unsplit) class folders; test/ images are "
                "only scored, never voted with")
        if not b.labelled or all(text_or_none(lbl) is None for lbl in labels):
            raise EmbedsearchError(f"bundle {b.name} has no labels, so it cannot classify",
                                   hint="it still supports similar-image search")
        return KNNClassifier(k, weighting).fit_index(b.index, labels, b.reference_rows)

    def zeroshot(self, classes: list[str] | None = None,
                 templates: str | list[str] | None = None) -> ZeroShotClassifier:
        """A CLIP zero-shot classifier over ``classes`` (default: the bundle's classes)."""
        return bundle_zeroshot(self.bundle, classes, templates)

    def classifier(self, method: str = "auto", k: int = 10, weighting: str = "similarity",
                   head_name: str | None = None, classes: list[str] | None = None,
                   templates: str | list[str] | None = None) -> Any:
        """A fitted classifier (``predict_proba`` / ``predict`` / ``classes_``) for arrays."""
        kind = method
        if method == "auto":
            kind, head_name = choose_method(self.bundle, head_name, classes)
        if kind == "knn":
            return self.knn(k, weighting)
        if kind == "head":
            return load_bundle_head(self.bundle, head_name)
        if kind == "zeroshot":
            return self.zeroshot(classes, templates)
        raise EmbedsearchError(f"no classifier for method {method!r} on bundle "
                               f"{self.bundle.name}", hint="use knn, head or zeroshot (an "
                               "unlabelled bundle needs a CLIP encoder and --classes)")

    def predict_vectors(self, vectors: np.ndarray, ids: list[str], k: int = 10,
                        n_neighbours: int = 5, weighting: str = "similarity",
                        method: str = "auto", head_name: str | None = None,
                        classes: list[str] | None = None,
                        templates: str | list[str] | None = None,
                        sha256: list[str | None] | None = None,
                        allow_self: bool = False) -> list[Prediction]:
        """Predictions for embedded queries, with their nearest reference images.

        A query that is itself an indexed reference image (the same ``sha256``, or cosine
        >= SELF_COSINE) does not vote for itself: its own copies are left out of its
        neighbours (leave-one-out) and ``Prediction.in_index`` says so; ``allow_self=True``
        keeps them (similar-image search).

        ``method``: "auto" (the best available: a trained head that beat kNN on validation,
        else kNN, else zero-shot on an unlabelled CLIP bundle given ``classes``, else a
        similar-image search), "knn", "head" (``head_name`` or the best head), "zeroshot"
        (``classes`` default to the bundle's; ``templates`` "photo", "art" or a list) or
        "all" (every method in ``Prediction.methods``, the auto choice in ``label``).
        """
        from embedsearch.classify.knn import vote

        b = self.bundle
        items = b.items
        item_ids, item_labels = items["id"].to_numpy(), items["label"].to_numpy()
        knn_out = None
        use_knn = b.labelled and method != "zeroshot"
        clf = self.knn(k, weighting) if use_knn else None
        neigh, in_index = neighbours(b, vectors, max(k, n_neighbours) if use_knn
                                     else n_neighbours, sha256, allow_self)
        if clf is not None:
            trimmed = type(neigh)([i[:k] for i in neigh.ids], [s[:k] for s in neigh.similarities])
            proba = vote(trimmed, clf._y_idx, len(clf.classes_), weighting)
            knn_out = MethodOutput("knn", f"knn(k={k}, {weighting})", clf.classes_, proba)
        chosen, outputs = run_methods(b, vectors, method, knn_out, head_name, classes,
                                      templates)
        out = []
        for q, qid in enumerate(ids):
            shown = [
                {"id": str(item_ids[j]), "label": text_or_none(item_labels[j]),
                 "similarity": round(float(s), 4)}
                for j, s in zip(neigh.ids[q][:n_neighbours], neigh.similarities[q][:n_neighbours],
                                strict=True)
            ]
            pred = Prediction(qid, neighbours=shown, in_index=in_index[q])
            for key, o in outputs.items():
                if o.proba is None:
                    res: dict[str, Any] = {"error": o.error}
                else:
                    best = int(o.proba[q].argmax())
                    res = {"label": str(o.classes[best]),
                           "confidence": round(float(o.proba[q, best]), 4),
                           "probabilities": top_probabilities(o.classes, o.proba[q]),
                           "method": o.description}
                if key == chosen:
                    pred.label, pred.confidence = res["label"], res["confidence"]
                    pred.probabilities, pred.method = res["probabilities"], res["method"]
                if method == "all":
                    pred.methods[key] = res
            out.append(pred)
        return out

    def predict(self, paths: list[Path], k: int = 10, n_neighbours: int = 5,
                weighting: str = "similarity", batch_size: int | None = None,
                num_workers: int | None = None, method: str = "auto",
                head_name: str | None = None, classes: list[str] | None = None,
                templates: str | list[str] | None = None,
                allow_self: bool = False, tta: str | None = None) -> list[Prediction]:
        """Embed image files and predict them; unreadable files come back with a status.

        Files that are indexed reference images do not vote for themselves (see
        :meth:`predict_vectors`); their vectors are reused, not re-encoded. ``tta="flip"``:
        see :func:`embedsearch.query.embed_paths`.
        """
        def run() -> list[Prediction]:
            b = self.bundle
            vectors, statuses, shas, self.embed_counts = embed_files(b, paths, batch_size,
                                                                     num_workers)
            vectors = with_tta(b, vectors, statuses, tta, batch_size, num_workers)
            ok_ids = [p for p, status, _ in statuses if status == "ok"]
            preds = iter(self.predict_vectors(vectors, ok_ids, k, n_neighbours, weighting,
                                              method, head_name, classes, templates, shas,
                                              allow_self))
            return [next(preds) if status == "ok"
                    else Prediction(p, status=status, detail=detail)
                    for p, status, detail in statuses]

        try:
            return run()
        except BundleError:
            # A rebuild may have committed (and removed this generation's files) since the
            # bundle was opened: answer from the new generation rather than call it damaged.
            if not self.bundle.refresh():
                raise
            return run()


def bundle_zeroshot(bundle: Bundle, classes: list[str] | None = None,
                    templates: str | list[str] | None = None) -> ZeroShotClassifier:
    """A zero-shot classifier for ``bundle`` with text embeddings cached in the bundle.

    ``classes`` default to the bundle's own classes; an unlabelled bundle needs them.
    A cache hit does not load the encoder at all.
    """
    from embedsearch.classify.zeroshot import ZeroShotClassifier, check_text_capable

    identity = bundle.encoder_identity
    check_text_capable(identity)
    names = classes or bundle.classes
    if not names:
        raise EmbedsearchError(f"bundle {bundle.name} has no labels, so zero-shot needs the "
                               "class names", hint="pass them: --classes cat,dog,bird")
    clf = ZeroShotClassifier(None, names, templates)
    key = ("zeroshot", clf.cache_key(identity))
    if key in bundle.memo:
        return bundle.memo[key]
    folder = bundle.path / ZEROSHOT_DIR
    if not clf.load_cache(folder, identity):
        clf.encoder = bundle.encoder()
        clf.fit()
        try:
            clf.save_cache(folder, identity)
        except (BundleError, OSError) as exc:  # a read-only bundle still predicts
            log.warning("could not cache zero-shot text embeddings in %s: %s", folder, exc)
    bundle.memo[key] = clf
    return clf


# -- choosing and running methods ------------------------------------------------------------
@dataclass
class MethodOutput:
    """One method's probabilities for a batch of queries (columns follow ``classes``)."""

    key: str  # "knn", "head:NAME" or "zeroshot": stable, for JSON and tables
    description: str  # e.g. "knn(k=10, similarity)", "head:linear (linear, C=0.01)"
    classes: np.ndarray
    proba: np.ndarray | None
    error: str = ""


def choose_method(bundle: Bundle, head_name: str | None = None,
                  classes: list[str] | None = None) -> tuple[str, str | None]:
    """The best available method: ("head", name), ("knn", None), ("zeroshot", None), or
    ("search", None) when nothing can classify.

    A trained head is chosen when its validation macro-F1 was at least kNN's on the same
    rows; then kNN on a labelled bundle; then zero-shot on a CLIP bundle with class names.
    """
    if head_name is not None:
        return "head", head_name
    best = best_head_name(bundle)
    if best is not None and head_beats_knn(bundle, best):
        return "head", best
    if bundle.labelled:
        return "knn", None
    if bundle.encoder_identity.get("supports_text") and classes:
        return "zeroshot", None
    return "search", None


def head_output(bundle: Bundle, name: str, vectors: np.ndarray) -> MethodOutput:
    head = load_bundle_head(bundle, name)
    sel = head.info.get("selection", {})
    setting = f"C={sel['C']:g}" if "C" in sel else (
        f"{sel['best_epoch']} epochs" if "best_epoch" in sel else "")
    desc = f"head:{name} ({head.kind}{', ' + setting if setting else ''})"
    return MethodOutput(f"head:{name}", desc, head.classes_, head.predict_proba(vectors))


def zeroshot_output(bundle: Bundle, vectors: np.ndarray, classes: list[str] | None,
                    templates: str | list[str] | None) -> MethodOutput:
    clf = bundle_zeroshot(bundle, classes, templates)
    return MethodOutput("zeroshot", f"zeroshot({len(clf.templates)} prompts per class)",
                        clf.classes_, clf.predict_proba(vectors))


def run_methods(bundle: Bundle, vectors: np.ndarray, method: str, knn: MethodOutput | None,
                head_name: str | None = None, classes: list[str] | None = None,
                templates: str | list[str] | None = None
                ) -> tuple[str | None, dict[str, MethodOutput]]:
    """Run ``method`` (or every available one for "all"); returns (chosen key, outputs).

    ``knn`` is the kNN output the caller already computed with its neighbour search.
    With "all", a head that cannot be loaded comes back with ``error`` set instead of
    failing the whole prediction.
    """
    if method not in METHODS:
        raise EmbedsearchError(f"unknown method {method!r}", hint=f"use one of {METHODS}")
    outputs: dict[str, MethodOutput] = {}
    if method == "knn":
        if knn is None:
            Predictor(bundle).knn()  # raises the "no labels" error
        assert knn is not None
        return knn.key, {knn.key: knn}
    if method == "head":
        out = head_output(bundle, head_name or require_head(bundle), vectors)
        return out.key, {out.key: out}
    if method == "zeroshot":
        out = zeroshot_output(bundle, vectors, classes, templates)
        return out.key, {out.key: out}
    kind, name = choose_method(bundle, head_name, classes)
    if method == "auto":
        if kind == "head":
            assert name is not None
            out = head_output(bundle, name, vectors)
        elif kind == "knn" and knn is not None:
            out = knn
        elif kind == "zeroshot":
            out = zeroshot_output(bundle, vectors, classes, templates)
        else:
            return None, {}
        return out.key, {out.key: out}
    # "all": every method this bundle can run, side by side.
    if knn is not None:
        outputs[knn.key] = knn
    for hname in bundle.manifest.get("heads", {}):
        try:
            out = head_output(bundle, hname, vectors)
        except EmbedsearchError as exc:
            out = MethodOutput(f"head:{hname}", f"head:{hname}", np.array([], str), None,
                               error=exc.message)
        outputs[out.key] = out
    if bundle.encoder_identity.get("supports_text") and (classes or bundle.classes):
        out = zeroshot_output(bundle, vectors, classes, templates)
        outputs[out.key] = out
    chosen = {"head": f"head:{name}", "knn": "knn", "zeroshot": "zeroshot"}.get(kind)
    if chosen not in outputs or outputs[chosen].proba is None:
        chosen = next((k for k, o in outputs.items() if o.proba is not None), None)
    return chosen, outputs


def top_probabilities(classes: np.ndarray, row: np.ndarray, limit: int = 10,
                      floor: float = 5e-4) -> dict[str, float]:
    """The ``limit`` most likely classes with probability ≥ ``floor``, highest first."""
    order = np.argsort(-row, kind="stable")[:limit]
    return {str(classes[i]): round(float(row[i]), 4) for i in order if row[i] >= floor}

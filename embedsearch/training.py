"""Heads and zero-shot on a bundle: train from cached embeddings, save, load, choose.

``fit_head(bundle, "linear")`` trains on the bundle's reference rows (``split == "val"``
rows as validation when there are any; ``test`` rows never), compares with kNN on the same
validation protocol, saves the head under ``bundle/heads/NAME/`` and registers it in the
manifest. Nothing here opens an image.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.classify.metrics import class_counts, classification_figures
from embedsearch.errors import BundleError, EmbedsearchError

if TYPE_CHECKING:
    from embedsearch.bundle import Bundle
    from embedsearch.classify.heads import ExtraTrain, Head
    from embedsearch.classify.zeroshot import ZeroShotClassifier

log = logging.getLogger(__name__)

HEADS_DIR = "heads"
ZEROSHOT_DIR = "zeroshot"
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
    from embedsearch.bundle import _none

    items = bundle.items.iloc[: bundle.reference_rows]
    labels = np.array([_none(v) for v in items["label"]], dtype=object)
    split = items["split"].astype(object).to_numpy()
    rows = np.flatnonzero(labels != None)  # noqa: E711 (object array comparison)
    return rows, labels[rows].astype(str), split[rows] == "val"


def _test_rows(bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    from embedsearch.bundle import _none

    items = bundle.items.iloc[bundle.reference_rows:]
    labels = np.array([_none(v) for v in items["label"]], dtype=object)
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


def save_head(bundle: Bundle, head: Head, name: str, extra: dict[str, Any] | None = None
              ) -> Path:
    """Write ``heads/NAME/`` and register it in the manifest (the commit point)."""
    from embedsearch.bundle import read_manifest, write_manifest
    from embedsearch.store.io import exclusive_lock

    rel = f"{HEADS_DIR}/{name}"
    folder = bundle.path / rel
    with exclusive_lock(bundle.path):
        manifest = read_manifest(bundle.path)
        files = head.save(folder, encoder=bundle.encoder_identity,
                          extra={"name": name, **(extra or {})})
        entry = {
            "kind": head.kind,
            "path": rel,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "classes": len(head.classes_),
            "encoder": {"spec": bundle.encoder_identity.get("spec"),
                        "key_sha256": _encoder_digest(bundle.encoder_identity)},
            "bundle_generation": manifest.get("generation"),
            "train_seconds": head.info.get("train_seconds"),
            "validation": head.info.get("validation", {}),
            "select_by": head.info.get("selection", {}).get("metric"),
            "knn_validation": (extra or {}).get("knn_validation", {}),
            "files": {f"{rel}/{fname}": meta for fname, meta in files.items()},
        }
        manifest.setdefault("heads", {})[name] = entry
        write_manifest(bundle.path, manifest)
    bundle.manifest = manifest
    return folder


def load_bundle_head(bundle: Bundle, name: str | os.PathLike[str] | None = None) -> Head:
    """A head registered in ``bundle`` (by name; None = the best) or a head folder, verified
    (file hashes) and refused when it was trained on another encoder's embeddings."""
    from embedsearch.bundle import check_same_encoder
    from embedsearch.classify.heads import HEAD_FILE, load_head, read_head_meta
    from embedsearch.store.io import file_digest

    heads = bundle.manifest.get("heads", {})
    if name is None:
        name = best_head_name(bundle)
        if name is None:
            raise EmbedsearchError(f"bundle {bundle.name} has no trained head",
                                   hint=f"train one: embedsearch train --index {bundle.path} "
                                   "--head linear")
    # Verified once per Bundle object and manifest entry (a server predicts many times).
    cache = _loaded(bundle)
    key = ("head", str(name), repr(heads.get(str(name))))
    if key in cache:
        return cache[key]
    if str(name) in heads:
        entry = heads[str(name)]
        folder = bundle.path / entry["path"]
        for rel, meta in entry.get("files", {}).items():
            f = bundle.path / rel
            if not f.is_file() or f.stat().st_size != meta["bytes"] \
                    or file_digest(f) != meta["sha256"]:
                raise BundleError(
                    f"{f} is missing or was modified after the head was saved",
                    hint=f"retrain it: embedsearch train --index {bundle.path} --head "
                    f"{entry['kind']} --head-name {name}")
        kind = entry["kind"]
    elif Path(name).is_dir():
        folder = Path(name)
        kind = read_head_meta(folder)["kind"]
    else:
        raise EmbedsearchError(
            f"bundle {bundle.name} has no head {str(name)!r}",
            hint=f"trained heads: {', '.join(heads) or 'none'}; train one with embedsearch "
            f"train --index {bundle.path} --head linear --head-name {name}")
    meta = read_head_meta(folder)
    check_same_encoder(bundle.encoder_identity, meta.get("encoder") or {},
                       f"head {folder / HEAD_FILE}",
                       f"retrain it on this bundle: embedsearch train --index {bundle.path} "
                       f"--head {kind}" + (f" --head-name {name}" if str(name) in heads else ""))
    head = load_head(folder)
    if str(name) in heads:
        cache[key] = head
    return head


def _loaded(bundle: Bundle) -> dict[tuple[str, ...], Any]:
    """Per-Bundle cache of verified heads and zero-shot classifiers."""
    return vars(bundle).setdefault("_loaded_classifiers", {})


def _encoder_digest(identity: dict[str, Any]) -> str:
    import hashlib

    from embedsearch.bundle import encoder_key

    return hashlib.sha256(encoder_key(identity).encode()).hexdigest()[:16]


def best_head_name(bundle: Bundle) -> str | None:
    """The registered head with the best validation figure, or None: by the metric the
    heads were selected by when they all share one, else macro-F1 (then accuracy).

    Heads trained before the bundle was rebuilt with another encoder are passed over (they
    are refused when asked for by name).
    """
    current = _encoder_digest(bundle.encoder_identity)
    heads = {n: e for n, e in bundle.manifest.get("heads", {}).items()
             if e.get("encoder", {}).get("key_sha256") == current}
    if not heads:
        return None

    metrics = {e.get("select_by") for e in heads.values()}
    metric = metrics.pop() if len(metrics) == 1 and None not in metrics else "macro_f1"

    def score(item: tuple[str, dict[str, Any]]) -> tuple[float, float]:
        v = item[1].get("validation", {})
        return float(v.get(metric, -1.0)), float(v.get("accuracy", -1.0))

    return max(heads.items(), key=score)[0]


def head_beats_knn(bundle: Bundle, name: str) -> bool:
    """Whether head ``name`` scored at least kNN's validation macro-F1 when it was trained."""
    entry = bundle.manifest.get("heads", {}).get(name, {})
    head_f1 = entry.get("validation", {}).get("macro_f1")
    knn_f1 = entry.get("knn_validation", {}).get("macro_f1")
    if head_f1 is None or knn_f1 is None:
        return True
    return float(head_f1) >= float(knn_f1)


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
    cache = _loaded(bundle)
    key = ("zeroshot", clf.cache_key(identity))
    if key in cache:
        return cache[key]
    folder = bundle.path / ZEROSHOT_DIR
    if not clf.load_cache(folder, identity):
        clf.encoder = bundle.encoder()
        clf.fit()
        try:
            clf.save_cache(folder, identity)
        except (BundleError, OSError) as exc:  # a read-only bundle still predicts
            log.warning("could not cache zero-shot text embeddings in %s: %s", folder, exc)
    cache[key] = clf
    return clf


# -- choosing and running methods for Bundle.predict_vectors ---------------------------------
METHODS = ("auto", "knn", "head", "zeroshot", "all")


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
            bundle.knn()  # raises the "no labels" error
        assert knn is not None
        return knn.key, {knn.key: knn}
    if method == "head":
        out = head_output(bundle, head_name or _require_head(bundle), vectors)
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


def _require_head(bundle: Bundle) -> str:
    name = best_head_name(bundle)
    if name is None:
        raise EmbedsearchError(f"bundle {bundle.name} has no trained head",
                               hint=f"train one: embedsearch train --index {bundle.path} "
                               "--head linear")
    return name


def top_probabilities(classes: np.ndarray, row: np.ndarray, limit: int = 10,
                      floor: float = 5e-4) -> dict[str, float]:
    """The ``limit`` most likely classes with probability ≥ ``floor``, highest first."""
    order = np.argsort(-row, kind="stable")[:limit]
    return {str(classes[i]): round(float(row[i]), 4) for i in order if row[i] >= floor}

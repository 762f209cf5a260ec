"""Index bundles: a self-describing folder of embeddings, metadata and a faiss index.

Layout of ``indexes/NAME/``::

    manifest.json                 commit point: schema, encoder identity, counts, file hashes
    data/embeddings-GGGGGG.npy    float32 (n, dim), rows in item order, L2-normalised
    data/items-GGGGGG.parquet     one row per embedded image: id, label, split, size, sha256…
    data/failures-GGGGGG.parquet  every file that was skipped, with a reason code
    data/index-GGGGGG.faiss       inner-product index over the embeddings (same row order)
    cache/                        shards of a build in progress (resume after a kill)
    heads/NAME/                   trained heads (safetensors + JSON)

Items are ordered reference rows first (train/val/unsplit), held-out ``test`` rows last, so
kNN classification searches the first ``reference_rows`` rows only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.encoders.identity import (
    FINGERPRINT_MIN_COSINE,
    check_same_encoder,
    encoder_key,
    fingerprint_cosine,
)
from embedsearch.errors import BundleError, BundleMismatchError, EmbedsearchError
from embedsearch.store.io import (
    file_digest,
    read_npy,
    read_parquet,
    read_versioned_json,
    write_json,
)

if TYPE_CHECKING:
    import faiss
    import pandas as pd

    from embedsearch.classify.knn import KNNClassifier
    from embedsearch.encoders.base import Encoder
    from embedsearch.index import Neighbours

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "embedsearch-bundle"
SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("indexes")
HELD_OUT_SPLITS = frozenset({"test"})
#: A query at least this similar to an indexed image is that image (re-saved, re-encoded):
#: it is left out of its own neighbours, like one with the same sha256.
SELF_COSINE = 0.9999
#: faiss class of each index type the manifest may name.
_INDEX_CLASSES = {"flat": "IndexFlat", "ivf": "IndexIVFFlat", "ivfpq": "IndexIVFPQ",
                  "hnsw": "IndexHNSW"}


def bundle_path(name_or_path: str | os.PathLike[str]) -> Path:
    """``covers`` → ``indexes/covers``; anything that looks like a path is used as is.

    A bare name is a path only when ``./NAME`` is a bundle and ``indexes/NAME`` is not: an
    image folder ``./covers`` must never become the bundle of ``build-index covers``.
    """
    p = Path(name_or_path)
    if p.is_absolute() or len(p.parts) > 1:
        return p
    if (p / "manifest.json").is_file() and not (DEFAULT_ROOT / p / "manifest.json").is_file():
        return p
    return DEFAULT_ROOT / p


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


class Bundle:
    """A loaded, verified index bundle. Use :func:`load_bundle`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._encoder: Encoder | None = None
        #: Where queries are embedded ("auto", "cpu", "cuda[:N]", "mps"); not part of the
        #: encoder's identity.
        self.device = "auto"
        self._light: Any = None
        #: Of the last :meth:`embed_files` call: files encoded, files whose vectors were
        #: reused (from this bundle or the shared embedding cache).
        self.embed_counts: dict[str, int] = {"encoded": 0, "reused": 0}

    # -- facts ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def encoder_identity(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def dim(self) -> int:
        return int(self.encoder_identity["dim"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    @property
    def reference_rows(self) -> int:
        return int(self.manifest["index"]["reference_rows"])

    def file(self, role: str) -> Path:
        return self.path / self.manifest["roles"][role]

    # -- data -------------------------------------------------------------------------
    @cached_property
    def items(self) -> pd.DataFrame:
        df = read_parquet(self.file("items"))
        if len(df) != self.manifest["index"]["ntotal"]:
            raise BundleError(f"{self.file('items')} has {len(df)} rows, the manifest says "
                              f"{self.manifest['index']['ntotal']}", hint=self.rebuild_hint)
        lacking = {"id", "label", "split"} - set(df.columns)
        if lacking:
            raise BundleError(f"{self.file('items')} has no column {', '.join(sorted(lacking))}",
                              hint=self.rebuild_hint)
        # The manifest's facts must be the items table's: an edited manifest is refused.
        labels = sorted({str(v) for v in df["label"] if _none(v) is not None})
        held = self.manifest["index"].get("held_out", {})
        held = held.get("splits", HELD_OUT_SPLITS) if isinstance(held, dict) else ()
        n_ref = int((~df["split"].isin(list(held))).sum())
        if labels != self.classes or n_ref != self.reference_rows:
            raise BundleError(
                f"manifest.json of {self.path} says {len(self.classes)} classes and "
                f"{self.reference_rows} reference rows; its items table has {len(labels)} "
                f"classes and {n_ref} reference rows (the manifest was edited?)",
                hint=self.rebuild_hint)
        return df

    @cached_property
    def failures(self) -> pd.DataFrame:
        return read_parquet(self.file("failures"))

    @cached_property
    def embeddings(self) -> np.ndarray:
        """Memory-mapped (n, dim) float32 embeddings in item order."""
        arr = read_npy(self.file("embeddings"))
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape != (len(self.items), self.dim):
            raise BundleError(
                f"{self.file('embeddings')} holds {arr.dtype} {arr.shape}, expected float32 "
                f"({len(self.items)}, {self.dim})", hint=self.rebuild_hint)
        return arr

    @cached_property
    def index(self) -> faiss.Index:
        import faiss

        from embedsearch.index import read_faiss

        index = read_faiss(self.file("index"))
        kind = self.manifest["index"].get("type")
        if kind in _INDEX_CLASSES and not isinstance(index, getattr(faiss, _INDEX_CLASSES[kind])):
            raise BundleError(f"{self.file('index')} is a {type(index).__name__}, but the "
                              f"manifest says {kind!r}", hint=self.rebuild_hint)
        if index.d != self.dim or index.ntotal != len(self.items):
            raise BundleError(
                f"{self.file('index')} holds {index.ntotal} vectors of dim {index.d}; the "
                f"bundle has {len(self.items)} of dim {self.dim}", hint=self.rebuild_hint)
        # Same shape is not same content: an index from another encoder of the same
        # dimension would answer every query wrongly. Spot-check rows against embeddings.
        rows = np.unique(np.linspace(0, index.ntotal - 1, min(index.ntotal, 16)).astype(int))
        if self.manifest["index"].get("type") == "ivfpq":
            rows = rows[:0]  # PQ codes reconstruct approximately; the file hash still holds
        if len(rows) and not np.allclose(
                np.vstack([index.reconstruct(int(i)) for i in rows]),
                np.asarray(self.embeddings[rows]), atol=1e-5):
            raise BundleMismatchError(
                f"{self.file('index')} does not hold this bundle's embeddings (an index from "
                "another bundle or another encoder?)", hint=self.rebuild_hint)
        return index

    @property
    def rebuild_hint(self) -> str:
        src = self.manifest.get("source", {}).get("path", "DATA")
        return (f"rebuild it: embedsearch build-index {src} --out {self.path} --overwrite "
                f"--model {self.encoder_identity.get('spec')}")

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def reference_labels(self) -> np.ndarray:
        labels = self.items["label"].iloc[: self.reference_rows]
        return labels.to_numpy()

    # -- encoder ----------------------------------------------------------------------
    def encoder(self, weights: str | os.PathLike[str] | None = None,
                device: str | None = None) -> Encoder:
        """The bundle's encoder, rebuilt from its identity and checked by fingerprint.

        ``device`` (default: :attr:`device`, "auto") is where it runs; a bundle built on a
        GPU is queried on a CPU and the other way round, at the precision it was built with.
        """
        if self._encoder is None:
            from embedsearch.encoders import load_encoder

            ident = self.encoder_identity
            w = ident.get("weights", {})
            if weights is None and w.get("source") == "file":
                weights = w.get("path")
                if weights and not Path(weights).is_file():
                    raise BundleError(
                        f"the bundle's encoder weights {weights} are gone",
                        hint="pass the same weights file again with --weights FILE")
            if "parts" in ident:  # several encoders, concatenated (encoders.combine)
                from embedsearch.encoders.combine import encoder_from_identity

                enc = encoder_from_identity(ident, weights, device or self.device)
            else:
                enc = load_encoder(ident["spec"], weights,
                                   precision=ident.get("precision", "fp32"),
                                   device=device or self.device)
            self._check_encoder(enc)
            self._encoder = enc
        return self._encoder

    def _check_encoder(self, enc: Any) -> None:
        ident = self.encoder_identity
        check_same_encoder(ident, enc.identity(), f"bundle {self.path}",
                           "use the encoder the bundle was built with, or rebuild the bundle")
        cos = fingerprint_cosine(enc.fingerprint(), self.manifest["fingerprint"])
        if cos < FINGERPRINT_MIN_COSINE:
            raise BundleMismatchError(
                f"encoder {ident['spec']} now embeds the reference image differently "
                f"(cosine {cos:.4f}) than when {self.path} was built",
                hint="library versions or weights changed; " + self.rebuild_hint)

    def image_encoder(self, weights: str | os.PathLike[str] | None = None) -> Any:
        """What embeds query images: a verified cached export when one exists and no other
        weights are given (no torch import: ``encoders.backends.light_encoder``), checked
        against the bundle like :meth:`encoder`; else :meth:`encoder`."""
        if self._encoder is None and self._light is None and weights is None \
                and self.device in ("auto", "cpu"):  # exports run on the CPU
            from embedsearch.encoders.backends import light_encoder

            light = light_encoder(self.encoder_identity)
            if light is not None:
                self._check_encoder(light)
                self._light = light
        return self._encoder or self._light or self.encoder(weights)

    def check_vectors_from(self, identity: dict[str, Any], what: str) -> None:
        check_same_encoder(self.encoder_identity, identity, what,
                           f"embed with {self.encoder_identity['spec']} or rebuild {what}")

    # -- search & classify --------------------------------------------------------------
    def knn(self, k: int = 10, weighting: str = "similarity") -> KNNClassifier:
        from embedsearch.classify.knn import KNNClassifier

        labels = self.reference_labels()
        if self.labelled and len(labels) == 0:
            raise EmbedsearchError(
                f"bundle {self.name} has no reference images to classify against: all "
                f"{len(self.items)} are held-out test images",
                hint="build it from train/ (or unsplit) class folders; test/ images are "
                "only scored, never voted with")
        if not self.labelled or all(_none(lbl) is None for lbl in labels):
            raise EmbedsearchError(f"bundle {self.name} has no labels, so it cannot classify",
                                   hint="it still supports similar-image search")
        return KNNClassifier(k, weighting).fit_index(self.index, labels, self.reference_rows)

    def embed_paths(self, paths: list[Path], batch_size: int | None = None,
                    num_workers: int | None = None, tta: str | None = None
                    ) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
        """Embed query files. Returns (vectors for readable files, statuses of all files).

        ``tta="flip"`` averages each embedding with its mirror image's, re-normalised.
        """
        vectors, statuses, _ = self.embed_files(paths, batch_size, num_workers)
        return self._tta(vectors, statuses, tta, batch_size, num_workers), statuses

    def _tta(self, vectors: np.ndarray, statuses: list[tuple[str, str, str]], tta: str | None,
             batch_size: int, num_workers: int | None) -> np.ndarray:
        """``vectors`` (of the readable files, in order) averaged with their mirror images'
        embeddings (``tta="flip"``), re-normalised; unchanged when ``tta`` is None."""
        from embedsearch.embed import embed_sources
        from embedsearch.views import tta_augment

        augment = tta_augment(tta)
        if augment is None or not len(vectors):
            return vectors
        ok = [Path(p) for p, status, _ in statuses if status == "ok"]
        flipped = [fv for _, fv, _ in embed_sources(self.encoder(), ok, batch_size=batch_size,
                                                     num_workers=num_workers, augment=augment)]
        mirrored = np.concatenate(flipped)
        if len(mirrored) != len(vectors):  # a file changed between the two reads
            raise EmbedsearchError(f"{len(vectors)} images decoded, {len(mirrored)} mirrored",
                                   hint="predict again once the files stop changing")
        out = vectors + mirrored
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_files(self, paths: list[Path], batch_size: int | None = None,
                    num_workers: int | None = None
                    ) -> tuple[np.ndarray, list[tuple[str, str, str]], list[str | None]]:
        """Embed query files, reusing vectors this bundle or the shared embedding cache
        already holds for the same bytes (by sha256). Returns (vectors of the readable
        files, (path, status, detail) of every file, sha256 of the readable files)."""
        from embedsearch.embed import embed_sources
        from embedsearch.store.shared import hash_files, open_shared

        shas = hash_files(paths, num_workers)
        found: dict[int, np.ndarray] = {}
        rows = self.rows_by_sha256
        for i, sha in enumerate(shas):
            if sha in rows:
                found[i] = np.asarray(self.embeddings[rows[sha][0]])
        enc = self.image_encoder()
        shared = open_shared(enc.identity()) if len(found) < len(paths) else None
        if shared is not None:
            hits = shared.get_many([s for i, s in enumerate(shas) if s and i not in found])
            found.update({i: hits[s].vector for i, s in enumerate(shas)
                          if s in hits and i not in found})
        todo = [i for i in range(len(paths)) if i not in found]
        self.embed_counts = {"encoded": len(todo), "reused": len(found)}
        results: dict[int, tuple[str, str, np.ndarray | None]] = {
            i: ("ok", "", v) for i, v in found.items()}
        for idx, v, infos in embed_sources(enc, [paths[i] for i in todo],
                                           batch_size=batch_size, num_workers=num_workers):
            ok = [j for j, info in zip(idx, infos, strict=True) if info.status == "ok"]
            row = {j: n for n, j in enumerate(ok)}  # vectors hold the decoded files only
            for j, info in zip(idx, infos, strict=True):
                results[todo[j]] = (info.status, info.detail, v[row[j]] if j in row else None)
                shas[todo[j]] = info.sha256 or shas[todo[j]]
            if shared is not None and ok:
                shared.put_many([shas[todo[j]] for j in ok], v)
        statuses = [(str(p), results[i][0], results[i][1]) for i, p in enumerate(paths)]
        good = [i for i in range(len(paths)) if results[i][0] == "ok"]
        vectors = (np.stack([results[i][2] for i in good]).astype(np.float32) if good
                   else np.zeros((0, self.dim), np.float32))
        return vectors, statuses, [shas[i] for i in good]

    @cached_property
    def rows_by_sha256(self) -> dict[str, list[int]]:
        """sha256 → rows of the bundle's images with those bytes."""
        rows: dict[str, list[int]] = {}
        for row, sha in enumerate(self.items["sha256"].tolist()):
            if isinstance(sha, str) and sha:
                rows.setdefault(sha, []).append(row)
        return rows

    def neighbours(self, vectors: np.ndarray, k: int, sha256: list[str | None] | None = None,
                   allow_self: bool = False) -> tuple[Neighbours, list[dict[str, Any]]]:
        """The ``k`` nearest searchable rows (reference rows of a labelled bundle, all rows
        of an unlabelled one) of each query, leaving out the query's own copies: rows with
        its sha256 and rows at cosine >= SELF_COSINE (leave-one-out), unless ``allow_self``.

        Returns (neighbours, per query {"id", "split", "excluded"} of its indexed copy, or
        {} when it has none among the searched rows). With ``allow_self`` a copy found
        among the neighbours is reported with ``excluded`` 0: it votes for itself.
        """
        from embedsearch.index import Neighbours, search

        limit = self.reference_rows if self.labelled else None
        n_rows = self.index.ntotal if limit is None else min(limit, self.index.ntotal)
        rows = self.rows_by_sha256
        own = [np.array([r for r in rows.get(s or "", []) if r < n_rows], np.int64)
               for s in (sha256 or [None] * len(vectors))]
        pad = 0 if allow_self else max((len(o) for o in own), default=0) + 4
        while True:
            want = min(k + pad, n_rows)
            raw = search(self.index, vectors, max(want, 1), limit)
            ids, sims, found = [], [], []
            short = False
            for q in range(len(vectors)):
                qi, qs = raw.ids[q], raw.similarities[q]
                copy = (qs >= SELF_COSINE) | np.isin(qi, own[q])
                keep = np.ones_like(copy) if allow_self else ~copy
                ids.append(qi[keep][:k])
                sims.append(qs[keep][:k])
                first = int(qi[copy][0]) if copy.any() else (int(own[q][0]) if len(own[q])
                                                              else None)
                found.append({} if first is None else {
                    "id": str(self.items["id"].iat[first]),
                    "split": _none(self.items["split"].iat[first]),
                    "excluded": 0 if allow_self else int(copy.sum())})
                short |= len(ids[-1]) < k and want < n_rows
            if not short:
                return Neighbours(ids, sims), found
            pad = max(pad, 4) * 4

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
        from embedsearch.training import MethodOutput, run_methods, top_probabilities

        items = self.items
        item_ids, item_labels = items["id"].to_numpy(), items["label"].to_numpy()
        knn_out = None
        use_knn = self.labelled and method != "zeroshot"
        clf = self.knn(k, weighting) if use_knn else None
        neigh, in_index = self.neighbours(vectors, max(k, n_neighbours) if use_knn
                                          else n_neighbours, sha256, allow_self)
        if clf is not None:
            trimmed = type(neigh)([i[:k] for i in neigh.ids], [s[:k] for s in neigh.similarities])
            proba = vote(trimmed, clf._y_idx, len(clf.classes_), weighting)
            knn_out = MethodOutput("knn", f"knn(k={k}, {weighting})", clf.classes_, proba)
        chosen, outputs = run_methods(self, vectors, method, knn_out, head_name, classes,
                                      templates)
        out = []
        for q, qid in enumerate(ids):
            shown = [
                {"id": str(item_ids[j]), "label": _none(item_labels[j]),
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
        see :meth:`embed_paths`.
        """
        def run() -> list[Prediction]:
            vectors, statuses, shas = self.embed_files(paths, batch_size, num_workers)
            vectors = self._tta(vectors, statuses, tta, batch_size, num_workers)
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
            if not self._follow_new_generation():
                raise
            return run()

    def _follow_new_generation(self) -> bool:
        """Switch to the generation committed since this bundle was opened, if any."""
        try:
            latest = read_manifest(self.path)
        except (BundleError, OSError):
            return False
        if latest.get("generation") == self.manifest.get("generation"):
            return False
        verify_files(self.path, latest)
        log.info("%s: a rebuild committed generation %s; reading it", self.path,
                 latest.get("generation"))
        if encoder_key(latest["encoder"]) != encoder_key(self.encoder_identity):
            self._encoder = None
        self.manifest = latest
        for cached in ("items", "failures", "embeddings", "index", "rows_by_sha256",
                       "_loaded_classifiers"):
            self.__dict__.pop(cached, None)
        return True

    # -- trained heads & zero-shot (see embedsearch.training) ------------------------------
    def heads(self) -> list[dict[str, Any]]:
        """Registered heads: name, kind, validation figures, training seconds, files."""
        return [{"name": n, **e} for n, e in self.manifest.get("heads", {}).items()]

    def load_head(self, name: str | os.PathLike[str] | None = None) -> Any:
        """A trained head by name (None: the best by validation macro-F1) or head folder;
        refused when it was trained on another encoder's embeddings."""
        from embedsearch.training import load_bundle_head

        return load_bundle_head(self, name)

    def fit_head(self, kind: str = "linear", **options: Any) -> Any:
        """Train and save a head on the cached embeddings (see ``training.fit_head``)."""
        from embedsearch.training import fit_head

        return fit_head(self, kind, **options)

    def zeroshot(self, classes: list[str] | None = None,
                 templates: str | list[str] | None = None) -> Any:
        """A CLIP zero-shot classifier over ``classes`` (default: the bundle's classes)."""
        from embedsearch.training import bundle_zeroshot

        return bundle_zeroshot(self, classes, templates)

    def classifier(self, method: str = "auto", k: int = 10, weighting: str = "similarity",
                   head_name: str | None = None, classes: list[str] | None = None,
                   templates: str | list[str] | None = None) -> Any:
        """A fitted classifier (``predict_proba`` / ``predict`` / ``classes_``) for arrays."""
        from embedsearch.training import choose_method

        kind = method
        if method == "auto":
            kind, head_name = choose_method(self, head_name, classes)
        if kind == "knn":
            return self.knn(k, weighting)
        if kind == "head":
            return self.load_head(head_name)
        if kind == "zeroshot":
            return self.zeroshot(classes, templates)
        raise EmbedsearchError(f"no classifier for method {method!r} on bundle {self.name}",
                               hint="use knn, head or zeroshot (an unlabelled bundle needs a "
                               "CLIP encoder and --classes)")


def _none(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"no index bundle at {path}",
                          hint=f"build one: embedsearch build-index DATA --name {path.name}")
    if not mpath.is_file():
        raise BundleError(f"{path} has no manifest.json: not a bundle, or its first build did "
                          "not finish", hint="run embedsearch build-index again to resume")
    manifest = read_versioned_json(mpath, BUNDLE_FORMAT, SCHEMA_VERSION, "bundle manifest",
                                   "rebuild the bundle")
    problem = _manifest_problem(manifest) or _content_problem(manifest)
    if problem:
        raise BundleError(f"{mpath} is damaged or was edited: {problem}",
                          hint=f"rebuild it: embedsearch build-index DATA --out {path} "
                          "--overwrite")
    return manifest


_ROLES = ("embeddings", "items", "failures", "index")
#: The manifest key holding the sha256 of the rest of the manifest (see content_digest).
CONTENT_KEY = "content_sha256"


def content_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON, without its own ``content_sha256`` entry.

    The file hashes vouch for the data files; this one vouches for the manifest itself, so
    an edited class list, row count or index type is refused instead of believed. It is a
    checksum, not a secret: it catches edits and damage, not a forger who recomputes it.
    """
    body = {k: v for k, v in manifest.items() if k != CONTENT_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``path/manifest.json`` (the commit point) with its content checksum."""
    manifest[CONTENT_KEY] = content_digest(manifest)
    write_json(path / "manifest.json", manifest)


def _content_problem(m: dict[str, Any]) -> str | None:
    # Bundles written before the checksum existed have none; their structure is still
    # checked, and their files are verified by hash.
    if CONTENT_KEY in m and m[CONTENT_KEY] != content_digest(m):
        return "its content does not match its content_sha256 (edited by hand?)"
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _inside(rel: Any) -> bool:
    return isinstance(rel, str) and bool(rel) and not Path(rel).is_absolute() \
        and ".." not in Path(rel).parts


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is structurally wrong with a manifest (so loaders never hit a KeyError)."""
    enc, roles, files, index = (m.get(k) for k in ("encoder", "roles", "files", "index"))
    if not isinstance(enc, dict) or not isinstance(enc.get("spec"), str) \
            or not isinstance(enc.get("dim"), int) or enc["dim"] < 1:
        return "no encoder spec and dimension"
    if not all(isinstance(enc.get(k, {}), dict) for k in ("weights", "preprocess")):
        return "the encoder's weights or preprocessing are not objects"
    fp = m.get("fingerprint")
    if not isinstance(fp, list) or len(fp) != enc["dim"] or not all(map(_is_number, fp)):
        return "no encoder fingerprint of the encoder's dimension"
    if not isinstance(index, dict) or not all(isinstance(index.get(k), int)
                                              for k in ("ntotal", "reference_rows")):
        return "no index row counts"
    if not 0 <= index["reference_rows"] <= index["ntotal"]:
        return (f"reference_rows {index['reference_rows']} is not between 0 and the "
                f"{index['ntotal']} rows of the index")
    if not isinstance(index.get("type", ""), str):
        return "the index type is not a string"
    if not isinstance(m.get("generation", 1), int) or isinstance(m.get("generation"), bool):
        return "the generation is not a number"
    classes, counts, source = m.get("classes", []), m.get("counts"), m.get("source", {})
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes is not a list of names"
    if not isinstance(counts, dict) or not all(
            isinstance(counts.get(k, {}), dict) for k in ("by_class", "by_split", "by_reason")):
        return "no image counts"
    if not isinstance(source, dict) or not all(isinstance(source.get(k, ""), str)
                                               for k in ("path", "kind")):
        return "the source is not an object with a path"
    for key in ("heads", "dedupe"):
        if not isinstance(m.get(key, {}), dict):
            return f"{key} is not an object"
    for name, head in m.get("heads", {}).items():
        if not isinstance(head, dict) or not _inside(head.get("path")) \
                or not isinstance(head.get("files", {}), dict):
            return f"head {name!r} has no folder inside the bundle"
    if not isinstance(roles, dict) or not isinstance(files, dict) \
            or not all(isinstance(roles.get(r), str) for r in _ROLES):
        return f"the files of roles {', '.join(_ROLES)} are not all listed"
    for rel in roles.values():
        # Every role's file must be covered by a hash, and stay inside the bundle.
        if rel not in files or not _inside(rel):
            return f"role file {rel!r} is outside the bundle or has no recorded hash"
    for rel, meta in files.items():
        if not _inside(rel):
            return f"file {rel!r} is outside the bundle"
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) \
                or not isinstance(meta.get("sha256"), str):
            return f"no size and sha256 for {rel!r}"
    return None


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file listed in the manifest exists with the recorded size and sha256."""
    for rel, meta in manifest.get("files", {}).items():
        f = path / rel
        try:
            same = f.stat().st_size == meta["bytes"] and file_digest(f) == meta["sha256"]
        except OSError as exc:  # gone (or unreadable) even if it existed a moment ago
            raise BundleError(f"{f} is missing or unreadable ({exc.strerror})",
                              hint=Bundle(path, manifest).rebuild_hint) from exc
        if not same:
            raise BundleError(
                f"{f} does not match manifest.json (size or sha256 differs): it was modified "
                "or truncated after the bundle was written, or manifest.json comes from "
                "another bundle", hint=Bundle(path, manifest).rebuild_hint)


def load_bundle(name_or_path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Open a bundle by name (under ``indexes/``) or path, verifying its files."""
    path = bundle_path(name_or_path)
    manifest = read_manifest(path)
    if verify:
        try:
            verify_files(path, manifest)
        except BundleError:
            # A build may have committed a new generation (and removed the old files)
            # while we were hashing: verify the new manifest once before refusing.
            latest = read_manifest(path)
            if latest == manifest:
                raise
            manifest = latest
            verify_files(path, manifest)
    return Bundle(path, manifest)

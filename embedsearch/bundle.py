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
from embedsearch.errors import BundleError, BundleMismatchError
from embedsearch.store.io import (
    read_npy,
    read_parquet,
    read_versioned_json,
    write_json,
)
from embedsearch.store.verify import CHANGED, file_mismatch

if TYPE_CHECKING:
    import faiss
    import pandas as pd

    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "embedsearch-bundle"
SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("indexes")
HELD_OUT_SPLITS = frozenset({"test"})
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


class Bundle:
    """A loaded, verified index bundle: its facts, arrays and encoder. Use :func:`load_bundle`.

    Queries and predictions are :mod:`embedsearch.query` and :mod:`embedsearch.predict`;
    trained heads, :mod:`embedsearch.head_store`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._encoder: Encoder | None = None
        #: Where queries are embedded ("auto", "cpu", "cuda[:N]", "mps"); not part of the
        #: encoder's identity.
        self.device = "auto"
        self._light: Any = None
        #: Objects derived from this generation (verified heads, zero-shot classifiers),
        #: kept while the bundle is open; cleared by :meth:`refresh`.
        self.memo: dict[tuple[str, ...], Any] = {}

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
        labels = sorted({str(v) for v in df["label"] if text_or_none(v) is not None})
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

    @cached_property
    def rows_by_sha256(self) -> dict[str, list[int]]:
        """sha256 → rows of the bundle's images with those bytes."""
        rows: dict[str, list[int]] = {}
        for row, sha in enumerate(self.items["sha256"].tolist()):
            if isinstance(sha, str) and sha:
                rows.setdefault(sha, []).append(row)
        return rows

    def refresh(self) -> bool:
        """Switch to the generation committed since this bundle was opened, if any (its
        files verified); False when there is none. Cached data and :attr:`memo` are
        dropped."""
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
        for cached in ("items", "failures", "embeddings", "index", "rows_by_sha256"):
            self.__dict__.pop(cached, None)
        self.memo.clear()
        return True

    # -- trained heads (see embedsearch.head_store) -----------------------------------------
    def heads(self) -> list[dict[str, Any]]:
        """Registered heads: name, kind, validation figures, training seconds, files."""
        return [{"name": n, **e} for n, e in self.manifest.get("heads", {}).items()]


def text_or_none(value: Any) -> str | None:
    """A table cell as text; None for a missing one (None or NaN)."""
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
        problem = file_mismatch(f, meta)
        if problem == CHANGED:
            raise BundleError(
                f"{f} does not match manifest.json ({CHANGED}): it was modified "
                "or truncated after the bundle was written, or manifest.json comes from "
                "another bundle", hint=Bundle(path, manifest).rebuild_hint)
        if problem is not None:
            raise BundleError(f"{f} is {problem}", hint=Bundle(path, manifest).rebuild_hint)


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

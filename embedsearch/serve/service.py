"""The framework-free core of the server: one loaded bundle answering queries safely.

:class:`IndexService` owns the bundle, its encoder (loaded once) and a thumbnail cache. It
is what the HTTP layer calls, and what a notebook can call directly. Every way a query can
go wrong comes back as a :class:`QueryError` with an HTTP-like status, a stable code and a
message, never as an arbitrary exception.

Thread safety: decoding runs in the caller's thread (at most ``decode_slots`` at a time, so
a burst of large uploads cannot multiply peak memory); the encoder and the bundle's
classifiers run under one lock, since torch on a small machine gains nothing from two
forward passes at once and heads may keep state; thumbnails are made outside the lock.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from embedsearch.data import images as img_mod
from embedsearch.data.images import LoadFailure, load_image

if TYPE_CHECKING:
    from embedsearch.bundle import Bundle
    from embedsearch.predict import Prediction

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Pixel limit for uploads, checked from the header before decoding (about 8000 × 5000).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_K = 10
DEFAULT_NEIGHBOURS = 12
THUMBNAIL_SIZE = 256
#: Declared content types accepted for uploads; the bytes are then checked by decoding
#: with the allow-listed formats, so a lying header gains nothing.
ACCEPTED_TYPES = frozenset({
    "image/jpeg", "image/pjpeg", "image/png", "image/webp", "image/gif", "image/bmp",
    "image/x-ms-bmp", "image/tiff", "application/octet-stream",
})

#: Load-failure reason → (HTTP status, message prefix) for uploads.
_FAILURE_STATUS = {
    img_mod.EMPTY_FILE: 400,
    img_mod.UNSUPPORTED_FORMAT: 415,
    img_mod.NOT_AN_IMAGE: 422,
    img_mod.TOO_MANY_PIXELS: 413,
    img_mod.TOO_MANY_SCANS: 413,
    img_mod.TRUNCATED: 422,
    img_mod.DECODE_ERROR: 422,
    img_mod.UNREADABLE: 404,
}


class QueryError(Exception):
    """A query that cannot be answered: ``status`` (HTTP-like), ``code``, ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message}


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    etag: str


def image_url(item_id: str) -> str:
    """The server path of an indexed image's thumbnail."""
    return "/images/" + quote(item_id, safe="/")


class IndexService:
    """Answer prediction, search and thumbnail queries against one bundle."""

    def __init__(self, bundle: Bundle, *, k: int = DEFAULT_K,
                 n_neighbours: int = DEFAULT_NEIGHBOURS,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 weights: str | os.PathLike[str] | None = None,
                 thumbnail_size: int = THUMBNAIL_SIZE, thumbnail_cache: int = 1024,
                 decode_slots: int = 2) -> None:
        if k < 1 or n_neighbours < 1:
            raise ValueError("k and n_neighbours must be at least 1")
        self.bundle = bundle
        self.k = k
        self.n_neighbours = n_neighbours
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.weights = weights
        self.thumbnail_size = thumbnail_size
        self._model_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(decode_slots)
        self._ready = False
        self._ids: dict[str, int] = {}
        self._methods: list[str] = []
        # lru_cache is thread-safe; failures raise and so are never cached.
        self.thumbnail: Callable[[str], Thumbnail] = lru_cache(maxsize=thumbnail_cache)(
            self._make_thumbnail)

    # -- start-up -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    def load(self) -> None:
        """Load the encoder, items, embeddings and index once, and run one warm-up query."""
        with self._load_lock:
            if self._ready:
                return
            t0 = time.perf_counter()
            b = self.bundle
            b.encoder(self.weights)
            items = b.items
            self._ids = {str(i): row for row, i in enumerate(items["id"].tolist())}
            _ = b.embeddings, b.index
            if len(items):
                # Warms lazily built parts (kNN labels, heads, zero-shot prompts) now rather
                # than inside the first user's request, and learns which methods answer.
                warm = self._predict(np.asarray(b.embeddings[:1]), ["warm-up"], 1)[0]
                self._methods = list(methods_of(warm, b.classes))
            self._ready = True
            log.info("bundle %s ready in %.1f s", b.name, time.perf_counter() - t0)

    def _require_ready(self) -> None:
        if not self._ready:
            raise QueryError(503, "not_ready", "the index is still loading")

    # -- facts ----------------------------------------------------------------------------
    @property
    def image_root(self) -> Path:
        """The folder image ids are relative to (a table's folder for CSV/parquet sources)."""
        src = self.bundle.manifest.get("source", {})
        p = Path(src.get("path", "."))
        return p if src.get("kind", "folder") == "folder" else p.parent

    def info(self) -> dict[str, Any]:
        b, m = self.bundle, self.bundle.manifest
        enc = m["encoder"]
        return {
            "name": b.name,
            "ready": self._ready,
            "encoder": {"spec": enc.get("spec"), "dim": enc.get("dim"),
                        "weights": enc.get("weights", {}).get("source")},
            "images": int(m["index"]["ntotal"]),
            "reference_images": b.reference_rows,
            "index": {"type": m["index"].get("type"), "exact": m["index"].get("exact")},
            "labelled": b.labelled,
            "classes": b.classes,
            "counts": {"by_class": m["counts"].get("by_class", {}),
                       "by_split": m["counts"].get("by_split", {}),
                       "failed": m["counts"].get("failed", 0)},
            "methods": self.methods(),
            "k": self.k,
            "neighbours": self.n_neighbours,
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                       "accepted_types": sorted(ACCEPTED_TYPES)},
        }

    def methods(self) -> list[str]:
        """Classification methods that answer queries (empty for an unlabelled bundle)."""
        return list(self._methods)

    # -- queries ----------------------------------------------------------------------------
    def predict_bytes(self, data: bytes, *, filename: str = "upload",
                      content_type: str | None = None, k: int | None = None,
                      n_neighbours: int | None = None) -> dict[str, Any]:
        """Classify an uploaded image and find its nearest indexed images."""
        self._require_ready()
        ctype = (content_type or "application/octet-stream").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_TYPES:
            raise QueryError(415, "unsupported_media_type",
                             f"content type {ctype!r} is not accepted; send a JPEG, PNG, WebP, "
                             "GIF, BMP or TIFF image")
        if len(data) > self.max_upload_bytes:
            raise QueryError(413, "upload_too_large", self._too_large(len(data)))
        t0 = time.perf_counter()
        vector, facts = self._embed(data, "the upload")
        result = self._answer(vector, filename, k, n_neighbours, facts["sha256"])
        result["query"] = {"kind": "upload", "filename": filename, **facts}
        result["timing_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return result

    def predict_id(self, item_id: str, *, k: int | None = None,
                   n_neighbours: int | None = None) -> dict[str, Any]:
        """Search from an indexed image, reusing its cached embedding (no re-encoding)."""
        self._require_ready()
        row = self._ids.get(item_id)
        if row is None:
            raise QueryError(404, "unknown_id", f"{item_id!r} is not an image of this index")
        t0 = time.perf_counter()
        n = n_neighbours or self.n_neighbours
        vector = np.asarray(self.bundle.embeddings[row:row + 1], np.float32)
        it = self.bundle.items.iloc[row]
        # The image and its copies are left out of its own neighbours and votes.
        result = self._answer(vector, item_id, k, n, _clean(it.get("sha256")))
        result["query"] = {"kind": "id", "id": item_id, "label": _clean(it.get("label")),
                           "split": _clean(it.get("split")), "image": image_url(item_id)}
        result["timing_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return result

    def predict_path(self, raw: str, *, k: int | None = None,
                     n_neighbours: int | None = None) -> dict[str, Any]:
        """Search from a file inside the indexed folder (an indexed id, or a newer file)."""
        self._require_ready()
        found = self.resolve_path(raw)
        if isinstance(found, str):
            return self.predict_id(found, k=k, n_neighbours=n_neighbours)
        t0 = time.perf_counter()
        data = img_mod.read_bytes(found)
        if isinstance(data, LoadFailure):
            raise QueryError(404, "unreadable", f"{raw}: {data.detail}")
        vector, facts = self._embed(data, raw)
        result = self._answer(vector, raw, k, n_neighbours, facts["sha256"])
        result["query"] = {"kind": "path", "path": raw, **facts}
        result["timing_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return result

    def resolve_path(self, raw: str) -> str | Path:
        """An indexed id for ``raw``, or a regular file inside the indexed folder.

        Refuses ``..`` components, NUL bytes, absolute paths outside the folder and
        symlinks that lead out of it.
        """
        if not raw or "\x00" in raw:
            raise QueryError(400, "bad_path", "the path is empty or contains a NUL byte")
        try:
            return self._resolve_path(raw)
        except OSError as exc:  # a name too long for the file system, a loop of links…
            raise QueryError(404, "not_found",
                             f"{raw[:200]}: no such image in the indexed folder "
                             f"({exc.strerror or exc})") from None

    def _resolve_path(self, raw: str) -> str | Path:
        if raw in self._ids and self._inside_or_indexed(raw):
            return raw
        p = Path(raw)
        if ".." in p.parts:
            raise QueryError(403, "outside_index", "paths may not contain '..'")
        root = Path(os.path.realpath(self.image_root))
        candidate = p if p.is_absolute() else self.image_root / p
        real = Path(os.path.realpath(candidate))
        if not real.is_relative_to(root):
            raise QueryError(403, "outside_index",
                             f"{raw} is outside the indexed folder; only images under it can "
                             "be searched")
        lexical = Path(os.path.normpath(candidate))
        for rid in (lexical.relative_to(self.image_root).as_posix()
                    if lexical.is_relative_to(self.image_root) else None,
                    real.relative_to(root).as_posix()):
            if rid is not None and rid in self._ids:
                return rid
        if not real.is_file():
            raise QueryError(404, "not_found", f"{raw}: no such image in the indexed folder")
        return real

    def _inside_or_indexed(self, item_id: str) -> bool:
        # Indexed ids were checked at scan time; this catches a file replaced since by a
        # symlink that leads out of the folder.
        p = Path(item_id)
        if p.is_absolute():
            return True  # a table may list images outside its folder; the index holds them
        root = Path(os.path.realpath(self.image_root))
        return Path(os.path.realpath(self.image_root / p)).is_relative_to(root)

    # -- thumbnails -------------------------------------------------------------------------
    def _make_thumbnail(self, item_id: str) -> Thumbnail:
        row = self._ids.get(item_id)
        if row is None:
            raise QueryError(404, "unknown_id", "not an image of this index")
        if not self._inside_or_indexed(item_id):
            raise QueryError(404, "unknown_id", "not an image of this index")
        p = Path(item_id)
        path = p if p.is_absolute() else self.image_root / p
        # Same decode slots as uploads: three thumbnails of 9000² PNGs at once would
        # otherwise hold three full-size decodes (~0.6 GB each) in memory together.
        with self._decode_slots:
            loaded = load_image(path, target_size=self.thumbnail_size,
                                max_pixels=img_mod.DEFAULT_MAX_PIXELS)
            if isinstance(loaded, LoadFailure):
                raise QueryError(404, "image_unavailable",
                                 f"the indexed image can no longer be read ({loaded.reason})")
            im = loaded.image  # decoded for us alone: shrink it in place, no copy
            im.thumbnail((self.thumbnail_size, self.thumbnail_size))
        if loaded.width * loaded.height > _TRIM_PIXELS:
            _return_freed_memory()
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        sha = self.bundle.items.iloc[row].get("sha256") or loaded.sha256
        return Thumbnail(buf.getvalue(), f'"{str(sha)[:16]}-{self.thumbnail_size}"')

    # -- internals -------------------------------------------------------------------------
    def _too_large(self, size: int | None = None) -> str:
        got = f" ({size / 1048576:.1f} MiB)" if size is not None else ""
        return (f"the upload is larger than the limit of "
                f"{self.max_upload_bytes / 1048576:.1f} MiB{got}")

    def _embed(self, data: bytes, what: str) -> tuple[np.ndarray, dict[str, Any]]:
        enc = self.bundle.encoder(self.weights)
        with self._decode_slots:
            loaded = load_image(data, target_size=enc.preprocess.resize,
                                max_pixels=self.max_pixels)
            if isinstance(loaded, LoadFailure):
                raise QueryError(_FAILURE_STATUS.get(loaded.reason, 422), loaded.reason,
                                 f"{what} cannot be used: {loaded.detail}")
            try:
                tensor = enc.transform(loaded.image)
            except Exception as exc:
                raise QueryError(422, img_mod.DECODE_ERROR,
                                 f"{what} cannot be preprocessed: {exc}") from exc
        if loaded.width * loaded.height > _TRIM_PIXELS:
            _return_freed_memory()
        with self._model_lock:
            vector = enc.encode_tensors(tensor[None])
        facts = {"width": loaded.width, "height": loaded.height, "format": loaded.format,
                 "bytes": loaded.size, "sha256": loaded.sha256}
        return vector, facts

    def _predict(self, vectors: np.ndarray, ids: list[str], n: int,
                 k: int | None = None, sha256: list[str | None] | None = None
                 ) -> list[Prediction]:
        from embedsearch.predict import Predictor

        with self._model_lock:
            return Predictor(self.bundle).predict_vectors(
                vectors, ids, k=k or self.k, n_neighbours=n, method="all", sha256=sha256)

    def _answer(self, vector: np.ndarray, qid: str, k: int | None,
                n_neighbours: int | None, sha256: str | None = None) -> dict[str, Any]:
        n = n_neighbours or self.n_neighbours
        pred = self._predict(vector, [qid], n, k, [sha256])[0]
        items = self.bundle.items
        neighbours = []
        for nb in pred.neighbours:
            row = self._ids.get(nb["id"])
            split = _clean(items.iloc[row].get("split")) if row is not None else None
            neighbours.append({**nb, "split": split, "image": image_url(nb["id"])})
        return {
            "label": pred.label,
            "confidence": pred.confidence,
            "method": pred.method,
            "methods": methods_of(pred, self.bundle.classes),
            "neighbours": neighbours,
            # An indexed image (same bytes or embedding) is left out of its own votes.
            "in_index": pred.in_index or None,
        }


#: After decoding an image this large, freed memory is handed back to the system.
_TRIM_PIXELS = 4_000_000


@lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _return_freed_memory() -> None:
    """glibc keeps the 16 MB blocks of a large decoded image in its heap after they are
    freed (measured: RSS 0.8 → 1.2 GB after three 7000² PNG thumbnails, for good);
    ``malloc_trim`` gives them back (0.8 GB after). A no-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def methods_of(pred: Prediction, classes: list[str] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Per-method results: the bundle's ``methods`` when it gives them, else its one method."""
    methods = getattr(pred, "methods", None)
    out: dict[str, dict[str, Any]] = {}
    if methods:
        for name, res in methods.items():
            r = res if isinstance(res, dict) else getattr(res, "__dict__", {})
            out[str(name)] = {
                "label": r.get("label"),
                "confidence": r.get("confidence"),
                "probabilities": _sorted_probs(r.get("probabilities") or {}, classes),
                **({"detail": r["method"]} if r.get("method") else {}),
            }
        return out
    if pred.label is not None:
        name = (pred.method or "knn").split("(")[0]
        out[name] = {"label": pred.label, "confidence": pred.confidence,
                     "probabilities": _sorted_probs(pred.probabilities, classes),
                     **({"detail": pred.method} if pred.method else {})}
    return out


def _sorted_probs(probs: dict[str, float], classes: list[str] | None = None
                  ) -> dict[str, float]:
    """Probabilities, highest first, with every class of the bundle (absent ones as 0)."""
    full = {str(c): 0.0 for c in classes or []}
    full.update({str(c): round(float(p), 4) for c, p in probs.items()})
    return dict(sorted(full.items(), key=lambda kv: -kv[1]))


def _clean(value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)

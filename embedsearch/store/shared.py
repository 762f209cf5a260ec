"""One embedding cache for every command: vectors keyed by (file sha256, encoder, precision).

A bundle holds the vectors of its own images; this store holds the vectors every command
computed on this machine, so ``build-index`` into another bundle, ``predict FOLDER``,
``dedupe DIR``, ``leakage TRAIN TEST`` and ``benchmark DIR`` re-encode nothing that was
encoded before, whichever bundle (or none) it went into.

Layout: ``ROOT/embeddings.sqlite``, one row per (encoder key, sha256): width, height, the
vector as raw little-endian float32 bytes (never pickled) and when it was last used.
SQLite makes each write atomic and lets readers run beside a writer (WAL); writers also
take ``ROOT/embeddings.lock`` (filelock), so inserts and evictions from several processes
never interleave. Above the size limit the least recently used rows are evicted.

ROOT is ``$EMBEDSEARCH_CACHE_DIR``, else the user cache folder (``~/.cache/embedsearch``
on Linux); ``EMBEDSEARCH_CACHE_DIR=off`` turns the store off. The limit is
``$EMBEDSEARCH_CACHE_SIZE`` (e.g. ``2GB``; default 4 GB).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.errors import InputError

log = logging.getLogger(__name__)

ENV_DIR = "EMBEDSEARCH_CACHE_DIR"
ENV_SIZE = "EMBEDSEARCH_CACHE_SIZE"
DEFAULT_MAX_BYTES = 4 << 30
_OFF = {"off", "none", "no", "0", "false", "disabled"}
#: Rows per SQL statement (SQLite allows 32,766 host parameters; stay far below).
_CHUNK = 500
_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    encoder TEXT NOT NULL, sha256 TEXT NOT NULL, dim INTEGER NOT NULL,
    width INTEGER, height INTEGER, vector BLOB NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (encoder, sha256));
CREATE INDEX IF NOT EXISTS vectors_used ON vectors (used);
CREATE TABLE IF NOT EXISTS encoders (
    encoder TEXT PRIMARY KEY, spec TEXT, fingerprint BLOB,
    images INTEGER, seconds REAL);
"""

def parse_size(text: str) -> int:
    """``"4GB"``, ``"500 MiB"``, ``"1e9"`` → bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise InputError(f"{text!r} is not a size", hint="write it like 2GB, 500MB or 1e9")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def cache_root() -> Path | None:
    """Where the shared store lives, or None when it is turned off."""
    raw = os.environ.get(ENV_DIR)
    if raw is not None and raw.strip().lower() in _OFF:
        return None
    if raw:
        return Path(raw).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("embedsearch", appauthor=False))


def max_bytes() -> int:
    env = os.environ.get(ENV_SIZE)
    return parse_size(env) if env else DEFAULT_MAX_BYTES


def store_key(encoder_key: str) -> str:
    """A short key for :func:`embedsearch.bundle.encoder_key` (spec, weights, preprocessing,
    precision, implementation version)."""
    return hashlib.sha256(encoder_key.encode()).hexdigest()[:24]


@dataclass
class Cached:
    """One stored embedding."""

    vector: np.ndarray
    width: int
    height: int


class SharedCache:
    """The store's view for one encoder. Use :func:`open_shared`."""

    def __init__(self, root: Path, key: str, dim: int, limit: int) -> None:
        self.root, self.key, self.dim, self.limit = root, key, dim, limit
        root.mkdir(parents=True, exist_ok=True)
        self.db = root / "embeddings.sqlite"
        from filelock import FileLock

        self.lock = FileLock(str(root / "embeddings.lock"), timeout=300)
        with self.lock:
            con = self._connect()
            try:
                con.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes on a new file
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(_SCHEMA)
            finally:
                con.close()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db, timeout=300, isolation_level=None)
        con.execute("PRAGMA busy_timeout=300000")
        return con

    # -- reading ----------------------------------------------------------------------------
    def get_many(self, shas: Sequence[str]) -> dict[str, Cached]:
        """The stored embeddings of these files (missing ones are absent), marked as used.
        A store that cannot be read answers nothing: it only ever saves time."""
        try:
            return self._get_many(shas)
        except (sqlite3.Error, OSError, TimeoutError) as exc:
            log.warning("shared embedding cache %s unreadable (%s)", self.root, exc)
            return {}

    def _get_many(self, shas: Sequence[str]) -> dict[str, Cached]:
        found: dict[str, Cached] = {}
        wanted = sorted({s for s in shas if s})
        if not wanted:
            return found
        con = self._connect()
        try:
            for sha, dim, w, h, blob in _select_in(
                    con, "SELECT sha256, dim, width, height, vector FROM vectors "
                    "WHERE encoder=? AND sha256 IN ({})", [self.key], wanted):
                vec = np.frombuffer(blob, dtype="<f4")
                if dim == self.dim and vec.shape == (self.dim,) and np.isfinite(vec).all():
                    found[sha] = Cached(vec.astype(np.float32), int(w or 0), int(h or 0))
        finally:
            con.close()
        if found:
            self._touch(list(found))
        return found

    def _touch(self, shas: list[str]) -> None:
        now = time.time()
        with self.lock:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                list(_select_in(con, "UPDATE vectors SET used=? WHERE encoder=? AND sha256 IN "
                                "({})", [now, self.key], shas))
                con.execute("COMMIT")
            finally:
                con.close()

    def missing(self, shas: Sequence[str]) -> set[str]:
        """Which of these files have no stored embedding."""
        wanted = sorted({s for s in shas if s})
        have: set[str] = set()
        con = self._connect()
        try:
            have.update(r[0] for r in _select_in(
                con, "SELECT sha256 FROM vectors WHERE encoder=? AND sha256 IN ({})",
                [self.key], wanted))
        finally:
            con.close()
        return set(wanted) - have

    # -- writing ----------------------------------------------------------------------------
    def put_many(self, shas: Sequence[str | None], vectors: np.ndarray,
                 sizes: Iterable[tuple[int, int]] | None = None) -> int:
        """Store one vector per sha256 (rows without a sha256 are skipped); returns how
        many rows were written. Evicts least recently used rows above the size limit. A
        full or read-only disk writes nothing and does not fail the command."""
        try:
            return self._put_many(shas, vectors, sizes)
        except (sqlite3.Error, OSError, TimeoutError) as exc:
            log.warning("shared embedding cache %s not written (%s)", self.root, exc)
            return 0

    def _put_many(self, shas: Sequence[str | None], vectors: np.ndarray,
                  sizes: Iterable[tuple[int, int]] | None = None) -> int:
        vectors = np.asarray(vectors, np.float32)
        dims = list(sizes) if sizes is not None else [(0, 0)] * len(vectors)
        now = time.time()
        rows = [(self.key, sha, self.dim, int(w or 0), int(h or 0),
                 np.ascontiguousarray(v, "<f4").tobytes(), now)
                for sha, v, (w, h) in zip(shas, vectors, dims, strict=True) if sha]
        if not rows:
            return 0
        with self.lock:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT OR REPLACE INTO vectors VALUES (?,?,?,?,?,?,?)", rows)
                con.execute("COMMIT")
                self._evict(con)
            finally:
                con.close()
        return len(rows)

    def _evict(self, con: sqlite3.Connection) -> None:
        total = con.execute("SELECT COALESCE(SUM(dim), 0) * 4, COUNT(*) FROM vectors").fetchone()
        stored, n = int(total[0]), int(total[1])
        if stored <= self.limit or n == 0:
            return
        # Down to 90 % of the limit, so that every insert does not evict again.
        drop = max(1, int(n * (1 - 0.9 * self.limit / stored)))
        con.execute("BEGIN IMMEDIATE")
        con.execute("DELETE FROM vectors WHERE rowid IN "
                    "(SELECT rowid FROM vectors ORDER BY used LIMIT ?)", (drop,))
        con.execute("COMMIT")
        con.execute("PRAGMA incremental_vacuum")
        log.info("shared embedding cache: evicted %d least recently used vectors", drop)

    # -- encoder facts ----------------------------------------------------------------------
    def check_fingerprint(self, spec: str, fingerprint: np.ndarray, min_cosine: float) -> None:
        """Forget this encoder's vectors when it now embeds the reference image differently
        (library or weights changed under the same identity)."""
        fp = np.asarray(fingerprint, "<f4")
        with self.lock:
            con = self._connect()
            try:
                row = con.execute("SELECT fingerprint FROM encoders WHERE encoder=?",
                                  (self.key,)).fetchone()
                con.execute("BEGIN IMMEDIATE")
                if row is not None and row[0] is not None:
                    old = np.frombuffer(row[0], "<f4").astype(np.float64)
                    cos = float(old @ fp / (np.linalg.norm(old) * np.linalg.norm(fp) + 1e-12)) \
                        if old.shape == fp.shape else -1.0
                    if cos < min_cosine:
                        log.warning("encoder %s changed (fingerprint cosine %.4f): its cached "
                                    "vectors are dropped", spec, cos)
                        con.execute("DELETE FROM vectors WHERE encoder=?", (self.key,))
                con.execute("INSERT INTO encoders (encoder, spec, fingerprint) VALUES (?,?,?) "
                            "ON CONFLICT(encoder) DO UPDATE SET fingerprint=excluded.fingerprint",
                            (self.key, spec, fp.tobytes()))
                con.execute("COMMIT")
            finally:
                con.close()

    def record_throughput(self, images: int, seconds: float) -> None:
        """Keep the last measured encoding speed, for reports on reused embeddings."""
        with self.lock:
            con = self._connect()
            try:
                con.execute("UPDATE encoders SET images=?, seconds=? WHERE encoder=?",
                            (images, seconds, self.key))
            finally:
                con.close()

    def throughput(self) -> dict[str, Any] | None:
        con = self._connect()
        try:
            row = con.execute("SELECT images, seconds FROM encoders WHERE encoder=?",
                              (self.key,)).fetchone()
        finally:
            con.close()
        if not row or not row[0] or not row[1]:
            return None
        return {"images": int(row[0]), "seconds": round(float(row[1]), 3),
                "images_per_second": round(row[0] / row[1], 2)}

    def __len__(self) -> int:
        con = self._connect()
        try:
            return int(con.execute("SELECT COUNT(*) FROM vectors WHERE encoder=?",
                                   (self.key,)).fetchone()[0])
        finally:
            con.close()


def _select_in(con: sqlite3.Connection, sql: str, params: list[Any], keys: Sequence[str]
               ) -> Iterable[tuple[Any, ...]]:
    """Run ``sql`` (with ``{}`` for the IN list) over ``keys`` in chunks; yields its rows."""
    for start in range(0, len(keys), _CHUNK):
        part = list(keys[start:start + _CHUNK])
        yield from con.execute(sql.format(",".join("?" * len(part))), [*params, *part])


def open_shared(identity: dict[str, Any], fingerprint: np.ndarray | None = None
                ) -> SharedCache | None:
    """The shared store for this encoder, or None when it is off or cannot be opened
    (a read-only home must not stop a build: the store only saves time)."""
    from embedsearch.encoders.identity import FINGERPRINT_MIN_COSINE, encoder_key

    root = cache_root()
    if root is None:
        return None
    try:
        cache = SharedCache(root, store_key(encoder_key(identity)), int(identity["dim"]),
                            max_bytes())
        if fingerprint is not None:
            cache.check_fingerprint(str(identity.get("spec")), fingerprint,
                                    FINGERPRINT_MIN_COSINE)
    except (OSError, sqlite3.Error, TimeoutError) as exc:
        log.warning("shared embedding cache %s unavailable (%s): encoding without it", root, exc)
        return None
    return cache


def hash_files(paths: Sequence[Path], workers: int | None = None) -> list[str | None]:
    """sha256 of each file (None when it cannot be read), hashed in threads (hashlib
    releases the GIL)."""
    from embedsearch.embed import default_workers
    from embedsearch.store.io import file_digest

    def one(p: Path) -> str | None:
        try:
            return file_digest(p)
        except OSError:
            return None

    if len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="hash") as pool:
        return list(pool.map(one, paths))

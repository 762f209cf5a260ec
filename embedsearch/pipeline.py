"""build_index: scan → encode what is new (resumably) → consolidate → faiss → manifest."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.build_options import BuildOptions
from embedsearch.bundle import (
    bundle_path,
    read_manifest,
    verify_files,
)
from embedsearch.data.scan import Collection, Record, scan
from embedsearch.encoders.identity import (
    FINGERPRINT_MIN_COSINE,
    encoder_key,
    fingerprint_cosine,
    identity_diffs,
)
from embedsearch.engines import ENGINES
from embedsearch.errors import BundleError, BundleMismatchError, EmbedsearchError
from embedsearch.generation import remove_stale_generations, write_generation
from embedsearch.store.cache import ShardCache
from embedsearch.store.io import (
    exclusive_lock,
    read_npy,
    read_parquet,
    remove_temp_files,
)
from embedsearch.store.shared import SharedCache, hash_files, open_shared

if TYPE_CHECKING:
    import pandas as pd

    from embedsearch.bundle import Bundle
    from embedsearch.embed import ItemInfo
    from embedsearch.encoders.base import Encoder
    from embedsearch.engines.ray_engine import RayOptions
    from embedsearch.views import ViewSet

log = logging.getLogger(__name__)

#: Failures that depend on more than the file's size and mtime (a chmod changes neither):
#: tried again by every build, which costs one open() each.
_RETRIED = frozenset({"unreadable", "not_a_regular_file"})


@dataclass
class BuildResult:
    """What a build did; ``counts`` mirrors the manifest."""

    path: Path
    manifest: dict[str, Any]
    encoded: int
    reused: int
    failures: pd.DataFrame
    seconds: float
    encode_seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    #: Of ``reused``: vectors taken from the shared embedding cache (by content hash).
    from_shared: int = 0
    views_encoded: int = 0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def summary(self) -> str:
        c = self.manifest["counts"]
        line = f"{c['embedded']:,} embedded, {c['failed'] + c['skipped']:,} skipped"
        if c["by_reason"]:
            line += ": " + ", ".join(f"{n} {r.replace('_', ' ')}"
                                     for r, n in sorted(c["by_reason"].items()))
        return line


def _stat_key(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _meta_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    from embedsearch.audit.pixels import STAT_COLUMNS
    from embedsearch.store.cache import META_COLUMNS

    return pd.DataFrame(rows, columns=[*META_COLUMNS, *STAT_COLUMNS])


class _Cache:
    """Every vector (and failure) already computed for this encoder, keyed by id."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.lookup: dict[str, tuple[int, int, dict[str, Any]]] = {}

    def add(self, vectors: np.ndarray, meta: pd.DataFrame) -> None:
        source = len(self.arrays)
        self.arrays.append(vectors)
        for row in meta.to_dict("records"):
            row.setdefault("status", "ok")  # the items table only holds embedded images
            row.setdefault("detail", "")
            self.lookup[row["id"]] = (source, int(row["row"]), row)

    def get(self, rec: Record, key: tuple[int, int]) -> dict[str, Any] | None:
        hit = self.lookup.get(rec.id)
        if hit is None or (int(hit[2]["size"]), int(hit[2]["mtime_ns"])) != key:
            return None
        return hit[2]

    def reusable(self, rec: Record, key: tuple[int, int]) -> bool:
        """Whether ``rec`` needs no encoding: a cached vector, or a failure worth keeping."""
        meta = self.get(rec, key)
        return meta is not None and meta["status"] not in _RETRIED

    def vector(self, rec_id: str) -> np.ndarray:
        source, row, _ = self.lookup[rec_id]
        return self.arrays[source][row]


def build_index(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                options: BuildOptions | None = None, *, name: str | None = None,
                **overrides: Any) -> BuildResult:
    """Embed a collection into an index bundle, re-encoding only what changed.

    ``out`` is the bundle folder (default ``indexes/NAME``, ``name`` defaulting to the
    source's name); ``options`` says how to read, encode and store (:class:`BuildOptions`).
    Keyword ``overrides`` replace fields of ``options`` (``build_index(data, model=SPEC)``
    is ``build_index(data, None, BuildOptions(model=SPEC))``), so a one-off build needs no
    options object; an unknown field is a TypeError naming it.
    """
    opts = replace(options or BuildOptions(), **overrides)
    engine, model, weights, precision = opts.engine, opts.model, opts.weights, opts.precision
    encoder, progress = opts.encoder, opts.progress
    if engine not in ENGINES:
        raise EmbedsearchError(f"unknown engine {engine!r}",
                               hint=f"use one of {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    collection = scan(source, path_col=opts.path_col, label_col=opts.label_col,
                      split_col=opts.split_col, follow_symlinks=opts.follow_symlinks,
                      skip_missing=opts.skip_missing, split_map=opts.split_map)
    if opts.exclude is not None:
        from embedsearch.audit.exclude import exclude_records

        collection = exclude_records(collection, opts.exclude)
    path = Path(out) if out else bundle_path(name or Path(source).stem)
    with exclusive_lock(path):
        remove_temp_files(path)
        old = _previous_manifest(path)
        from embedsearch.dedupe.rules import build_settings

        dedupe_settings = build_settings(old, opts.dedupe, opts.dedupe_threshold,
                                          opts.dedupe_keep)
        if isinstance(model, list | tuple):
            model = model[0] if len(model) == 1 else list(model)
        if isinstance(model, str) and "+" in model:  # A+B: a concatenation in one spec
            from embedsearch.encoders.combine import concat_parts

            model = concat_parts(model) or model
        if encoder is None and (isinstance(model, list) or (
                not model and old is not None and "parts" in old["encoder"])):
            from embedsearch.encoders.combine import combine, encoder_from_identity

            if isinstance(model, list) and weights is not None:
                raise EmbedsearchError("--weights is ambiguous with several --model",
                                       hint="give each its file: --model SPEC=WEIGHTS")
            encoder = combine(model, precision, opts.device) if isinstance(model, list) \
                else encoder_from_identity(old["encoder"], weights,  # type: ignore[index]
                                           opts.device)
        if encoder is None:
            from embedsearch.encoders import DEFAULT_ENCODER, DEFAULT_PRECISION, load_encoder

            spec = model or (old["encoder"]["spec"] if old else DEFAULT_ENCODER)
            old_weights = old["encoder"]["weights"] if old else {}
            if weights is None and not model and old_weights.get("source") == "file":
                weights = old_weights["path"]
            if precision is None:
                precision = old["encoder"].get("precision", "fp32") if old and not model \
                    else DEFAULT_PRECISION
            if weights is None and opts.engine == "local" and _cpu_only(opts.device):
                from embedsearch.encoders.backends import light_encoder_for_spec

                encoder = light_encoder_for_spec(spec, precision)
            if encoder is None:
                encoder = load_encoder(spec, weights, precision=precision,
                                       device=opts.device)
        identity = encoder.identity()
        fingerprint = encoder.fingerprint()
        if old is not None and not opts.overwrite:
            _check_compatible(path, old, identity, fingerprint)
        cache = _Cache()
        if old is not None and not opts.overwrite and _reusable(path, old):
            cache.add(read_npy(path / old["roles"]["embeddings"]),
                      read_parquet(path / old["roles"]["items"]))
            failed_before = read_parquet(path / old["roles"]["failures"])
            cache.add(np.zeros((0, encoder.dim), np.float32),
                      failed_before[failed_before["row"] == -1])
            if "dedupe_removed" in old["roles"]:  # left out by --dedupe, vectors kept
                cache.add(read_npy(path / old["roles"]["dedupe_removed_embeddings"]),
                          read_parquet(path / old["roles"]["dedupe_removed"]))
        shards = ShardCache(path / "cache", encoder_key(identity))
        if opts.overwrite:
            shards.clear()
        for vectors, meta in shards.load():
            cache.add(vectors, meta)

        keys = [_stat_key(r.path) for r in collection.records]
        todo = [i for i, r in enumerate(collection.records)
                if not cache.reusable(r, keys[i])]
        shared = open_shared(identity, fingerprint)
        from_shared = _reuse_shared(shared, collection, keys, todo, shards, cache) \
            if shared is not None and todo else 0
        todo = [i for i in todo if not cache.reusable(collection.records[i], keys[i])]
        reused = len(collection.records) - len(todo)
        t_enc = time.perf_counter()
        _encode_missing(encoder, collection, keys, todo, shards, cache, opts.batch_size,
                        opts.num_workers, opts.shard_size,
                        progress(len(collection.records), reused) if progress else None,
                        engine, opts.ray_options, shared)
        encode_seconds = time.perf_counter() - t_enc
        encoding = _encoding_record(old, shared, len(todo), encode_seconds)
        view_set = _encode_views(path, old, opts.overwrite, collection, keys, cache, encoder,
                                 opts.views, opts.batch_size, opts.num_workers, progress)
        metas = [cache.get(rec, key) for rec, key in zip(collection.records, keys, strict=True)]
        assert all(m is not None for m in metas)
        manifest, failures = write_generation(path, old, collection, metas, cache.vector,
                                              encoder, fingerprint, opts.index_type,
                                              dedupe_settings, encoding, view_set)
        shards.clear()
        remove_stale_generations(path, manifest)
        if shared is not None:
            _seed_shared(shared, path, manifest)
    return BuildResult(path, manifest, len(todo), reused, failures,
                       time.perf_counter() - t0, encode_seconds, from_shared=from_shared,
                       views_encoded=view_set.encoded if view_set else 0)


def _encode_views(path: Path, old: dict[str, Any] | None, overwrite: bool,
                  collection: Collection,
                  keys: list[tuple[int, int]], cache: _Cache, encoder: Encoder,
                  views: str | None, batch_size: int, num_workers: int | None,
                  progress: Callable[[int, int], Callable[[int], None]] | None
                  ) -> ViewSet | None:
    import embedsearch.views as views_mod

    names = views_mod.settings(old, views)
    if not names:
        return None
    metas = [cache.get(r, k) for r, k in zip(collection.records, keys, strict=True)]
    return views_mod.encode_views(encoder, views_mod.training_images(collection.records, metas),
                                  names, {} if overwrite else views_mod.previous(path, old),
                                  batch_size, num_workers, progress)


def _reuse_shared(shared: SharedCache, collection: Collection, keys: list[tuple[int, int]],
                  todo: list[int], shards: ShardCache, cache: _Cache) -> int:
    """Take the vectors of ``todo`` images that any earlier command stored (by content
    hash) into this build, committed as a shard like freshly encoded ones."""
    records = collection.records
    shas = hash_files([records[i].path for i in todo])
    hits = shared.get_many([s for s in shas if s])
    rows: list[dict[str, Any]] = []
    vectors = []
    for i, sha in zip(todo, shas, strict=True):
        hit = hits.get(sha) if sha else None
        if hit is None:
            continue
        size, mtime = keys[i]
        rows.append({"id": records[i].id, "size": size, "mtime_ns": mtime, "sha256": sha,
                     "status": "ok", "detail": "", "width": hit.width, "height": hit.height,
                     "row": len(vectors)})
        vectors.append(hit.vector)
    if rows:
        meta = _meta_frame(rows)
        shards.append(np.stack(vectors), meta)
        cache.add(np.stack(vectors), meta)
    return len(rows)


def share_bundle_vectors(bundle: Bundle) -> None:
    """Offer a bundle's vectors to the shared embedding cache, so that building another
    bundle from (some of) the same images encodes none of them, even when this bundle was
    built before the cache existed or on another machine."""
    shared = open_shared(bundle.encoder_identity, np.asarray(bundle.manifest["fingerprint"],
                                                             np.float32))
    if shared is not None:
        _seed_shared(shared, bundle.path, bundle.manifest)


def _seed_shared(shared: SharedCache, path: Path, manifest: dict[str, Any]) -> None:
    """Offer this bundle's vectors to the shared store (those it lacks, e.g. from a bundle
    built before the store existed), so the next command on these images encodes none."""
    items = read_parquet(path / manifest["roles"]["items"])
    absent = shared.missing(items["sha256"].dropna().tolist())
    if not absent:
        return
    rows = np.flatnonzero(items["sha256"].isin(absent).to_numpy())
    vectors = read_npy(path / manifest["roles"]["embeddings"])
    for start in range(0, len(rows), 4096):
        part = rows[start:start + 4096]
        sub = items.iloc[part]
        shared.put_many(sub["sha256"].tolist(), np.asarray(vectors[part]),
                        zip(sub["width"].tolist(), sub["height"].tolist(), strict=True))


def _encoding_record(old: dict[str, Any] | None, shared: SharedCache | None, encoded: int,
                     seconds: float) -> dict[str, Any] | None:
    """The manifest's encoding throughput: measured now, else as recorded before (by this
    bundle, or by the shared store when the vectors came from there)."""
    if encoded > 0 and seconds > 0:
        if shared is not None:
            shared.record_throughput(encoded, seconds)
        return {"images": encoded, "seconds": round(seconds, 3),
                "images_per_second": round(encoded / seconds, 2)}
    previous = (old or {}).get("encoding")
    if previous:
        return previous
    return shared.throughput() if shared is not None else None


def _previous_manifest(path: Path) -> dict[str, Any] | None:
    if not (path / "manifest.json").exists():
        return None
    return read_manifest(path)


def _reusable(path: Path, old: dict[str, Any]) -> bool:
    """Whether the previous generation's files still hold what its manifest recorded.

    A damaged generation is never reused: its vectors would be copied into the new one, whose
    fresh hashes would then vouch for them. Its images are re-encoded instead.
    """
    try:
        verify_files(path, old)
    except BundleError as exc:
        log.warning("not reusing the previous generation of %s (%s); re-encoding its images",
                    path, exc.message)
        return False
    return True


def _check_compatible(path: Path, old: dict[str, Any], identity: dict[str, Any],
                      fingerprint: np.ndarray) -> None:
    if encoder_key(old["encoder"]) != encoder_key(identity):
        # Names what differs: another model, or the same spec resolved to another
        # configuration (e.g. a bundle from before the pretrained tag's config was recorded).
        raise BundleMismatchError(
            f"{path} was built with encoder {old['encoder']['spec']} "
            f"({old['encoder']['dim']}-d); this build uses {identity['spec']} "
            f"({identity['dim']}-d); differs in: "
            f"{', '.join(identity_diffs(old['encoder'], identity)) or 'identity'}",
            hint=f"choose another --name/--out, or pass --overwrite to rebuild {path} "
            "with the new encoder",
        )
    cos = fingerprint_cosine(fingerprint, old["fingerprint"])
    if cos < FINGERPRINT_MIN_COSINE:
        raise BundleMismatchError(
            f"encoder {identity['spec']} now embeds the reference image differently "
            f"(cosine {cos:.4f}) than when {path} was built",
            hint="library versions or weights changed; pass --overwrite to re-encode everything",
        )


def _cpu_only(device: str | None) -> bool:
    """Whether the encoder will run on the CPU, decided without importing torch:
    ``--device cpu``, or ``auto`` on Linux with no GPU device node (NVIDIA, AMD ROCm,
    WSL's). Elsewhere (macOS's MPS, Windows) only an explicit ``cpu`` counts."""
    import sys

    if device == "cpu":
        return True
    if device not in (None, "auto") or not sys.platform.startswith("linux"):
        return False
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")
    return not any(Path(node).exists() for node in nodes)


def _local_chunks(encoder: Encoder, paths: list[Path], chunk_size: int, batch_size: int | None,
                  num_workers: int | None, tick: Callable[[int], None] | None
                  ) -> Iterator[tuple[np.ndarray, list[ItemInfo]]]:
    """Per chunk: (vectors of the images that decoded, one ItemInfo per path, in order)."""
    from embedsearch.embed import embed_sources

    # One DataLoader for the whole run, so decode workers start once, not once per shard;
    # the stream of batches is cut into chunks here.
    vectors = np.zeros((0, encoder.dim), np.float32)
    infos: list[ItemInfo] = []
    stream = embed_sources(encoder, paths, batch_size=batch_size, num_workers=num_workers,
                           progress=tick, pixel_stats=True)
    for _, v, batch_infos in stream:
        vectors = np.concatenate([vectors, v])
        infos.extend(batch_infos)
        while len(infos) >= chunk_size:
            head, infos = infos[:chunk_size], infos[chunk_size:]
            n_ok = sum(info.status == "ok" for info in head)
            yield vectors[:n_ok], head
            vectors = vectors[n_ok:]
    if infos:
        yield vectors, infos


def _encode_missing(encoder: Encoder, collection: Collection, keys: list[tuple[int, int]],
                    todo: list[int], shards: ShardCache, cache: _Cache, batch_size: int | None,
                    num_workers: int | None, shard_size: int,
                    tick: Callable[[int], None] | None, engine: str = "local",
                    ray_options: RayOptions | None = None,
                    shared: SharedCache | None = None) -> None:
    records = collection.records
    paths = [records[i].path for i in todo]
    if engine == "ray":
        from embedsearch.engines.ray_engine import RayOptions, encode_chunks

        opts = ray_options or RayOptions(batch_size=batch_size or RayOptions.batch_size)
        chunks = encode_chunks(encoder, paths, shard_size, opts, progress=tick)
    else:
        chunks = _local_chunks(encoder, paths, shard_size, batch_size, num_workers, tick)
    # Whatever the engine, each chunk is committed here through the same shard cache: the
    # bundle, its verification and resume after a kill do not depend on where it was encoded.
    with contextlib.closing(chunks):
        for n, (vectors, infos) in enumerate(chunks):
            chunk = todo[n * shard_size:(n + 1) * shard_size]
            rows: list[dict[str, Any]] = []
            n_ok = 0
            for i, info in zip(chunk, infos, strict=True):
                rec = records[i]
                size, mtime = keys[i]
                ok = info.status == "ok"
                rows.append({"id": rec.id, "size": size, "mtime_ns": mtime,
                             "sha256": info.sha256, "status": info.status,
                             "detail": info.detail, "width": info.width,
                             "height": info.height, "row": n_ok if ok else -1,
                             **(info.stats or {})})
                n_ok += ok
            if n_ok != len(vectors):
                raise EmbedsearchError(f"engine {engine} returned {len(vectors)} vectors for "
                                       f"{n_ok} decoded images")
            meta = _meta_frame(rows)
            shards.append(vectors, meta)
            cache.add(vectors, meta)
            if shared is not None:
                ok = meta[meta["status"] == "ok"]
                shared.put_many(ok["sha256"].tolist(), vectors,
                                zip(ok["width"].tolist(), ok["height"].tolist(), strict=True))

"""One generation of a bundle: its tables, vectors and index written, then the manifest.

Each build writes ``data/*-GGGGGG.*`` files for a new generation and commits them by
writing ``manifest.json``; readers see the old generation or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import platform
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.bundle import BUNDLE_FORMAT, HELD_OUT_SPLITS, SCHEMA_VERSION, write_manifest
from embedsearch.errors import BundleError
from embedsearch.store.io import read_npy, write_npy, write_parquet
from embedsearch.store.verify import file_record
from embedsearch.version import __version__

if TYPE_CHECKING:
    import pandas as pd

    from embedsearch.data.scan import Collection
    from embedsearch.encoders.base import Encoder
    from embedsearch.views import ViewSet


def held_out_splits(splits: list[str]) -> tuple[frozenset[str], str]:
    """The splits kept out of the kNN reference (and of head training), and why.

    ``test`` when there is one. A collection published as ``train`` + ``val`` only (e.g.
    Imagenette) has its ``val`` as the evaluation split: it is held out instead, so that
    predicting it measures images the reference has never seen.
    """
    if HELD_OUT_SPLITS & set(splits):
        return frozenset(HELD_OUT_SPLITS & set(splits)), "the test split is only scored"
    if "val" in splits and "train" in splits:
        return frozenset({"val"}), ("there is no test split, so val is the held-out "
                                    "evaluation split: kNN votes with train only and heads "
                                    "are trained on train only")
    return frozenset(), ""


def write_generation(path: Path, old: dict[str, Any] | None, collection: Collection,
                     metas: list[dict[str, Any]], vector_of: Callable[[str], np.ndarray],
                     encoder: Encoder, fingerprint: np.ndarray, index_type: str,
                     dedupe: dict[str, Any] | None = None,
                     encoding: dict[str, Any] | None = None, views: ViewSet | None = None
                     ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Write a new generation of the bundle's files, then the manifest (the commit).

    ``metas`` holds the build's record of each of ``collection.records`` (status, size,
    sha256…), ``vector_of(id)`` the embedding of each one that was read.
    """
    import pandas as pd

    from embedsearch.audit.pixels import STAT_COLUMNS
    from embedsearch.index import make_index, write_faiss

    ok_rows, failed_rows = [], []
    for rec, meta in zip(collection.records, metas, strict=True):
        row = {**meta, "label": rec.label, "split": rec.split}
        (ok_rows if meta["status"] == "ok" else failed_rows).append(row)
    # Reference rows first, held-out rows last: kNN searches a prefix of the index.
    held_out, held_out_reason = held_out_splits(collection.splits)
    ok_rows.sort(key=lambda r: r["split"] in held_out)
    vectors = np.stack([vector_of(r["id"]) for r in ok_rows]) if ok_rows \
        else np.zeros((0, encoder.dim), np.float32)
    # px_*: pixel statistics for the audit (NaN for images encoded before they existed).
    columns = ["id", "label", "split", "size", "mtime_ns", "sha256", "width", "height",
               *STAT_COLUMNS]
    items = pd.DataFrame(ok_rows, columns=[*columns, "status", "detail", "row"])
    items["row"] = np.arange(len(items))
    items = items[[*columns, "row"]]
    failures = pd.DataFrame(
        [{"id": r["id"], "reason": r["status"], "detail": r["detail"], "size": r["size"],
          "mtime_ns": r["mtime_ns"], "sha256": r["sha256"], "status": r["status"], "row": -1}
         for r in failed_rows]
        + [{"id": s.id, "reason": s.reason, "detail": s.detail, "size": -1, "mtime_ns": -1,
            "sha256": None, "status": s.reason, "row": -2} for s in collection.skipped],
        columns=["id", "reason", "detail", "size", "mtime_ns", "sha256", "status", "row"],
    )
    if len(items) == 0:
        raise BundleError(
            f"none of the {len(collection.records)} images could be read "
            f"({Counter(failures['reason']).most_common(3)})",
            hint="check the files; run with --debug for details")
    gen = (old["generation"] + 1) if old else 1
    roles = {r: f"data/{r}-{gen:06d}.{ext}" for r, ext in
             (("embeddings", "npy"), ("items", "parquet"), ("failures", "parquet"),
              ("index", "faiss"))}
    dedupe_record = None
    if dedupe:
        from embedsearch.dedupe.rules import apply_build_dedupe

        items, vectors, gone, gone_vectors, dedupe_record = apply_build_dedupe(items, vectors,
                                                                               dedupe)
        roles["dedupe_removed"] = f"data/dedupe_removed-{gen:06d}.parquet"
        roles["dedupe_removed_embeddings"] = f"data/dedupe_removed_embeddings-{gen:06d}.npy"
        write_parquet(path / roles["dedupe_removed"], gone)
        write_npy(path / roles["dedupe_removed_embeddings"], gone_vectors)
    write_npy(path / roles["embeddings"], vectors)
    write_parquet(path / roles["items"], items)
    write_parquet(path / roles["failures"], failures)
    views_record = None
    if views is not None:
        from embedsearch.views import write as write_views

        view_roles, views_record = write_views(path, gen, views, items)
        roles.update(view_roles)
    del vectors  # the index is filled from the written file, block by block
    index, index_info = make_index(read_npy(path / roles["embeddings"]), index_type)
    write_faiss(path / roles["index"], index)
    n_ref = int((~items["split"].isin(held_out)).sum())
    index_info["reference_rows"] = n_ref
    if held_out:
        index_info["held_out"] = {"splits": sorted(held_out), "why": held_out_reason}
    labels = items["label"].dropna()
    manifest = {
        "format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "generation": gen,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedsearch_version": __version__,
        "encoder": encoder.identity(),
        "fingerprint": [round(float(x), 6) for x in fingerprint],
        "source": {"path": str(collection.root if collection.source == "folder"
                               else collection.root / collection.source.split(":", 1)[1]),
                   "kind": collection.source.split(":")[0], "splits": collection.splits},
        "classes": sorted(labels.unique().tolist()),
        "counts": {
            "scanned": len(collection.records) + len(collection.skipped),
            "embedded": len(items),
            "failed": len(failed_rows),
            "skipped": len(collection.skipped),
            "by_reason": dict(Counter(failures["reason"])),
            "by_class": {str(k): int(v) for k, v in labels.value_counts().sort_index().items()},
            "by_split": {str(k): int(v) for k, v in
                         items["split"].fillna("none").value_counts().sort_index().items()},
        },
        "index": index_info,
        "roles": roles,
        "files": {rel: file_record(path / rel) for rel in roles.values()},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "backend": encoder.backend},
    }
    if old:
        for key in ("heads", "dedupe"):
            if key in old:
                manifest[key] = old[key]
    manifest.pop("dedupe", None)
    if encoding:
        manifest["encoding"] = encoding
    if dedupe_record is not None:
        manifest["dedupe"] = {**dedupe_record, "removed_file": roles["dedupe_removed"]}
    if views_record is not None:
        manifest["views"] = views_record
    write_manifest(path, manifest)
    return manifest, failures


def remove_stale_generations(path: Path, manifest: dict[str, Any]) -> None:
    """Delete the data files of generations older than ``manifest``'s."""
    keep = {path / rel for rel in manifest["roles"].values()}
    for f in (path / "data").glob("*-*.*"):
        if f not in keep:
            with contextlib.suppress(OSError):
                f.unlink()

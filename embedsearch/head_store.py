"""Trained heads on disk: write, read back verified, register in a bundle, pick the best.

A head is a folder of ``weights.safetensors`` + ``head.json`` (no pickle); it loads
without scikit-learn's or torch's objects and predicts bit-identically after loading. A
bundle registers its heads under ``heads/NAME/`` in its manifest, with the files' hashes
and the encoder they were trained on, so a modified file or a head from another encoder is
refused.
"""

from __future__ import annotations

import inspect
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.encoders.identity import check_same_encoder, encoder_digest
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.store.verify import file_mismatch, file_record

if TYPE_CHECKING:
    from embedsearch.bundle import Bundle
    from embedsearch.classify.base import Head

HEAD_FORMAT = "embedsearch-head"
HEAD_SCHEMA = 1
WEIGHTS_FILE = "weights.safetensors"
HEAD_FILE = "head.json"
#: A bundle's heads live in ``HEADS_DIR/NAME/``.
HEADS_DIR = "heads"
#: ``Head.info`` keys that are not part of the saved description's own fields.
_OWN_FIELDS = {"format", "schema_version", "kind", "embedsearch_version", "classes", "dim",
               "hyperparameters", "weights"}


# -- one head folder -------------------------------------------------------------------------
def write_head(head: Head, folder: str | Path, encoder: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Write ``weights.safetensors`` then ``head.json`` into ``folder`` atomically.

    Returns ``{file name: {"bytes", "sha256"}}`` for a manifest to record.
    """
    from safetensors.numpy import save as st_save

    from embedsearch.store.io import atomic_write, write_json
    from embedsearch.version import __version__

    head._check_fitted()
    folder = Path(folder)
    blob = st_save({k: np.ascontiguousarray(v, np.float32) for k, v in head.params.items()},
                   metadata={"format": HEAD_FORMAT, "kind": head.kind})
    atomic_write(folder / WEIGHTS_FILE, lambda fh: fh.write(blob))
    meta = {
        "format": HEAD_FORMAT,
        "schema_version": HEAD_SCHEMA,
        "kind": head.kind,
        "embedsearch_version": __version__,
        "classes": [str(c) for c in head.classes_],
        "dim": head.dim,
        "hyperparameters": head.hyperparameters(),
        **head.info,
        "weights": {"file": WEIGHTS_FILE, **file_record(folder / WEIGHTS_FILE),
                    "tensors": {k: list(v.shape) for k, v in head.params.items()}},
        "encoder": encoder,
        **(extra or {}),
    }
    write_json(folder / HEAD_FILE, meta)
    return {name: file_record(folder / name) for name in (WEIGHTS_FILE, HEAD_FILE)}


def read_head_meta(folder: str | Path) -> dict[str, Any]:
    """A head folder's ``head.json``, checked for format, schema and a known kind."""
    from embedsearch.classify.heads import HEAD_CLASSES
    from embedsearch.store.io import read_versioned_json

    folder = Path(folder)
    path = folder / HEAD_FILE
    if not path.is_file():
        raise BundleError(f"{folder} holds no {HEAD_FILE}: not a trained head",
                          hint="train one: embedsearch train --index NAME --head linear")
    meta = read_versioned_json(path, HEAD_FORMAT, HEAD_SCHEMA, "head description",
                               "retrain the head with embedsearch train")
    if meta.get("kind") not in HEAD_CLASSES:
        raise BundleError(f"{path}: unknown head kind {meta.get('kind')!r}")
    return meta


def load_head(folder: str | Path) -> Head:
    """Load a saved head (no pickle: safetensors + JSON), checking its weights' sha256."""
    from safetensors.numpy import load_file

    from embedsearch.classify.heads import HEAD_CLASSES

    folder = Path(folder)
    meta = read_head_meta(folder)
    wpath = folder / meta["weights"]["file"]
    if file_mismatch(wpath, {"sha256": meta["weights"]["sha256"]}) is not None:
        raise BundleError(f"{wpath} is missing or was modified after the head was saved",
                          hint=f"retrain it: embedsearch train … --head {meta['kind']}")
    try:
        params = {k: np.asarray(v, np.float32) for k, v in load_file(str(wpath)).items()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise BundleError(f"{wpath}: unreadable safetensors ({exc})") from exc
    expected = {k: tuple(v) for k, v in meta["weights"]["tensors"].items()}
    if {k: v.shape for k, v in params.items()} != expected:
        raise BundleError(f"{wpath} holds tensors that do not match {folder / HEAD_FILE}")
    cls = HEAD_CLASSES[meta["kind"]]
    # Settings a head of an older release did not record keep their defaults.
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    hp = {k: (tuple(v) if isinstance(v, list) else v)
          for k, v in meta["hyperparameters"].items() if k in known}
    head = cls(**hp)
    head.classes_ = np.asarray(meta["classes"], dtype=str)
    head.params = params
    head.info = {k: v for k, v in meta.items() if k not in _OWN_FIELDS}
    if head.dim != meta["dim"] or len(head.classes_) != params[head._out_key].shape[0]:
        raise BundleError(f"{folder / HEAD_FILE} disagrees with its weights (dim or classes)")
    return head


# -- heads registered in a bundle ------------------------------------------------------------
def save_head(bundle: Bundle, head: Head, name: str, extra: dict[str, Any] | None = None
              ) -> Path:
    """Write ``heads/NAME/`` and register it in the manifest (the commit point)."""
    from embedsearch.bundle import read_manifest, write_manifest
    from embedsearch.store.io import exclusive_lock

    rel = f"{HEADS_DIR}/{name}"
    folder = bundle.path / rel
    with exclusive_lock(bundle.path):
        manifest = read_manifest(bundle.path)
        files = write_head(head, folder, encoder=bundle.encoder_identity,
                           extra={"name": name, **(extra or {})})
        entry = {
            "kind": head.kind,
            "path": rel,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "classes": len(head.classes_),
            "encoder": {"spec": bundle.encoder_identity.get("spec"),
                        "key_sha256": encoder_digest(bundle.encoder_identity)},
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
    heads = bundle.manifest.get("heads", {})
    if name is None:
        name = require_head(bundle)
    # Verified once per Bundle generation and manifest entry (a server predicts many times).
    key = ("head", str(name), repr(heads.get(str(name))))
    if key in bundle.memo:
        return bundle.memo[key]
    if str(name) in heads:
        entry = heads[str(name)]
        folder = bundle.path / entry["path"]
        for rel, meta in entry.get("files", {}).items():
            f = bundle.path / rel
            if file_mismatch(f, meta) is not None:
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
        bundle.memo[key] = head
    return head


def best_head_name(bundle: Bundle) -> str | None:
    """The registered head with the best validation figure, or None: by the metric the
    heads were selected by when they all share one, else macro-F1 (then accuracy).

    Heads trained before the bundle was rebuilt with another encoder are passed over (they
    are refused when asked for by name).
    """
    current = encoder_digest(bundle.encoder_identity)
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


def require_head(bundle: Bundle) -> str:
    """:func:`best_head_name`, or a clear error when the bundle has no usable head."""
    name = best_head_name(bundle)
    if name is None:
        raise EmbedsearchError(f"bundle {bundle.name} has no trained head",
                               hint=f"train one: embedsearch train --index {bundle.path} "
                               "--head linear")
    return name


def head_beats_knn(bundle: Bundle, name: str) -> bool:
    """Whether head ``name`` scored at least kNN's validation macro-F1 when it was trained."""
    entry = bundle.manifest.get("heads", {}).get(name, {})
    head_f1 = entry.get("validation", {}).get("macro_f1")
    knn_f1 = entry.get("knn_validation", {}).get("macro_f1")
    if head_f1 is None or knn_f1 is None:
        return True
    return float(head_f1) >= float(knn_f1)

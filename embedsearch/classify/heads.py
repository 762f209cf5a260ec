"""Trained heads over cached embeddings: the registry, saving and verified loading.

The heads themselves: ``LinearHead`` (``classify/linear.py``) and ``MLPHead``
(``classify/mlp.py``), on the shared contract and selection protocol of
``classify/base.py``. A head is saved as ``weights.safetensors`` + ``head.json`` (no
pickle) and loads without scikit-learn's or torch's objects.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.classify.base import (
    CLASS_WEIGHTS,
    HEAD_FILE,
    HEAD_FORMAT,
    HEAD_SCHEMA,
    ExtraTrain,
    Head,
    check_choice,
)
from embedsearch.classify.linear import LinearHead
from embedsearch.classify.mlp import MLPHead
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.store.io import file_digest, read_versioned_json

__all__ = ["CLASS_WEIGHTS", "HEAD_CLASSES", "HEAD_FILE", "HEAD_KINDS", "ExtraTrain", "Head",
           "LinearHead", "MLPHead", "check_choice", "load_head", "make_head",
           "read_head_meta"]

HEAD_KINDS = ("linear", "mlp")

HEAD_CLASSES: dict[str, type[Head]] = {"linear": LinearHead, "mlp": MLPHead}


def make_head(kind: str, **params: Any) -> Head:
    """A new, unfitted head of ``kind`` ("linear" or "mlp")."""
    if kind not in HEAD_CLASSES:
        raise EmbedsearchError(f"unknown head {kind!r}", hint=f"use one of {HEAD_KINDS}")
    return HEAD_CLASSES[kind](**params)


def read_head_meta(folder: str | Path) -> dict[str, Any]:
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

    folder = Path(folder)
    meta = read_head_meta(folder)
    wpath = folder / meta["weights"]["file"]
    if not wpath.is_file() or file_digest(wpath) != meta["weights"]["sha256"]:
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
    skip = {"format", "schema_version", "kind", "embedsearch_version", "classes", "dim",
            "hyperparameters", "weights"}
    head.info = {k: v for k, v in meta.items() if k not in skip}
    if head.dim != meta["dim"] or len(head.classes_) != params[head._out_key].shape[0]:
        raise BundleError(f"{folder / HEAD_FILE} disagrees with its weights (dim or classes)")
    return head

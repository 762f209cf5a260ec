"""Trained heads over cached embeddings: the registry of head kinds.

The heads themselves: ``LinearHead`` (``classify/linear.py``) and ``MLPHead``
(``classify/mlp.py``), on the shared contract and selection protocol of
``classify/base.py``. Saving and verified loading: ``embedsearch/head_store.py``.
"""

from __future__ import annotations

from typing import Any

from embedsearch.classify.base import (
    CLASS_WEIGHTS,
    ExtraTrain,
    Head,
    check_choice,
)
from embedsearch.classify.linear import LinearHead
from embedsearch.classify.mlp import MLPHead
from embedsearch.errors import EmbedsearchError

__all__ = ["CLASS_WEIGHTS", "HEAD_CLASSES", "HEAD_KINDS", "ExtraTrain", "Head", "LinearHead",
           "MLPHead", "check_choice", "make_head"]

HEAD_KINDS = ("linear", "mlp")

HEAD_CLASSES: dict[str, type[Head]] = {"linear": LinearHead, "mlp": MLPHead}


def make_head(kind: str, **params: Any) -> Head:
    """A new, unfitted head of ``kind`` ("linear" or "mlp")."""
    if kind not in HEAD_CLASSES:
        raise EmbedsearchError(f"unknown head {kind!r}", hint=f"use one of {HEAD_KINDS}")
    return HEAD_CLASSES[kind](**params)

"""Encoder identity: which identities embed alike, and whether an encoder still does.

An encoder's ``identity()`` (spec, dim, weights, preprocessing, precision, …) is recorded
in every artifact made from its vectors (bundles, heads, caches, exports); these helpers
decide whether two identities are the same encoder and check the fingerprint (the
embedding of a fixed reference image) an artifact recorded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from embedsearch.errors import BundleMismatchError

#: Cosine similarity two fingerprints of the same encoder must reach (CPU kernels differ).
FINGERPRINT_MIN_COSINE = 0.999
#: Encoder families whose resolved configuration is part of the key (see encoder_key).
CONFIG_CHECKED_FAMILIES = ("openclip",)


def encoder_key(identity: dict[str, Any]) -> str:
    """The parts of an encoder identity that decide its vectors, as one comparable string."""
    w = identity.get("weights", {})
    key = "|".join(str(x) for x in (
        identity.get("spec"), identity.get("dim"), w.get("sha256"), identity.get("impl_version"),
        identity.get("precision", "fp32"),
        sorted(identity.get("preprocess", {}).items()),
    ))
    # The resolved model configuration (pretrained tag, activation, resize mode) of open_clip
    # encoders: one built before it was recorded lacks it and is refused (those were built
    # with the architecture's defaults, e.g. GELU for OpenAI's QuickGELU tags). timm and
    # torchvision resolved theirs from the spec the same way before it was recorded, and
    # EfficientNet-Lite has none: their keys, and their existing bundles, are unchanged.
    config = identity.get("config")
    if config is not None and config.get("family") in CONFIG_CHECKED_FAMILIES:
        key += "|" + json.dumps(config, sort_keys=True)
    return key


def encoder_digest(identity: dict[str, Any], length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of :func:`encoder_key`."""
    return hashlib.sha256(encoder_key(identity).encode()).hexdigest()[:length]


def identity_diffs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The parts of two encoder identities that differ (for messages)."""
    return [k for k in ("spec", "dim", "weights", "preprocess", "precision", "impl_version",
                        "config") if a.get(k) != b.get(k)]


def check_same_encoder(expected: dict[str, Any], found: dict[str, Any], what: str,
                       fix: str) -> None:
    """Refuse ``what`` when it was made with another encoder than ``expected``."""
    if encoder_key(expected) == encoder_key(found):
        return
    diffs = identity_diffs(expected, found)
    raise BundleMismatchError(
        f"{what} was made with encoder {found.get('spec')} ({found.get('dim')}-d), "
        f"not with {expected.get('spec')} ({expected.get('dim')}-d); differs in: "
        f"{', '.join(diffs) or 'identity'}",
        hint=fix,
    )


def fingerprint_cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two fingerprints; -1 when their shapes differ."""
    va, vb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if va.shape != vb.shape:
        return -1.0
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12))

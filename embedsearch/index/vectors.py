"""Vectors as faiss takes them: C-contiguous float32 (n, dim), finite."""

from __future__ import annotations

import numpy as np

from embedsearch.errors import EmbedsearchError


def check_vectors(x: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (n, dim) array, or raise a clear error."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise EmbedsearchError(
            f"{what} have shape {tuple(x.shape)}, but the index holds {dim}-d vectors",
            hint="query with the encoder the index was built with",
        )
    if not np.isfinite(x).all():
        raise EmbedsearchError(f"{what} contain NaN or infinite values; they cannot be searched")
    return np.ascontiguousarray(x, dtype=np.float32)

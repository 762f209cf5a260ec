"""embedsearch: classify, search and de-duplicate image collections.

A frozen pretrained encoder turns every image into a cached, L2-normalised embedding once;
FAISS gives a training-free kNN classifier; small heads trained on the cached embeddings
give the trained comparison.

Importing this package is cheap: torch, faiss and open_clip are imported only by the
functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedsearch.version import __version__

__all__ = ["BuildOptions", "Bundle", "EmbedsearchError", "Predictor", "__version__",
           "build_index", "load_bundle"]

if TYPE_CHECKING:
    from embedsearch.build_options import BuildOptions
    from embedsearch.bundle import Bundle, load_bundle
    from embedsearch.errors import EmbedsearchError
    from embedsearch.pipeline import build_index
    from embedsearch.predict import Predictor

_LAZY = {
    "Bundle": "embedsearch.bundle",
    "load_bundle": "embedsearch.bundle",
    "build_index": "embedsearch.pipeline",
    "BuildOptions": "embedsearch.build_options",
    "Predictor": "embedsearch.predict",
    "EmbedsearchError": "embedsearch.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embedsearch' has no attribute {name!r}")

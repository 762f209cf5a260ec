"""Serve an index bundle over HTTP: a JSON API and a single web page.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart)::

    pip install -e ".[serve]"
    embedsearch serve --index NAME

Library use: ``create_app(bundle_or_path)`` returns a FastAPI app; ``IndexService`` is the
framework-free part (queries, limits, thumbnails) it wraps.
"""

from __future__ import annotations

from embedsearch.serve.app import create_app
from embedsearch.serve.service import IndexService, QueryError

__all__ = ["IndexService", "QueryError", "create_app"]

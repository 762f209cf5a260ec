"""FastAPI application: a thin HTTP layer over :class:`IndexService`.

Endpoints: ``POST /predict`` (multipart upload, raw image body, JSON or form ``id``/``path``),
``GET /images/{id}`` (thumbnails of indexed images only), ``GET /health``, ``GET /info``,
the page at ``/`` and the framework's ``/openapi.json`` and ``/docs``.

The request body of ``/predict`` is read by hand, not by FastAPI's ``UploadFile``, so the
size limit holds while reading: an oversized upload is refused after ``max_upload_bytes``
(plus multipart framing), never buffered whole.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from embedsearch import __version__
from embedsearch.serve.service import (
    ACCEPTED_TYPES,
    DEFAULT_K,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_NEIGHBOURS,
    IndexService,
    QueryError,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: Room for multipart boundaries and part headers on top of the image itself.
FORM_OVERHEAD = 64 * 1024
#: An oversized body is read and dropped up to this size so that the client gets the 413;
#: beyond it the connection is simply closed.
DRAIN_LIMIT = 64 * 1024 * 1024
MAX_K = 100
#: Request bodies held in memory at once, all requests together (see _BodyBudget).
BODY_BUDGET_BYTES = 256 * 1024 * 1024
#: Longest ``id`` or ``path`` accepted (Linux's PATH_MAX).
MAX_REFERENCE_CHARS = 4096

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
             "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["error", "detail"],
}
_ERRORS = {
    str(code): {"description": why, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for code, why in [
        (400, "malformed request (bad JSON or form, empty upload)"),
        (403, "path outside the indexed folder"),
        (404, "id or path not in the index"),
        (413, "upload over the size limit, or image over the pixel limit"),
        (415, "content type not accepted, or not an image format that is allowed"),
        (422, "the image is truncated or cannot be decoded"),
    ]
}
_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "the image (JPEG, PNG, WebP, GIF, BMP, TIFF)"},
            "id": {"type": "string", "description": "or: an indexed image id"},
            "path": {"type": "string", "description": "or: a path inside the indexed folder"},
        }}},
        "application/json": {"schema": {"type": "object", "properties": {
            "id": {"type": "string"}, "path": {"type": "string"}}}},
        "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {
            "id": {"type": "string"}, "path": {"type": "string"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


def create_app(bundle_or_path: Any, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, k: int = DEFAULT_K,
               n_neighbours: int = DEFAULT_NEIGHBOURS,
               weights: str | os.PathLike[str] | None = None, **service_options: Any
               ) -> FastAPI:
    """Build the app for a :class:`~embedsearch.bundle.Bundle` or a bundle name/path.

    The bundle is opened (and verified) here, so a bad bundle fails before a port is bound;
    the model loads at start-up (lifespan) or earlier through ``app.state.service.load()``.
    """
    from embedsearch.bundle import Bundle, load_bundle

    bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else load_bundle(bundle_or_path)
    service = IndexService(bundle, k=k, n_neighbours=n_neighbours,
                           max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                           weights=weights, **service_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(service.load)
        yield

    app = FastAPI(
        title=f"embedsearch: {bundle.name}",
        version=__version__,
        description="Classify an image and browse its nearest neighbours in an embedsearch "
                    "index bundle.",
        lifespan=lifespan,
    )
    app.state.service = service
    _install_error_handlers(app)

    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_BodyBudget, limit=BODY_BUDGET_BYTES)

    @app.get("/health", tags=["service"])
    def health() -> JSONResponse:
        """Liveness and readiness: 200 once the model is loaded, 503 before."""
        ok = service.ready
        return JSONResponse({"status": "ok" if ok else "loading", "ready": ok},
                            status_code=200 if ok else 503)

    @app.get("/info", tags=["service"])
    def info() -> dict[str, Any]:
        """The bundle: encoder, image counts, classes, methods, limits."""
        return service.info()

    @app.post("/predict", tags=["search"], responses=_ERRORS,  # type: ignore[arg-type]
              openapi_extra={"requestBody": _PREDICT_BODY})
    async def predict(
        request: Request,
        k: int | None = Query(None, ge=1, le=MAX_K, description="neighbours that vote"),
        neighbours: int | None = Query(None, ge=1, le=MAX_K, description="neighbours shown"),
    ) -> JSONResponse:
        """Labels and probabilities from every available method, and the top neighbours.

        Send the image as multipart ``file``, or as the raw body with an image content
        type; or search from an indexed image with JSON/form ``{"id": ...}``, or from a file
        inside the indexed folder with ``{"path": ...}``.
        """
        opts = {"k": k, "n_neighbours": neighbours}
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = service.max_upload_bytes + FORM_OVERHEAD
        body = await _read_limited(request, limit, service)
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await _parse_form(request, body)
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
            if upload is not None:
                data = await upload.read()
                if not data:
                    raise QueryError(400, "empty_file", "the uploaded file is empty")
                return JSONResponse(await run_in_threadpool(
                    lambda: service.predict_bytes(data, filename=upload.filename or "upload",
                                                  content_type=upload.content_type, **opts)))
            fields = {key: str(v) for key, v in form.items()}
            return JSONResponse(await _by_reference(service, fields, opts))
        if ctype == "application/json":
            try:
                payload = json.loads(body or b"null")
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                # RecursionError: thousands of nested brackets, refused like any bad JSON.
                raise QueryError(400, "bad_json", "the body is not valid JSON: "
                                 f"{str(exc)[:200] or type(exc).__name__}") from exc
            if not isinstance(payload, dict):
                raise QueryError(400, "bad_json", 'send a JSON object: {"id": "..."} or '
                                 '{"path": "..."}')
            return JSONResponse(await _by_reference(service, payload, opts))
        if ctype in ACCEPTED_TYPES:
            if not body:
                raise QueryError(400, "empty_file", "the request body is empty")
            if len(body) > service.max_upload_bytes:
                raise QueryError(413, "upload_too_large", service._too_large(len(body)))
            return JSONResponse(await run_in_threadpool(
                lambda: service.predict_bytes(body, content_type=ctype, **opts)))
        raise QueryError(415, "unsupported_media_type",
                         f"content type {ctype or 'none'!r} is not accepted: send "
                         "multipart/form-data with a 'file' field, an image body, or JSON "
                         "with 'id' or 'path'")

    @app.get("/images/{image_id:path}", tags=["search"], responses=_ERRORS,  # type: ignore[arg-type]
             response_class=Response)
    def image(image_id: str, request: Request) -> Response:
        """A JPEG thumbnail of an indexed image (404 for anything not in the index)."""
        thumb = service.thumbnail(image_id)
        headers = {"Cache-Control": "private, max-age=3600", "ETag": thumb.etag}
        if request.headers.get("if-none-match") == thumb.etag:
            return Response(status_code=304, headers=headers)
        return Response(thumb.data, media_type="image/jpeg", headers=headers)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _PAGE_CSP,
                                     "Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        # A fixed allow-list, so no path from the request ever reaches the filesystem.
        files = {"app.js": "text/javascript", "app.css": "text/css"}
        if name not in files:
            raise QueryError(404, "not_found", "no such file")
        return FileResponse(STATIC / name, media_type=files[name],
                            headers={"Cache-Control": "no-cache"})

    return app


class _SecurityHeaders:
    """Pure ASGI middleware (no body buffering) adding defensive headers to every reply."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()
                         if k.lower().encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _BodyBudget:
    """Pure ASGI middleware: request bodies held in memory at once stay under ``limit``.

    Each upload is capped by ``--max-upload-mb``, but a thousand of them arriving together
    would still exhaust memory; past the budget a request is answered 503 (retry shortly)
    instead of buffered. A body's bytes count until its response is sent.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.used = app, limit, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = 0

        async def counted() -> Any:
            nonlocal held
            message = await receive()
            n = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if n and self.used + n > self.limit:
                raise QueryError(503, "busy", "the server is holding too many uploads; "
                                 "retry in a few seconds")
            self.used += n
            held += n
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            self.used -= held


async def _read_limited(request: Request, limit: int, service: IndexService) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed ``limit``.

    Past the limit nothing more is kept, but up to :data:`DRAIN_LIMIT` bytes are still read
    and dropped: a client that is still sending would otherwise see the connection reset
    instead of the 413 and its message.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise QueryError(400, "bad_request", "invalid Content-Length header") from None
        if size > limit:
            # With "Expect: 100-continue" the client waits: answering now costs no upload.
            if size <= DRAIN_LIMIT and "100-continue" not in request.headers.get("expect", ""):
                await _drain(request, DRAIN_LIMIT)
            raise QueryError(413, "upload_too_large", service._too_large(size))
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                await _drain(request, DRAIN_LIMIT - total)
                raise QueryError(413, "upload_too_large", service._too_large())
            chunks.append(chunk)
    except ClientDisconnect:
        raise QueryError(400, "client_disconnected", "the client went away mid-upload"
                         ) from None
    return b"".join(chunks)


async def _drain(request: Request, budget: int) -> None:
    try:
        async for chunk in request.stream():
            budget -= len(chunk)
            if budget < 0:
                return
    except (RuntimeError, ClientDisconnect):  # already read to the end, or client gone
        return


async def _parse_form(request: Request, body: bytes) -> Any:
    """Parse an already-read multipart body (the request's own stream is consumed)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=1, max_fields=10)
    except Exception as exc:
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise QueryError(400, "bad_form", f"the multipart form cannot be read: {detail}"
                         ) from exc


class _Reference(BaseModel):
    """A search from an indexed image (``id``) or a file inside the indexed folder."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = Field(None, max_length=MAX_REFERENCE_CHARS)
    path: StrictStr | None = Field(None, max_length=MAX_REFERENCE_CHARS)


async def _by_reference(service: IndexService, fields: dict[str, Any],
                        opts: dict[str, Any]) -> dict[str, Any]:
    try:
        ref = _Reference.model_validate(fields)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise QueryError(422, "invalid_request", "; ".join(parts)) from None
    item_id, path = ref.id, ref.path
    if isinstance(item_id, str) and item_id:
        return await run_in_threadpool(lambda: service.predict_id(item_id, **opts))
    if isinstance(path, str) and path:
        return await run_in_threadpool(lambda: service.predict_path(path, **opts))
    raise QueryError(400, "missing_image",
                     "send an image file (multipart field 'file'), or 'id' / 'path' of an "
                     "indexed image")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse(exc.as_dict(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                 f"http_{exc.status_code}")
        return JSONResponse({"error": code, "detail": str(exc.detail)},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg"))
                 for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": "; ".join(parts)},
                            status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback for the operator; the client gets no internals.
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal_error",
                             "detail": "an unexpected error occurred; see the server log"},
                            status_code=500)

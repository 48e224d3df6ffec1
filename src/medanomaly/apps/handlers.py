"""The HTTP handlers of ``medanomaly serve``, one function per route, error type and middleware.

:func:`medanomaly.apps.serve.create_app` only wires them into a FastAPI app. Each handler finds the
:class:`~medanomaly.apps.viewer.Viewer` (and the page template) in ``request.app.state``, turns the
request into a call on it and its answer into a response; the work itself (checking, reading,
scoring, rendering) is the Viewer's. Every error is answered as JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medanomaly.apps.uploads import SUPPORTED, ApiError
from medanomaly.apps.viewer import Viewer
from medanomaly.core import jsonio
from medanomaly.core.version import __version__

# the server's log keeps one name, whichever of its modules writes (users filter on it)
log = logging.getLogger("medanomaly.apps.serve")

_ENVELOPE = 64 * 1024  # multipart boundaries, part headers and the small 'keep' field around the file
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def page() -> str:
    """The viewer page template (``{{NONCE}}`` and ``{{MAX_BYTES}}`` filled in per request)."""
    return resources.files("medanomaly").joinpath("static/viewer.html").read_text(encoding="utf-8")


class StrictJSON(JSONResponse):
    """The answers' JSON as our files': a number that is not finite is null (core.jsonio), where
    starlette's JSONResponse would refuse it with a 500."""

    def render(self, content: object) -> bytes:
        return jsonio.dumps(content, indent=None, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _viewer(request: Request) -> Viewer:
    return request.app.state.viewer


def threshold_param(value: str | None) -> float | None:
    """The ``threshold`` query parameter: None when absent or empty; ApiError 422 unless a finite number."""
    if value is None or value == "":
        return None
    try:
        t = float(value)
    except ValueError:
        raise ApiError(422, f"threshold must be a number, got {value!r}") from None
    if not math.isfinite(t):
        raise ApiError(422, f"threshold must be a finite number, got {value!r}")
    return t


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Deletes the viewer's private folders (kept uploads included) when the server stops."""
    try:
        yield
    finally:
        app.state.viewer.close()


# ---------------------------------------------------------------------------------------------- middleware, errors


async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _host_port(url: str) -> tuple[str, int] | None:
    """(host, port) of an origin or URL (``http://localhost:8000/...``); None for ``null``, other
    schemes and anything unparsable."""
    try:
        parts = urlsplit(url.strip())
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        return parts.hostname.lower(), parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a bad port
        return None


async def same_origin(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """403 for a state-changing request (POST, PUT, PATCH, DELETE) sent by a page of another origin.

    Browsers send ``Origin`` with every such request (same-origin ``fetch`` included; ``null`` from
    sandboxed or opaque pages), or at least a ``Referer``; it must name this server as the request
    reached it (the Host header: host and port). A request with neither comes from no web page (curl,
    scripts, the test client) and cannot be forged by one, so it is answered as before."""
    if request.method in _STATE_CHANGING:
        claimed = request.headers.get("origin") or request.headers.get("referer")
        own = _host_port(f"{request.url.scheme}://{request.headers.get('host', '')}")
        if claimed is not None and (own is None or _host_port(claimed) != own):
            shown = claimed if len(claimed) <= 100 else claimed[:97] + "..."
            here = f"{request.url.scheme}://{request.headers.get('host', '')}"
            return _error(403, f"cross-origin request refused: this {request.method} came from {shown!r}, not from "
                               f"this server's own page ({here}/); upload and delete from the viewer page itself")
    return await call_next(request)


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers or None)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()]
    return _error(422, "invalid request: " + "; ".join(parts))


async def crashed(request: Request, exc: Exception) -> JSONResponse:
    log.exception("error serving %s", request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}: {exc}); see the server's log")


# ---------------------------------------------------------------------------------------------- routes


def index(request: Request) -> HTMLResponse:
    """The page, with a fresh script nonce and the upload limit; its CSP allows this server only."""
    nonce, limit = secrets.token_urlsafe(16), _viewer(request).max_upload_bytes
    html = request.app.state.page.replace("{{NONCE}}", nonce).replace("{{MAX_BYTES}}", str(limit))
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' blob:; "
           "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": csp})


def favicon() -> Response:
    return Response(status_code=204)


def info(request: Request) -> dict:
    viewer = _viewer(request)
    p = viewer.predictor
    return {"medanomaly_version": __version__, "task": p.task, "threshold": float(viewer.post.threshold),
            "postprocess": viewer.post.to_dict(), "channels": p.channels,
            "max_upload_bytes": viewer.max_upload_bytes, "supported": SUPPORTED}


class _TooLarge(Exception):
    pass


async def _read_form(request: Request, limit: int, too_large: ApiError) -> FormData:
    """The multipart form, refused (``too_large``) as soon as the body passes ``limit`` bytes plus
    the envelope: by its declared length, else while it streams in."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + _ENVELOPE:
        raise too_large
    seen = 0
    receive = request.receive

    async def limited_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit + _ENVELOPE:
                raise _TooLarge
        return message

    try:
        return await Request(request.scope, limited_receive).form(max_files=1, max_fields=4)
    except _TooLarge:
        raise too_large from None
    except ClientDisconnect:
        raise ApiError(400, "the upload was interrupted") from None


async def predict(request: Request):  # unannotated, as it always was: FastAPI makes no response model of it
    """Multipart field ``file`` (and ``keep``): the session description (a dict) of the analysed upload."""
    viewer = _viewer(request)
    limit = viewer.max_upload_bytes
    too_large = ApiError(413, f"the upload is larger than the {limit / 2**20:g} MB limit of this server "
                              "(medanomaly serve --max-upload-mb)")
    form = await _read_form(request, limit, too_large)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "no file in the request: send it as the multipart/form-data field 'file'")
        if upload.size is not None and upload.size > limit:
            raise too_large
        keep = str(form.get("keep", "")).strip().lower() in ("1", "true", "yes", "on")
        return await run_in_threadpool(viewer.analyse, upload.file, upload.filename, keep)
    finally:
        await form.close()


def slice_png(request: Request, sid: str, k: int, threshold: str | None = None) -> Response:
    png = _viewer(request).slice_png(sid, k, threshold_param(threshold))
    return Response(png, media_type="image/png")


def regions(request: Request, sid: str, threshold: str | None = None) -> dict:
    return _viewer(request).regions(sid, threshold_param(threshold))


def mask(request: Request, sid: str, threshold: str | None = None) -> FileResponse:
    """The mask file, its private folder deleted once it is sent."""
    path, name, work = _viewer(request).mask_file(sid, threshold_param(threshold))
    media = "image/png" if path.suffix == ".png" else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=name,
                        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))


def forget(request: Request, sid: str) -> dict:
    return {"deleted": _viewer(request).drop(sid)}

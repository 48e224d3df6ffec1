"""``medanomaly serve MODEL``: a local web viewer for one model.

A user uploads an image (PNG, JPEG, TIFF, NIfTI ``.nii``/``.nii.gz``, a DICOM file or a zipped DICOM
series), sees it with the model's heat map and mask contour overlaid, moves a threshold slider (mask
and region list follow), scrolls through the slices of a volume and downloads the mask in the input's
format (PNG for rasters, NIfTI for volumes and DICOM).

Endpoints (all errors are JSON ``{"error": "..."}``):

* ``GET /``: the single-page viewer (plain HTML, CSS and JavaScript; no network access beyond this server);
* ``GET /api/info``: model task, default threshold, upload limit;
* ``POST /api/predict``: multipart upload, field ``file`` (and ``keep=true`` to keep the upload): returns
  the session id, shape, number of slices, default threshold and score range. 413 over the size
  limit, 415 for an unsupported type, 422 for a file that cannot be read (the medanomaly error);
* ``GET /api/slice/{sid}/{k}?threshold=t``: PNG of slice ``k`` with heat map and mask contour;
* ``GET /api/regions/{sid}?threshold=t``: the connected regions of the whole mask;
* ``GET /api/mask/{sid}?threshold=t``: the mask file;
* ``DELETE /api/session/{sid}``: forget a session.

Privacy: an upload is written to a private (0700) temporary folder, read, and deleted before the
response (the multipart parser's own spool file is anonymous and closed with the request). With
``keep=true`` the upload stays in a private server-side folder until the server stops. Score maps
are kept in memory only, for the last :data:`MAX_SESSIONS` uploads. The server binds 127.0.0.1 by
default and answers only requests addressed to a loopback name there (no DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import shutil
import socket
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from medanomaly.apps.uploads import (  # noqa: F401 - re-exported for callers of medanomaly.apps.serve
    _HEAD,
    MAX_REGIONS_LISTED,
    SUPPORTED,
    ZIP_EXPANSION,
    ApiError,
    check_type,
    extract_zip,
    find_series,
    sniff,
)
from medanomaly.apps.viewer import MAX_SESSIONS, Session, Viewer  # noqa: F401 - re-exported
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost")
_ENVELOPE = 64 * 1024  # multipart boundaries, part headers and the small 'keep' field around the file


# ---------------------------------------------------------------------------------------------- app


def _page() -> str:
    return resources.files("medanomaly").joinpath("static/viewer.html").read_text(encoding="utf-8")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _threshold_param(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        t = float(value)
    except ValueError:
        raise ApiError(422, f"threshold must be a number, got {value!r}") from None
    if not math.isfinite(t):
        raise ApiError(422, f"threshold must be a finite number, got {value!r}")
    return t


class _TooLarge(Exception):
    pass


def create_app(model_dir: str | Path, max_upload_mb: float = 200, device: str = "cpu",
               max_sessions: int = MAX_SESSIONS, allowed_hosts: list[str] | None = None,
               work_dir: str | Path | None = None) -> FastAPI:
    """The viewer app for the model directory ``model_dir`` (loaded once, here).

    ``allowed_hosts``: Host header names the app answers (default: 127.0.0.1 and localhost, so a
    web page elsewhere cannot reach it through DNS rebinding); ``["*"]`` for any. ``work_dir``:
    where the private temporary folder is made (default: the system's). ``app.state.viewer`` is
    the :class:`Viewer`."""
    viewer = Viewer(model_dir, max_upload_mb, device, max_sessions, work_dir)
    page = _page()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            viewer.close()

    app = FastAPI(title="medanomaly viewer", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.viewer = viewer
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or list(LOOPBACK_NAMES))

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()]
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("error serving %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); see the server's log")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        html = page.replace("{{NONCE}}", nonce).replace("{{MAX_BYTES}}", str(viewer.max_upload_bytes))
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' blob:; "
               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/info")
    def info() -> dict:
        p = viewer.predictor
        return {"medanomaly_version": __version__, "task": p.task, "threshold": float(viewer.post.threshold),
                "postprocess": viewer.post.to_dict(), "channels": p.channels,
                "max_upload_bytes": viewer.max_upload_bytes, "supported": SUPPORTED}

    @app.post("/api/predict")
    async def predict(request: Request):
        limit = viewer.max_upload_bytes
        too_large = ApiError(413, f"the upload is larger than the {limit / 2**20:g} MB limit of this server "
                                  "(medanomaly serve --max-upload-mb)")
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

        req = Request(request.scope, limited_receive)
        try:
            form = await req.form(max_files=1, max_fields=4)
        except _TooLarge:
            raise too_large from None
        except ClientDisconnect:
            raise ApiError(400, "the upload was interrupted") from None
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

    @app.get("/api/slice/{sid}/{k}")
    def slice_png(sid: str, k: int, threshold: str | None = None) -> Response:
        return Response(viewer.slice_png(sid, k, _threshold_param(threshold)), media_type="image/png")

    @app.get("/api/regions/{sid}")
    def regions(sid: str, threshold: str | None = None) -> dict:
        return viewer.regions(sid, _threshold_param(threshold))

    @app.get("/api/mask/{sid}")
    def mask(sid: str, threshold: str | None = None) -> FileResponse:
        path, name, work = viewer.mask_file(sid, _threshold_param(threshold))
        media = "image/png" if path.suffix == ".png" else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=name,
                            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))

    @app.delete("/api/session/{sid}")
    def forget(sid: str) -> dict:
        return {"deleted": viewer.drop(sid)}

    return app


# ---------------------------------------------------------------------------------------------- server


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket (port 0: any free port); MedanomalyError if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise MedanomalyError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                              "or stop the program using it") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, sock: socket.socket, log_level: str = "warning"):
    """A uvicorn server for ``app`` on ``sock`` (run it with ``server.run(sockets=[sock])``)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def _log_say(text: str, err: bool = False) -> None:
    (log.warning if err else log.info)(text)


def run(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 200,
        device: str = "cpu", quiet: bool = False, say: Callable[..., None] = _log_say) -> None:
    """Serve the viewer until Ctrl+C. A host other than loopback is served with a loud warning.
    ``say(text, err=False)`` shows the start and stop lines (the CLI prints them; default: logging)."""
    if not is_loopback(host):
        say(f"WARNING: serving on {host}: anyone who can reach this machine on port {port} can upload images "
              "to this model and see the results; there is no login and no encryption. Serve on 127.0.0.1 "
              "(the default) unless this network is trusted.", err=True)
    if is_loopback(host) and ":" not in host:  # only loopback names reach it: no DNS rebinding
        allowed = list(dict.fromkeys([*LOOPBACK_NAMES, host]))
    else:  # IPv6 literals (which the host check cannot parse) and other interfaces: any name
        allowed = ["*"]
    sock = bind(host, port)
    try:
        app = create_app(model_dir, max_upload_mb, device, allowed_hosts=allowed)
        server = make_server(app, sock, "warning" if quiet else "info")
        shown = f"[{host}]" if ":" in host else host
        say(f"medanomaly viewer on http://{shown}:{sock.getsockname()[1]}/ (Ctrl+C stops it; uploads are "
              f"deleted after each request, at most {max_upload_mb:g} MB each)")
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown
            say("viewer stopped; uploads and kept files deleted", err=True)
    finally:
        sock.close()

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

Cross-origin writes: a POST, PUT, PATCH or DELETE whose ``Origin`` (or ``Referer`` when there is no
Origin) is not this server's own host:port is answered 403, so a web page elsewhere cannot upload
to or change the server through the user's browser (:func:`medanomaly.apps.handlers.same_origin`).

Memory: analyses share a budget (``--max-memory-mb``, default half the available memory), reserved
from each upload's header-declared size before decoding; over it, 503 "busy: N analyses hold X MB;
retry in a moment" (413 for an image that could never fit) (:class:`medanomaly.apps.viewer.Viewer`).

Privacy: an upload is written to a private (0700) temporary folder, read, and deleted before the
response (the multipart parser's own spool file is anonymous and closed with the request). With
``keep=true`` the upload stays in a private server-side folder until the server stops; a run that
ends without cleaning up (killed, crashed) leaves its folder behind, and the next run removes it at
start-up, with a log line (a run's folder is locked while it runs, so live runs are left alone).
Score maps are kept in memory only, for the last :data:`MAX_SESSIONS` uploads. The server binds 127.0.0.1 by
default and answers only requests addressed to a loopback name there (no DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from medanomaly.apps import handlers as H
from medanomaly.apps.uploads import ApiError
from medanomaly.apps.viewer import MAX_SESSIONS, Viewer
from medanomaly.config.model_file import read_model_file
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


# ---------------------------------------------------------------------------------------------- app


def create_app(model_dir: str | Path, max_upload_mb: float = 200, device: str = "cpu",
               max_sessions: int = MAX_SESSIONS, allowed_hosts: list[str] | None = None,
               work_dir: str | Path | None = None, max_memory_mb: float | None = None) -> FastAPI:
    """The viewer app for the model directory ``model_dir`` (loaded once, here).

    ``allowed_hosts``: Host header names the app answers (default: 127.0.0.1 and localhost, so a
    web page elsewhere cannot reach it through DNS rebinding); ``["*"]`` for any. ``work_dir``:
    where the private temporary folder is made (default: the system's; stale ones of earlier runs
    there are removed). ``max_memory_mb``: the analyses' memory budget (default: half the available
    memory). ``app.state.viewer`` is the :class:`Viewer`. The routes are the endpoints of the module
    docstring; their handlers are in :mod:`medanomaly.apps.handlers`."""
    viewer = Viewer(model_dir, max_upload_mb, device, max_sessions, work_dir, max_memory_mb)
    app = FastAPI(title="medanomaly viewer", version=__version__, lifespan=H.lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None, default_response_class=H.StrictJSON)
    app.state.viewer, app.state.page = viewer, H.page()
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or list(LOOPBACK_NAMES))
    app.middleware("http")(H.same_origin)
    app.middleware("http")(H.security_headers)  # added last: outermost, so the 403s get the headers too
    app.add_exception_handler(ApiError, H.api_error)
    app.add_exception_handler(StarletteHTTPException, H.http_error)
    app.add_exception_handler(RequestValidationError, H.invalid)
    app.add_exception_handler(Exception, H.crashed)
    app.add_api_route("/", H.index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/favicon.ico", H.favicon, methods=["GET"])
    app.add_api_route("/api/info", H.info, methods=["GET"])
    app.add_api_route("/api/predict", H.predict, methods=["POST"])
    app.add_api_route("/api/slice/{sid}/{k}", H.slice_png, methods=["GET"])
    app.add_api_route("/api/regions/{sid}", H.regions, methods=["GET"])
    app.add_api_route("/api/mask/{sid}", H.mask, methods=["GET"])
    app.add_api_route("/api/session/{sid}", H.forget, methods=["DELETE"])
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
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def _log_say(text: str, err: bool = False) -> None:
    (log.warning if err else log.info)(text)


def run(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 200,
        device: str = "cpu", quiet: bool = False, say: Callable[..., None] = _log_say,
        max_memory_mb: float | None = None) -> None:
    """Serve the viewer until Ctrl+C. A host other than loopback is served with a loud warning.
    ``say(text, err=False)`` shows the start and stop lines (the CLI prints them; default: logging).
    ``max_memory_mb``: the analyses' memory budget (default: half the available memory)."""
    read_model_file(model_dir)  # an unfinished or damaged model directory is refused before anything else
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
        app = create_app(model_dir, max_upload_mb, device, allowed_hosts=allowed, max_memory_mb=max_memory_mb)
        server = make_server(app, sock, "warning" if quiet else "info")
        shown = f"[{host}]" if ":" in host else host
        budget = app.state.viewer.memory_budget / 2**20
        say(f"medanomaly viewer on http://{shown}:{sock.getsockname()[1]}/ (Ctrl+C stops it; uploads are "
            f"deleted after each request, at most {max_upload_mb:g} MB each; analyses may hold {budget:,.0f} MB "
            "of memory at once, --max-memory-mb)")
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown
            say("viewer stopped; uploads and kept files deleted", err=True)
    finally:
        sock.close()

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

import io
import ipaddress
import logging
import math
import re
import secrets
import shutil
import socket
import tempfile
import threading
import weakref
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from medanomaly import __version__
from medanomaly.errors import MedanomalyError
from medanomaly.io import Image, mask_suffix, read_image, stem_of, write_mask
from medanomaly.postprocess import apply, region_table
from medanomaly.uploads import (  # noqa: F401 - re-exported for callers of medanomaly.serve
    ApiError,
    MAX_REGIONS_LISTED,
    SUPPORTED,
    ZIP_EXPANSION,
    _HEAD,
    check_type,
    extract_zip,
    find_series,
    sniff,
)

log = logging.getLogger(__name__)

MAX_SESSIONS = 8  #: uploads whose score maps are kept in memory (least recently used are dropped)
MAX_MASKS_PER_SESSION = 6  #: masks cached per session (one per recently used threshold)
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
_ENVELOPE = 64 * 1024  # multipart boundaries, part headers and the small 'keep' field around the file
@dataclass(eq=False)
class Session:
    """One analysed upload: its image, score map and the masks of recently used thresholds."""

    sid: str
    name: str
    image: Image
    score: np.ndarray
    heat_range: tuple[float, float]
    kept: Path | None = None
    masks: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_volume(self) -> bool:
        return self.score.ndim == 3

    @property
    def n_slices(self) -> int:
        return int(self.score.shape[0]) if self.is_volume else 1


def _threshold_key(t: float) -> float:
    return float(f"{float(t):.6g}")


def _display_name(filename: str | None) -> str:
    """A safe display name for an uploaded file: base name only, printable, at most 120 characters."""
    name = re.split(r"[/\\]", filename or "")[-1]
    name = "".join(c for c in name if c.isprintable()).strip() or "upload"
    return name if len(name) <= 120 else name[:60] + "..." + name[-57:]


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem_of(name)).strip("._") or "upload"


class Viewer:
    """The state behind the app: the model, the sessions and the private folders."""

    def __init__(self, model_dir: str | Path, max_upload_mb: float = 200, device: str = "cpu",
                 max_sessions: int = MAX_SESSIONS, work_dir: str | Path | None = None):
        from medanomaly.predict import Predictor

        if not max_upload_mb > 0:
            raise MedanomalyError(f"--max-upload-mb must be positive, got {max_upload_mb}")
        self.predictor = Predictor(model_dir, device)
        self.post = self.predictor.post
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_sessions = max(1, int(max_sessions))
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._predict_lock = threading.Lock()  # one inference at a time: the CPU's cores are shared anyway
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="medanomaly-serve-", dir=work_dir))  # mode 0700
        self.upload_dir = self.root / "uploads"
        self.keep_dir = self.root / "kept"
        self.upload_dir.mkdir(mode=0o700)
        self.keep_dir.mkdir(mode=0o700)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def close(self) -> None:
        """Forget every session and delete the private folders (kept uploads included)."""
        with self._lock:
            self.sessions.clear()
        self._cleanup()

    # -- uploads

    def analyse(self, fileobj: BinaryIO, filename: str | None, keep: bool = False) -> dict:
        """Check, store privately, read and score one upload; returns the session description."""
        name = _display_name(filename)
        head = fileobj.read(_HEAD)
        fileobj.seek(0)
        if not head:
            raise ApiError(422, f"{name} is empty (0 bytes); re-copy or re-export the file")
        suffix = check_type(name, head)
        work = Path(tempfile.mkdtemp(prefix="upload-", dir=self.upload_dir))
        sid = secrets.token_urlsafe(16)
        kept = None
        try:
            target = work / ("upload" + suffix)
            with open(target, "xb") as out:
                shutil.copyfileobj(fileobj, out, 1 << 20)
            try:
                if suffix == ".zip":
                    extracted = extract_zip(target, work / "series", ZIP_EXPANSION * self.max_upload_bytes, label=name)
                    target.unlink()
                    source = find_series(extracted, name)
                else:
                    source = target
                image = read_image(source)
                with self._predict_lock:
                    score = self.predictor.scores(image)
            except MedanomalyError as exc:
                raise ApiError(422, _scrub(str(exc), work, name)) from exc
            if keep:  # moved whole: the kept folder holds the upload (or the extracted series) only
                shutil.move(str(work), str(self.keep_dir / sid))
                kept = self.keep_dir / sid
        finally:
            if kept is None:
                shutil.rmtree(work, ignore_errors=True)
        session = Session(sid, name, image, score, self._heat_range(score), kept)
        with self._lock:
            self.sessions[sid] = session
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        return self.describe(session)

    def _heat_range(self, score: np.ndarray) -> tuple[float, float]:
        if self.predictor.task != "anomaly":
            return 0.0, 1.0  # probabilities
        hi = float(np.quantile(score, 0.999)) if score.size else 1.0
        hi = max(hi, float(self.post.threshold) * 1.5, 1e-6)
        return min(0.0, float(score.min())), hi

    def describe(self, s: Session) -> dict:
        from medanomaly.visualize import best_slice

        lo, hi = float(s.score.min()), float(s.score.max())
        default = self.mask_at(s, self.post.threshold)
        g = s.image.geometry
        return {
            "session": s.sid, "name": s.name, "kind": g.kind, "task": self.predictor.task,
            "shape": list(s.score.shape), "channels": s.image.channels,
            "is_volume": s.is_volume, "n_slices": s.n_slices,
            "default_slice": best_slice(s.score, default) if s.is_volume else 0,
            "threshold": float(self.post.threshold), "score_min": lo, "score_max": hi,
            "spacing": list(g.spacing) if g.spacing_known else None,
            "mask_name": f"{_file_stem(s.name)}_mask{mask_suffix(s.image)}",
            "kept": s.kept is not None,
        }

    # -- sessions

    def get(self, sid: str) -> Session:
        with self._lock:
            s = self.sessions.get(sid)
            if s is None:
                raise ApiError(404, "unknown or expired session (the server keeps the last "
                                    f"{self.max_sessions} uploads); upload the image again")
            self.sessions.move_to_end(sid)
            return s

    def drop(self, sid: str) -> bool:
        with self._lock:
            return self.sessions.pop(sid, None) is not None

    def mask_at(self, s: Session, threshold: float | None) -> np.ndarray:
        """The post-processed mask of the whole image at ``threshold`` (the model's own steps)."""
        t = _threshold_key(self.post.threshold if threshold is None else threshold)
        if not math.isfinite(t):
            raise ApiError(422, f"threshold must be a finite number, got {threshold}")
        with s.lock:
            m = s.masks.get(t)
            if m is None:
                grey = s.image.array.mean(axis=0) if self.post.foreground_only else None
                m = apply(s.score, replace(self.post, threshold=t), image=grey)
                s.masks[t] = m
                while len(s.masks) > MAX_MASKS_PER_SESSION:
                    s.masks.popitem(last=False)
            else:
                s.masks.move_to_end(t)
            return m

    # -- outputs

    def slice_png(self, sid: str, k: int, threshold: float | None) -> bytes:
        from PIL import Image as PILImage

        from medanomaly.visualize import overlay_rgb

        s = self.get(sid)
        if not 0 <= k < s.n_slices:
            raise ApiError(404, f"slice {k} does not exist; the image has {s.n_slices} slice(s), 0..{s.n_slices - 1}")
        mask = self.mask_at(s, threshold)
        img, score = s.image.array, s.score
        if s.is_volume:
            img, score, mask = img[:, k], score[k], mask[k]
        rgb = overlay_rgb(img, score, mask, score_range=s.heat_range)
        buf = io.BytesIO()
        PILImage.fromarray(rgb).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def regions(self, sid: str, threshold: float | None) -> dict:
        s = self.get(sid)
        t = _threshold_key(self.post.threshold if threshold is None else threshold)
        mask = self.mask_at(s, t)
        g = s.image.geometry
        rows = region_table(mask, s.score, g.spacing if g.spacing_known else None)
        return {"threshold": t, "n_regions": len(rows), "total_area_px": int(sum(r["area_px"] for r in rows)),
                "mask_px": int(mask.sum()), "unit": ("mm³" if s.is_volume else "mm²") if g.spacing_known else None,
                "regions": rows[:MAX_REGIONS_LISTED], "truncated": len(rows) > MAX_REGIONS_LISTED}

    def mask_file(self, sid: str, threshold: float | None) -> tuple[Path, str, Path]:
        """(file, download name, private folder to delete after sending) of the mask at ``threshold``."""
        s = self.get(sid)
        mask = self.mask_at(s, threshold)
        work = Path(tempfile.mkdtemp(prefix="mask-", dir=self.upload_dir))
        try:
            path = write_mask(mask, s.image, work / _file_stem(s.name))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return path, f"{_file_stem(s.name)}_mask{mask_suffix(s.image)}", work


def _scrub(message: str, work: Path, name: str) -> str:
    """A reader's error message about a private temporary file, naming the upload instead."""
    for folder in {str(work.resolve()), str(work)}:
        message = re.sub(re.escape(folder) + r"[^\s,;:()'\"]*", lambda _: name, message)
    return message


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

"""The state behind ``medanomaly serve``: the model, the analysed uploads (sessions) and the
server's private folders. :class:`Viewer` checks, stores, reads and scores an upload, keeps its
score map for the last :data:`MAX_SESSIONS` uploads, and renders slices, region lists and mask
files at any threshold with the model's own post-processing. :mod:`medanomaly.apps.serve` puts HTTP
endpoints around it.

Memory: analyses and stored sessions share a budget (``max_memory_mb``; default: half the memory
available at start-up). Each analysis reserves, before any pixel is decoded, what the size its
upload's header declares will need (:data:`BYTES_PER_VALUE` per value); least recently used sessions
are dropped to make room, and when the analyses running already hold too much the upload is
answered 503 "busy" (413 when it could never fit), never with a MemoryError."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image as PILImage

from medanomaly.apps.uploads import (
    _HEAD,
    MAX_REGIONS_LISTED,
    ZIP_EXPANSION,
    ApiError,
    check_type,
    declared_shape,
    extract_zip,
    find_series,
    make_private_root,
    remove_stale_roots,
)
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.overlay import best_slice, overlay_rgb
from medanomaly.infer.predictor import Predictor
from medanomaly.io import Image, mask_suffix, read_image, stem_of, write_mask
from medanomaly.postprocess.ops import apply, region_table

MAX_SESSIONS = 8  #: uploads whose score maps are kept in memory (least recently used are dropped)
MAX_MASKS_PER_SESSION = 6  #: masks cached per session (one per recently used threshold)
#: peak bytes an analysis needs per decoded value: 20 measured (ru_maxrss, a 3000x3000 grey PNG, a 2D
#: model: the decoded image, its float32 copy and normalisation, the score map and its resizing), plus margin
BYTES_PER_VALUE = 24
_MB = 2**20

# the server's log keeps one name, whichever of its modules writes (users filter on it)
log = logging.getLogger("medanomaly.apps.serve")


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


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by the cgroup (v2) limit less
    its usage; 4 GiB where neither can be read (not Linux)."""
    try:
        avail = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                     if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 4 * 2**30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            avail = min(avail, max(0, int(limit) - int(used)))
    except OSError:
        pass
    return avail


def memory_budget(max_memory_mb: float | None) -> int:
    """The analyses' memory budget in bytes: ``max_memory_mb`` MB, or half the available memory
    (the model, the server and the rest of the machine need the other half)."""
    if max_memory_mb is None:
        return max(available_memory() // 2, 64 * _MB)
    if not (isinstance(max_memory_mb, (int, float)) and math.isfinite(max_memory_mb) and max_memory_mb > 0):
        raise MedanomalyError(f"--max-memory-mb must be a positive number of MB, got {max_memory_mb}")
    return int(max_memory_mb * _MB)


def _session_bytes(s: Session) -> int:
    """What a stored session holds: image, score map and its mask cache at its fullest."""
    return s.image.array.nbytes + s.score.nbytes + MAX_MASKS_PER_SESSION * s.score.size


def _remove_root(root: str, lock_fd: int | None) -> None:
    shutil.rmtree(root, ignore_errors=True)
    if lock_fd is not None:
        os.close(lock_fd)  # the run's lock goes with its folder


class Viewer:
    """The state behind the app: the model, the sessions and the private folders."""

    def __init__(self, model_dir: str | Path, max_upload_mb: float = 200, device: str = "cpu",
                 max_sessions: int = MAX_SESSIONS, work_dir: str | Path | None = None,
                 max_memory_mb: float | None = None):
        if not max_upload_mb > 0:
            raise MedanomalyError(f"--max-upload-mb must be positive, got {max_upload_mb}")
        self.memory_budget = memory_budget(max_memory_mb)  #: bytes analyses and sessions may hold
        self.predictor = Predictor(model_dir, device)
        self.post = self.predictor.post
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_sessions = max(1, int(max_sessions))
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self._running: dict[str, int] = {}  # the analyses under way: their reserved bytes
        self._lock = threading.Lock()
        self._predict_lock = threading.Lock()  # one inference at a time: the CPU's cores are shared anyway
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        stale = remove_stale_roots(Path(work_dir) if work_dir is not None else None)
        if stale:
            log.info("removed %d folder(s) that earlier serve runs left behind when they stopped without cleaning up "
                     "(kept uploads included): %s", len(stale), ", ".join(map(str, stale)))
        self.root, lock_fd = make_private_root(Path(work_dir) if work_dir is not None else None)  # mode 0700
        self.upload_dir = self.root / "uploads"
        self.keep_dir = self.root / "kept"
        self.upload_dir.mkdir(mode=0o700)
        self.keep_dir.mkdir(mode=0o700)
        self._cleanup = weakref.finalize(self, _remove_root, str(self.root), lock_fd)

    def close(self) -> None:
        """Forget every session and delete the private folders (kept uploads included)."""
        with self._lock:
            self.sessions.clear()
        self._cleanup()

    # -- uploads

    def analyse(self, fileobj: BinaryIO, filename: str | None, keep: bool = False) -> dict:
        """Check, store privately, reserve memory for, read and score one upload; returns the
        session description. ApiError 413/503 when the memory budget cannot hold it (see module)."""
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
            source = self._store(fileobj, work, suffix, name)
            with self._reserved(source, name):
                image, score = self._read_and_score(source, work, name)
                if keep:  # moved whole: the kept folder holds the upload (or the extracted series) only
                    shutil.move(str(work), str(self.keep_dir / sid))
                    kept = self.keep_dir / sid
                session = Session(sid, name, image, score, self._heat_range(score), kept)
                with self._lock:
                    self.sessions[sid] = session
                    while len(self.sessions) > self.max_sessions:
                        self.sessions.popitem(last=False)
        finally:
            if kept is None:
                shutil.rmtree(work, ignore_errors=True)
        return self.describe(session)

    def _store(self, fileobj: BinaryIO, work: Path, suffix: str, name: str) -> Path:
        """The upload written into ``work``; a zip extracted there: the file or series folder to read."""
        target = work / ("upload" + suffix)
        with open(target, "xb") as out:
            shutil.copyfileobj(fileobj, out, 1 << 20)
        if suffix != ".zip":
            return target
        try:
            extracted = extract_zip(target, work / "series", ZIP_EXPANSION * self.max_upload_bytes, label=name)
            target.unlink()
            return find_series(extracted, name)
        except MedanomalyError as exc:
            raise ApiError(422, _scrub(str(exc), work, name)) from exc

    def _read_and_score(self, source: Path, work: Path, name: str) -> tuple[Image, np.ndarray]:
        try:
            image = read_image(source)
            with self._predict_lock:
                return image, self.predictor.scores(image)
        except MedanomalyError as exc:
            raise ApiError(422, _scrub(str(exc), work, name)) from exc
        except MemoryError:  # the budget is an estimate: the machine's other programs grew meanwhile
            raise ApiError(503, f"not enough memory to analyse {name} now; retry in a moment (or start the "
                                "server with a smaller --max-memory-mb)", {"Retry-After": "10"}) from None

    # -- memory

    @contextmanager
    def _reserved(self, source: Path, name: str) -> Iterator[None]:
        """Hold the memory that analysing ``source`` needs, from its header-declared size, while
        the block runs; stored sessions (least recently used first) are dropped to make room."""
        shape = declared_shape(source)
        values = math.prod(shape) if shape else _disk_bytes(source)  # unparsable header: the reader refuses it
        need, budget = values * BYTES_PER_VALUE, self.memory_budget
        size = f"declares {'x'.join(map(str, shape))} = {values:,} values" if shape else f"holds {values:,} bytes"
        if need > budget:
            raise ApiError(413, f"{name} {size}, about {need / _MB:,.0f} MB to analyse, more than this server's "
                                f"memory budget of {budget / _MB:,.0f} MB; crop or downsample the image, or start "
                                "the server with a larger --max-memory-mb")
        key = secrets.token_hex(8)
        with self._lock:
            running = sum(self._running.values())
            if running + need > budget:
                raise ApiError(503, f"busy: {len(self._running)} analyses hold {running / _MB:,.0f} MB; retry in a "
                                    f"moment ({name} needs about {need / _MB:,.0f} MB of this server's "
                                    f"{budget / _MB:,.0f} MB memory budget, --max-memory-mb)", {"Retry-After": "5"})
            while self.sessions and running + need + sum(map(_session_bytes, self.sessions.values())) > budget:
                self.sessions.popitem(last=False)
            self._running[key] = need
        try:
            yield
        finally:
            with self._lock:
                del self._running[key]

    def _heat_range(self, score: np.ndarray) -> tuple[float, float]:
        if self.predictor.task != "anomaly":
            return 0.0, 1.0  # probabilities
        hi = float(np.quantile(score, 0.999)) if score.size else 1.0
        hi = max(hi, float(self.post.threshold) * 1.5, 1e-6)
        return min(0.0, float(score.min())), hi

    def describe(self, s: Session) -> dict:
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


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _scrub(message: str, work: Path, name: str) -> str:
    """A reader's error message about a private temporary file, naming the upload instead."""
    for folder in {str(work.resolve()), str(work)}:
        message = re.sub(re.escape(folder) + r"[^\s,;:()'\"]*", lambda _: name, message)
    return message

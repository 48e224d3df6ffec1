"""What a run shows while it runs: progress, log configuration, and the run's own log file.

:func:`track` is the one way code in ``src/`` shows progress: a tqdm bar when stderr is a
terminal, otherwise (stderr to a file, a pipe, a CI log) a few plain INFO lines per loop, each
with n/total, share done and rate: one when another tenth is done (at least :data:`MIN_GAP_S`
after the last line) or :data:`EVERY_S` after the last line, and one at the end of a loop that
showed any. A bar's redraws written to a file were one "line" each (a whole LGG epoch: 936 lines,
458 of them ``loading:``); loops shorter than :data:`MIN_GAP_S` now write nothing.

:func:`console_logging` is what the CLI sets up for a command: medanomaly's records at INFO
(DEBUG with ``verbose``) while the console shows warnings only when ``quiet``; third-party
libraries (:data:`QUIET_LIBRARIES`) stay at WARNING whatever the verbosity, since their
INFO/DEBUG lines quote header values (highdicom names SOP Instance UIDs). :func:`run_log`
(and the decorator :func:`run_logged`) copies a run's records at INFO and above into ``train.log``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

log = logging.getLogger("medanomaly.progress")
F = TypeVar("F", bound=Callable[..., Any])

#: seconds between two progress lines at most (when not a terminal)
EVERY_S = 30.0
#: seconds between two progress lines at least, and the shortest loop that logs any
MIN_GAP_S = 5.0
#: loggers of the libraries we call, kept at WARNING: their INFO/DEBUG lines may quote identifiers
QUIET_LIBRARIES = ("highdicom", "pydicom", "nibabel", "SimpleITK", "tifffile", "PIL", "matplotlib", "fontTools",
                   "urllib3", "httpx", "httpcore", "asyncio", "multipart", "python_multipart", "onnxruntime",
                   "onnx", "torch", "fsspec", "filelock", "h5py")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
#: records held for train.log until the model directory is started (loading a large set logs few)
MAX_HELD = 10_000


class LogBar:
    """The non-terminal stand-in of a tqdm bar: the same calls (iteration, ``update``,
    ``set_postfix``, ``close``), a few INFO lines instead of redraws."""

    def __init__(self, iterable: Iterable | None, desc: str, unit: str, total: int | None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.n, self.postfix, self.shown = 0, "", 0
        self.t0 = self.last = time.monotonic()
        self.decile, self.closed = 0, False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        decile = int(10 * self.n / self.total) if self.total else 0
        if now - self.last >= EVERY_S or (decile > self.decile and now - self.last >= MIN_GAP_S):
            self._line(now)
        self.decile = max(self.decile, decile)

    def close(self) -> None:
        if self.shown and not self.closed:  # a loop that showed lines says when it ended
            self._line(time.monotonic(), done=True)
        self.closed = True

    def _line(self, now: float, done: bool = False) -> None:
        took = max(now - self.t0, 1e-9)
        of = f"/{self.total} ({100 * self.n / self.total:.0f} %)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s%d%s %s, %.3g %s/s, %.0f s%s", self.desc, "done " if done else "", self.n, of, self.unit,
                 self.n / took, self.unit, took, extra)
        self.last, self.shown = now, self.shown + 1


def track(iterable: Iterable | None = None, desc: str = "", unit: str = "it", total: int | None = None,
             enabled: bool = True, leave: bool = True) -> Any:
    """Progress over ``iterable`` (or, without one, over ``update(n)`` calls up to ``total``): a
    tqdm bar when ``enabled`` and stderr is a terminal, periodic INFO lines (:class:`LogBar`)
    when ``enabled`` otherwise, nothing shown when not ``enabled``. Iterate over the result as
    over ``iterable``; ``set_postfix``/``update``/``close`` work on all three."""
    if enabled and _terminal(sys.stderr):
        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave)
    if enabled:
        return LogBar(iterable, desc, unit, total)
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=True)


def _terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


@contextmanager
def console_logging(quiet: bool = False, verbose: bool = False, rank: int = 0) -> Iterator[None]:
    """Within the block, log records to stderr: medanomaly's from INFO (``verbose``: DEBUG), the
    console showing warnings only when ``quiet`` (train.log, :func:`run_log`, still gets the INFO
    lines); the libraries of :data:`QUIET_LIBRARIES` at WARNING whatever the verbosity. Under
    torchrun (``rank`` > 0) lines start with the rank. As :func:`logging.basicConfig`, no console
    handler is added where the root logger has handlers already (an application's, pytest's);
    every level set here is restored at the end."""
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{f'[rank {rank}] ' if rank else ''}{FORMAT}", DATEFMT))
        handler.setLevel(logging.WARNING if quiet else logging.NOTSET)
        root.addHandler(handler)
    levels = {name: logging.getLogger(name or None).level for name in ("", "medanomaly", *QUIET_LIBRARIES)}
    root.setLevel(logging.WARNING if quiet else logging.INFO)  # the other libraries: as the console shows
    logging.getLogger("medanomaly").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LIBRARIES:
        if levels[name] < logging.WARNING:  # NOTSET (inherit) or chattier: raised; stricter ones kept
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name or None).setLevel(level)
        if handler is not None:
            root.removeHandler(handler)


def _stamp(path: Path | None) -> tuple[int, int] | None:
    """(inode, mtime in ns) of ``path``, None where it does not exist: an atomic rewrite changes both."""
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_mtime_ns)


class _HeldFileHandler(logging.Handler):
    """Appends records to a file once ``started`` has been written (created or replaced) since the
    handler was made; holds them in memory until then, so a run refused before it writes anything
    leaves the model directory (and an earlier run's train.log) as it was."""

    def __init__(self, path: Path, started: Path | None) -> None:
        super().__init__(logging.INFO)
        self.path, self.started, self.before = path, started, _stamp(started)
        self.held: list[logging.LogRecord] = []
        self.stream: TextIO | None = None
        self.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))

    def open_if_started(self) -> bool:
        if self.stream is None and (self.started is None or _stamp(self.started) not in (None, self.before)):
            self.stream = self.path.open("a", encoding="utf-8")
            self.stream.writelines(self.format(held) + "\n" for held in self.held)
            self.held = []
        return self.stream is not None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.open_if_started():
                self.stream.write(self.format(record) + "\n")  # type: ignore[union-attr]
                self.stream.flush()  # type: ignore[union-attr]
            elif len(self.held) < MAX_HELD:
                self.held.append(record)
        except Exception:  # noqa: BLE001 - a log file that cannot be written must not stop the run
            self.handleError(record)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


@contextmanager
def run_log(path: str | Path, enabled: bool = True, started: str | Path | None = None) -> Iterator[None]:
    """Within the block, append every record at INFO and above (of the loggers whose level lets
    it through: the CLI lets medanomaly's INFO through, the libraries' WARNING) to ``path``, in
    the console's format with the date. With ``started``, the file is written only once that file
    has been written within the block (records before are held until then, and dropped if it
    never is); it exists at the end of a block that wrote ``started``. Nothing when not ``enabled`` (under torchrun: the processes other than rank 0)."""
    if not enabled:
        yield
        return
    handler = _HeldFileHandler(Path(path), None if started is None else Path(started))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        try:
            handler.open_if_started()  # a started run has its train.log, even if nothing was logged
        except OSError as exc:
            log.warning("%s not written: %s", path, exc)
        handler.close()


def run_logged(out_arg: str = "out", name: str = "train.log", started: str = "config.json",
               enabled: Callable[[], bool] = lambda: True) -> Callable[[F], F]:
    """Decorate a run function so that its log goes to ``OUT/name`` (:func:`run_log`), ``OUT``
    being its argument ``out_arg``; the file starts once the run writes ``OUT/started``, and is
    appended to (a resumed run adds to its log). ``enabled`` is asked at each call (rank 0)."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = Path(signature.bind(*args, **kwargs).arguments[out_arg])
            with run_log(out / name, enabled(), out / started):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate

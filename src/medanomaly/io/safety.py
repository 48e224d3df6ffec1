"""Safety nets around the reading libraries: the size limit checked from headers (MAX_PIXELS and the
available memory), the capture of their warnings, log records and C++ stderr output, and the
conversion of their errors."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from medanomaly.core.errors import MedanomalyError

#: Largest image accepted, in values (voxels x channels), checked from the file header before decoding.
#: Read at call time, so it can be raised: ``medanomaly.io.safety.MAX_PIXELS = ...``. The limit
#: applied is the smaller of this and what the available memory allows (:func:`pixel_limit`).
MAX_PIXELS = 2**28

#: Float32 copies of an image that reading and predicting it hold at their peak: measured, predict
#: on a 3000 x 3000 grey PNG peaked 1.36 GB above the interpreter and model, ~150 bytes per pixel
#: (the issue's 10000 x 10000 PNG: 13 GB, ~130). 40 copies of 4 bytes = 160 bytes per value.
SAFETY_FACTOR = 40

_MEMINFO = Path("/proc/meminfo")
#: (limit, usage, statistics) files of cgroup v2, then v1: a container's memory limit, which
#: MemAvailable ignores
_CGROUP_FILES = ((Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"),
                  Path("/sys/fs/cgroup/memory.stat")),
                 (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
                  Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"), Path("/sys/fs/cgroup/memory/memory.stat")))


def _max_pixels() -> int:
    return MAX_PIXELS


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, "max" (no limit), unreadable
        return None


def available_memory() -> int | None:
    """Bytes this process can still use: the smaller of the kernel's MemAvailable and the room left
    under its cgroup's memory limit (a container's), or None where neither can be read (not Linux)."""
    found = []
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file, stat_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes ~2**63 for "no limit"
            found.append(max(limit - usage + _inactive_file(stat_file), 0))
            break
    return min(found) if found else None


def _inactive_file(stat_file: Path) -> int:
    """Bytes of inactive page cache in a cgroup's memory.stat: counted in its usage, but reclaimed
    before the limit bites (the "working set" of container runtimes leaves it out too)."""
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):  # cgroup v2, v1
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def pixel_limit() -> tuple[int, int | None]:
    """(the largest image accepted now, in values; the available memory in bytes, or None).

    The limit is the smaller of :data:`MAX_PIXELS` and the available memory divided by
    :data:`SAFETY_FACTOR` float32 copies (4 bytes each)."""
    memory = available_memory()
    by_memory = memory // (4 * SAFETY_FACTOR) if memory is not None else None
    return (min(_max_pixels(), by_memory) if by_memory is not None else _max_pixels()), memory


def _check_size(path: Path, shape: Any, what: str = "image") -> None:
    """Refuse an image of ``shape`` (sizes of every axis, channels included) above :func:`pixel_limit`,
    or with a negative or zero size, before its pixels are decoded."""
    dims = [int(s) for s in shape]
    size = "x".join(map(str, dims))
    if any(d <= 0 for d in dims):
        raise MedanomalyError(f"{path}: the header gives the {what} size {size}, "
                              "with an empty axis; the file is damaged or holds no pixels: re-export it")
    n = 1
    for d in dims:
        n *= d  # Python ints: no overflow on crafted headers
    limit, memory = pixel_limit()
    if n <= limit:
        return
    fix = "crop or downsample the image first (if it is wrong, the file is damaged: re-export it)"
    if limit == _max_pixels():
        raise MedanomalyError(f"{path}: the header gives the {what} size {size} = {n:,} values, above the limit "
                              f"of {limit:,} (medanomaly.io.safety.MAX_PIXELS); if the header is right, {fix}")
    raise MedanomalyError(
        f"{path}: the header gives the {what} size {size} = {n:,} values, above the limit of {limit:,} values "
        f"that the available memory allows ({memory / 2**30:.1f} GiB / {4 * SAFETY_FACTOR} bytes per value "
        f"read; medanomaly.io.safety.MAX_PIXELS = {_max_pixels():,} caps it); if the header is right, free "
        f"memory, use a machine with more, or {fix}")


@contextmanager
def _capture_fd2(notes: list[str]) -> Iterator[None]:
    """Collect into ``notes`` what C++ code (ITK's MetaIO, NRRD readers) prints straight on file
    descriptor 2 while reading, instead of letting loose lines reach the terminal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(4096).decode("utf-8", "replace").strip()
            if text:
                notes.append(" ".join(text.split()))


def _itk_reason(exc: Exception, notes: list[str]) -> str:
    """The useful part of a SimpleITK exception ('ITK ERROR: Class(0x..): what'), with what the
    C++ reader printed, on one line (ITK's 'Reason: <errno>' is stale and misleading: dropped)."""
    text = str(exc)
    text = text.split("ITK ERROR:", 1)[1] if "ITK ERROR:" in text else text
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = re.sub(r"\s*Reason:.*$", "", text, flags=re.S)
    return "; ".join([" ".join(text.split())] + notes)


def _permission_error(p: Path, exc: PermissionError) -> MedanomalyError:
    where = exc.filename or p
    return MedanomalyError(f"permission denied: {where}; make it readable for this user "
                           "(chmod u+r, or u+rx for a folder) or copy it somewhere readable")


#: loggers of the reading libraries whose records are collected while a file is read
_LIBRARY_LOGGERS = ("pydicom", "tifffile", "nibabel", "nibabel.global")


class _Collect(logging.Filter):
    def __init__(self, notes: list[str]) -> None:
        super().__init__()
        self.notes = notes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.notes.append(" ".join(record.getMessage().split()))
        return False


@contextmanager
def library_notes(notes: list[str]) -> Iterator[None]:
    """Collect the Python warnings and the log records of the reading libraries (pydicom both
    warns and logs each complaint) into ``notes``, so that :func:`read_image` reports each once,
    on one line naming the file (or not at all when the read fails with its own error)."""
    collect = _Collect(notes)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    for lg in loggers:
        lg.addFilter(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(collect)
        notes.extend(" ".join(str(w.message).split()) for w in caught)


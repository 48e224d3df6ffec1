"""Safety nets around the reading libraries: the size limit checked from headers, the capture
of their warnings, log records and C++ stderr output, and the conversion of their errors."""

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
#: Read at call time, so it can be raised: ``medanomaly.io.safety.MAX_PIXELS = ...``.
MAX_PIXELS = 2**28


def _max_pixels() -> int:
    return MAX_PIXELS


def _check_size(path: Path, shape: Any, what: str = "image") -> None:
    """Refuse an image of ``shape`` (sizes of every axis, channels included) above MAX_PIXELS,
    or with a negative or zero size, before its pixels are decoded."""
    dims = [int(s) for s in shape]
    if any(d <= 0 for d in dims):
        raise MedanomalyError(f"{path}: the header gives the {what} size {'x'.join(map(str, dims))}, "
                              "with an empty axis; the file is damaged or holds no pixels: re-export it")
    n = 1
    for d in dims:
        n *= d  # Python ints: no overflow on crafted headers
    limit = _max_pixels()
    if n > limit:
        raise MedanomalyError(
            f"{path}: the header gives the {what} size {'x'.join(map(str, dims))} = {n:,} values, above "
            f"the limit of {limit:,} (medanomaly.io.safety.MAX_PIXELS); if the header is right, crop or "
            "downsample the image first (if it is wrong, the file is damaged: re-export it)")


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


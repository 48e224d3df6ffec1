"""Tests for medanomaly.io.safety: the size limit checked from a header's sizes, the capture of the
reading libraries' warnings, log records and C-level stderr output, and the conversion of their
errors into one-line messages. (The limit applied to real crafted files: tests/io/test_bad_images.py.)"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import safety
from medanomaly.io.safety import _capture_fd2, _check_size, _itk_reason, _permission_error, library_notes

P = Path("scan.png")


def test_size_check_counts_every_axis_and_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safety, "MAX_PIXELS", 24)  # read at call time
    _check_size(P, (2, 3, 4))  # 24 values: at the limit, accepted
    with pytest.raises(MedanomalyError, match=r"scan\.png: the header gives the image size 5x5 = 25 values, above "
                                              r"the limit of 24 \(medanomaly\.io\.safety\.MAX_PIXELS\)"):
        _check_size(P, (5, 5))
    with pytest.raises(MedanomalyError, match="DICOM series size 1x5x5"):
        _check_size(P, (1, 5, 5), "DICOM series")


def test_empty_or_negative_axes_are_refused() -> None:
    for shape in ((0, 5), (3, -1), (4, 4, 0)):
        with pytest.raises(MedanomalyError, match="with an empty axis"):
            _check_size(P, shape)


def test_huge_header_sizes_do_not_overflow() -> None:
    with pytest.raises(MedanomalyError, match="= 1,000,000,000,000,000,000,000,000,000,000 values"):
        _check_size(P, (10**10, 10**10, 10**10))  # 10^30: far above any int64


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4), limit=st.integers(1, 5000))
def test_property_accepted_exactly_when_the_product_is_within_the_limit(shape: list[int], limit: int) -> None:
    saved = safety.MAX_PIXELS
    safety.MAX_PIXELS = limit
    try:
        try:
            _check_size(P, shape)
            accepted = True
        except MedanomalyError:
            accepted = False
    finally:
        safety.MAX_PIXELS = saved
    assert accepted == (math.prod(shape) <= limit)


def test_library_notes_collect_warnings_and_library_log_records_once_each() -> None:
    notes: list[str] = []
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addHandler(handler)
    try:
        with library_notes(notes):
            warnings.warn("odd   header\nvalue", UserWarning)
            pydicom_log.warning("invalid VR")
            pydicom_log.info("just a note")  # below WARNING: not collected
            logging.getLogger("unrelated").warning("not a reading library")
        pydicom_log.warning("after the block")
    finally:
        pydicom_log.removeHandler(handler)
    assert notes == ["invalid VR", "odd header value"]  # log records as they come, warnings at the end
    assert records == ["after the block"]  # kept from the library's handlers inside the block only


def test_output_of_c_code_on_fd_2_is_captured() -> None:
    notes: list[str] = []
    with _capture_fd2(notes):
        os.write(2, b"MetaImage: cannot\n   read  this\n")
    assert notes == ["MetaImage: cannot read this"]
    with _capture_fd2(notes):
        pass
    assert len(notes) == 1  # nothing printed: nothing added


def test_itk_reason_keeps_the_useful_part() -> None:
    exc = RuntimeError("Exception thrown in SimpleITK ImageFileReader_Execute: /src/itk.cxx:97:\n"
                       "ITK ERROR: MetaImageIO(0x55d0c0ffee): File cannot be read: x.mha\nReason: Success")
    assert _itk_reason(exc, ["MetaImage: bad DimSize"]) == "File cannot be read: x.mha; MetaImage: bad DimSize"
    assert _itk_reason(RuntimeError("plain  message"), []) == "plain message"


def test_permission_error_names_the_file_and_the_fix() -> None:
    err = _permission_error(P, PermissionError(13, "Permission denied", "/data/secret.png"))
    assert isinstance(err, MedanomalyError)
    assert str(err).startswith("permission denied: /data/secret.png;") and "chmod u+r" in str(err)
    assert str(_permission_error(P, PermissionError("denied"))).startswith("permission denied: scan.png;")

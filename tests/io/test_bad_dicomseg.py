"""Bad DICOM SEG inputs: source series whose headers hold values a DICOM SEG cannot copy as they are,
and files that are no DICOM SEG. The real axial series of ../shared/data is copied to tmp_path and
modified with pydicom; the values planted carry a marker ("MARKER") that must appear in no message,
no log line and no output, as patient identifiers would.

Invalid Type 2 values (PatientBirthDate, PatientSex, StudyDate, StudyTime, PatientID,
AccessionNumber) are written empty, as the standard allows; invalid Type 1 references are copied as
the source has them (never logged); missing ones, and values highdicom refuses, are refused with a
message naming the attribute (its keyword), never its value. Refusals are
checked as the ``cli.refuses`` fixture checks commands: a MedanomalyError matching the expected
text, no traceback or value in it, and no file changed, created or deleted in the source series or
the output folder. (``predict`` reports a failed DICOM SEG as a failed file, exit 1, not 2, so no
``cli.refuses``: the predict-level tests check the exit code, stderr, the logs and the outputs.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("highdicom")

from medanomaly.core.errors import MedanomalyError  # noqa: E402
from medanomaly.io.dicomseg import read_dicom_seg, write_dicom_seg  # noqa: E402

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
AXIAL = DATA / "dicom-series" / "mr-gre-fieldmap-axial"  # 36 slices 64x64
pytestmark = pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial")
MARK = "MARKER"


def series_with(dst: Path, **values: str | None) -> Path:
    """The axial series copied to ``dst`` with ``values`` set as they are (None: deleted)."""
    dst.mkdir(parents=True)
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE  # set them silently
    try:
        for f in sorted(AXIAL.iterdir()):
            ds = pydicom.dcmread(f)
            for keyword, value in values.items():
                if value is None:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            ds.save_as(dst / f.name)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    return dst


def digest(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for root in roots if root.exists() for p in sorted(root.rglob("*"))}


def refuses(call: Callable[[], object], says: str, untouched: tuple[Path, ...], caplog) -> str:
    """``call()`` raises a MedanomalyError matching ``says``, quoting no marked value (nor logging
    one) and changing nothing below ``untouched``; returns the message."""
    before = digest(*untouched)
    with caplog.at_level(logging.DEBUG), pytest.raises(MedanomalyError) as exc:
        call()
    message = str(exc.value)
    assert re.search(says, message), message
    assert MARK not in message.upper() and "Traceback" not in message, message
    assert MARK not in caplog.text.upper(), caplog.text
    assert digest(*untouched) == before, f"files changed below {untouched}"
    return message


def mask() -> np.ndarray:
    m = np.zeros((36, 64, 64), bool)
    m[10:20, 20:40, 20:40] = True
    return m


def written_empty(tmp_path: Path, caplog, **values: str) -> pydicom.Dataset:
    """Write a SEG for a series with ``values`` planted: it is written, round-trips, and holds each
    of those attributes empty; no marker in the SEG's bytes or the log (which names the keywords)."""
    series = series_with(tmp_path / "series", **values)
    with caplog.at_level(logging.DEBUG):
        path = write_dicom_seg(mask(), series, tmp_path / "out" / "seg.dcm", version="1")
    np.testing.assert_array_equal(read_dicom_seg(path, series), mask())
    seg = pydicom.dcmread(path)
    for keyword in values:
        assert keyword in seg and seg[keyword].value in ("", None), keyword  # Type 2: present, empty
        assert keyword in caplog.text  # said by keyword...
    assert MARK not in caplog.text.upper() and MARK.encode() not in path.read_bytes().upper()  # ...never by value
    return seg


# --- invalid Type 2 values: written empty --------------------------------------------------------

def test_bad_birth_date_is_written_empty(tmp_path, caplog):
    seg = written_empty(tmp_path, caplog, PatientBirthDate=f"{MARK}1990")
    assert seg.PatientName == pydicom.dcmread(sorted(AXIAL.iterdir())[0], stop_before_pixels=True).PatientName


def test_bad_calendar_birth_date_is_written_empty(tmp_path, caplog):
    """Eight digits, as DA wants, but no date (month 13): highdicom's parse would fail."""
    series = series_with(tmp_path / "series", PatientBirthDate="19901345")
    with caplog.at_level(logging.DEBUG):
        path = write_dicom_seg(mask(), series, tmp_path / "out" / "seg.dcm", version="1")
    assert pydicom.dcmread(path).PatientBirthDate == "" and "19901345" not in caplog.text
    assert b"19901345" not in path.read_bytes()


def test_bad_patient_sex_is_written_empty(tmp_path, caplog):
    written_empty(tmp_path, caplog, PatientSex=f"{MARK}X")


def test_bad_study_date_and_time_are_written_empty(tmp_path, caplog):
    written_empty(tmp_path, caplog, StudyDate=f"{MARK}0101", StudyTime=f"{MARK}99")


def test_bad_too_long_ids_are_written_empty(tmp_path, caplog):
    written_empty(tmp_path, caplog, PatientID=MARK * 12, AccessionNumber=f"{MARK}-ACCESSION-NUMBER")  # > LO 64, SH 16


# --- Type 1 references: refused by keyword -------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # (this test's own read of the SEG)
def test_bad_study_uid_is_copied_and_never_logged(tmp_path, caplog):
    """An invalid Type 1 UID cannot be emptied: it is the source's own reference, copied as it is
    (as before), and no log line quotes it."""
    series = series_with(tmp_path / "series", StudyInstanceUID=f"1.2.{MARK}.3")
    with caplog.at_level(logging.DEBUG):
        path = write_dicom_seg(mask(), series, tmp_path / "out" / "seg.dcm", version="1")
    logged = caplog.text
    assert "reported 1 problem(s) with header values (not shown" in logged and MARK not in logged.upper()
    assert pydicom.dcmread(path).StudyInstanceUID == f"1.2.{MARK}.3"


def test_bad_missing_frame_of_reference_is_refused(tmp_path, caplog):
    series = series_with(tmp_path / "series", FrameOfReferenceUID=None)
    refuses(lambda: write_dicom_seg(mask(), series, tmp_path / "out" / "seg.dcm", version="1"),
            r"lacks FrameOfReferenceUID, which a DICOM SEG needs", (series, tmp_path / "out"), caplog)


def test_bad_sop_class_is_refused_without_the_library_text(tmp_path, caplog):
    """highdicom's own error (a KeyError quoting the value): only the keyword is named."""
    series = series_with(tmp_path / "series", SOPClassUID="1.2.3.4.5.6.7")
    message = refuses(lambda: write_dicom_seg(mask(), series, tmp_path / "out" / "seg.dcm", version="1"),
                      r"refused the value of SOPClassUID \(KeyError\) \(the library's message is not shown",
                      (series, tmp_path / "out"), caplog)
    assert "1.2.3.4.5.6.7" not in message


def test_bad_slice_that_is_no_dicom_file_is_named(tmp_path, caplog):
    series = series_with(tmp_path / "series", PatientName=f"{MARK}^NAME")
    (series / "00005.dcm").write_bytes(b"not a DICOM file\n" * 40)
    refuses(lambda: write_dicom_seg(mask(), series, tmp_path / "out" / "seg.dcm", version="1"),
            r"cannot read the DICOM series .*: 00005\.dcm is not readable \(InvalidDicomError",
            (series, tmp_path / "out"), caplog)


def test_bad_truncated_slice_is_named(tmp_path, caplog):
    """pydicom reads a header cut short without a word: the slice lacks its position, said by name."""
    series = series_with(tmp_path / "series", PatientName=f"{MARK}^NAME")
    (series / "00005.dcm").write_bytes((series / "00005.dcm").read_bytes()[:400])  # cut inside the header
    refuses(lambda: write_dicom_seg(mask(), series, tmp_path / "out" / "seg.dcm", version="1"),
            r"00005\.dcm lacks ImagePositionPatient", (series, tmp_path / "out"), caplog)


def test_bad_seg_file_that_is_an_image(tmp_path, caplog):
    """read_dicom_seg given a DICOM image, not a SEG: refused without highdicom's text."""
    series = series_with(tmp_path / "series", PatientName=f"{MARK}^NAME", PatientID=f"{MARK}ID")
    refuses(lambda: read_dicom_seg(series / "00001.dcm", series), r"cannot read DICOM SEG .*00001\.dcm: ",
            (series,), caplog)


# --- through predict -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory, make_model_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "model")


def test_bad_birth_date_through_predict(tmp_path, model, cli, caplog):
    """The issue's case: predict writes the SEG (birth date empty), exit 0; the value is nowhere."""
    series = series_with(tmp_path / "in" / "series", PatientBirthDate=f"{MARK}19901345")
    before = cli.digest(series)
    with caplog.at_level(logging.DEBUG):
        rc, err = cli("predict", model, series, "--out", tmp_path / "out", "--device", "cpu")
    assert rc == 0, err
    assert cli.digest(series) == before
    assert pydicom.dcmread(tmp_path / "out" / "series_seg.dcm").PatientBirthDate == ""
    for f in (tmp_path / "out").rglob("*"):
        assert not f.is_file() or MARK.encode() not in f.read_bytes().upper(), f
    assert MARK not in (err + caplog.text).upper()


def test_bad_study_uid_through_predict(tmp_path, model, cli, caplog):
    """predict reads the series (io's reader) and writes the SEG: neither's log line quotes the
    invalid UID; only the SEG, which references the study, carries it."""
    series = series_with(tmp_path / "in" / "series", StudyInstanceUID=f"1.2.{MARK}.3")
    with caplog.at_level(logging.DEBUG):
        rc, err = cli("predict", model, series, "--out", tmp_path / "out", "--device", "cpu")
    assert rc == 0, err
    assert MARK not in (err + caplog.text).upper()
    for f in (tmp_path / "out").rglob("*"):
        assert f.name == "series_seg.dcm" or MARK.encode() not in f.read_bytes().upper(), f

"""No patient identifier from a DICOM header may reach any output of ``medanomaly predict``.

A real series (the dcm2nii field map of ../shared/data) is given marker identifiers, predicted
with a tiny model, and every byte of every output is searched: raw files, the decompressed
content of .gz files and of PNG chunks (IDAT, zTXt, iTXt), regions.json, the file names, and
everything printed or logged. The volunteer's real identifiers must not appear either.

The one exception, by design and as the README ("Patient privacy") and ``predict --help`` say: for a
DICOM series, predict writes by default a DICOM SEG (``stem_seg.dcm``; ``--no-dicom-seg`` leaves it
out) that keeps the patient module (name, ID, birth date, sex) and the study identifiers, which an
archive needs to file it next to the study. It is checked separately: it must hold nothing more (no
institution, address or station), no identifier may leave it for another output or a log, and a
copied value that is not valid for its DICOM type (a birth date "1990-13-45") is written empty, never
quoted in a message.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage

from medanomaly.apps.cli import build_parser, main

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
README = Path(__file__).resolve().parents[2] / "README.md"
LGG = DATA / "lgg-flair"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
pytestmark = pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial", "lgg-flair")
PATIENTS = ["TCGA_CS_4941_19960909", "TCGA_CS_4943_20000902", "TCGA_CS_4944_20010208"]

MARKERS = {"PatientName": "MARKER^NAME^XYZ", "PatientID": "MARKERID123", "PatientBirthDate": "19010101",
           "AccessionNumber": "MARKERACC9", "InstitutionName": "MARKERINST"}
#: pieces of the markers that must not appear in any form (a name may be re-joined with spaces)
NEEDLES = [b"MARKER", b"NAME^XYZ", b"MARKERID123", b"19010101", b"MARKERACC9", b"MARKERINST"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny 1-channel U-Net: one epoch on 6 real LGG slices of 3 patients (seconds on a CPU)."""
    data = tmp_path_factory.mktemp("tiny data")
    for p in PATIENTS:
        (data / p).mkdir()
        masks = [m for m in sorted((LGG / p).glob("*_mask.png")) if np.asarray(PILImage.open(m)).any()]
        for m in masks[len(masks) // 2: len(masks) // 2 + 2]:
            shutil.copy(m, data / p / m.name)
            shutil.copy(m.with_name(m.name.replace("_mask", "_flair")), data / p / m.name.replace("_mask", "_flair"))
    (data / "splits.json").write_text(json.dumps({"train": PATIENTS[:1], "val": PATIENTS[1:2], "test": PATIENTS[2:]}))
    model = tmp_path_factory.mktemp("tiny model") / "model"
    assert main(["-q", "train", str(data), "--out", str(model), "--size", "32", "--width", "4", "--depth", "2",
                 "--epochs", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    return model


def _png_blobs(data: bytes) -> list[bytes]:
    """The decompressed image data and text chunks of a PNG (text may hide in zTXt/iTXt)."""
    blobs, idat, pos = [], b"", 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8: pos + 8 + n]
        pos += 12 + n
        if kind == b"IDAT":
            idat += body
        elif kind == b"zTXt":
            blobs.append(zlib.decompress(body.split(b"\0", 1)[1][1:]))
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            flag, rest = rest[0], rest[2:]
            text = rest.split(b"\0", 2)[2]
            blobs.append(zlib.decompress(text) if flag else text)
        else:
            blobs.append(body)
    blobs.append(zlib.decompress(idat))
    return blobs


def _contents(path: Path) -> list[bytes]:
    """Every form of a file's content to search: raw, gunzipped, PNG chunks decompressed."""
    raw = path.read_bytes()
    out = [raw, path.name.encode("utf-8")]
    if raw[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(raw))
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        out += _png_blobs(raw)
    return out


def _leaks(out_dir: Path, needles: list[bytes], texts: list[str]) -> list[str]:
    found = []
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert files, f"nothing written to {out_dir}"
    for f in files:
        for blob in _contents(f):
            found += [f"{f.relative_to(out_dir)}: {n!r}" for n in needles if n.lower() in blob.lower()]
    for i, text in enumerate(texts):
        blob = text.encode("utf-8").lower()
        found += [f"console/log output {i}: {n!r}" for n in needles if n.lower() in blob]
    return found


def _marked_series(dst: Path, markers: dict[str, str] = MARKERS) -> Path:
    dst.mkdir(parents=True)
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE  # invalid ones too
    try:
        for f in sorted(FIELDMAP.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            for keyword, value in markers.items():
                setattr(ds, keyword, value)
            ds.save_as(dst / f.name)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    return dst


def _predict_actions() -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {o: a for a in sub.choices["predict"]._actions for o in a.option_strings}


def _predict_options() -> set[str]:
    return set(_predict_actions())


#: predict's flag that leaves the DICOM SEG out (where predict has a SEG output at all)
NO_SEG = ["--no-dicom-seg"] if "--no-dicom-seg" in _predict_options() else []


def _predict(model: Path, given: Path, out: Path, capsys, caplog, *extra: str) -> list[str]:
    """predict without -q (every info line too); returns stdout, stderr and the log records."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        rc = main(["predict", str(model), str(given), "--out", str(out), "--device", "cpu", *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return [cap.out, cap.err, caplog.text, "\n".join(str(r.args) for r in caplog.records)]


def test_planted_identifiers_never_reach_predict_outputs(tiny_model: Path, tmp_path: Path, capsys, caplog) -> None:
    series = _marked_series(tmp_path / "in" / "series")
    assert pydicom.dcmread(series / "00001.dcm").PatientName == MARKERS["PatientName"]
    texts = _predict(tiny_model, series, tmp_path / "out", capsys, caplog, *NO_SEG)
    assert (tmp_path / "out" / "series_pred.nii.gz").is_file()
    # a single slice, predicted alone (2D DICOM input), the same way
    texts += _predict(tiny_model, series / "00010.dcm", tmp_path / "out-slice", capsys, caplog, *NO_SEG)
    assert (tmp_path / "out-slice" / "00010_pred.nii.gz").is_file()
    leaks = _leaks(tmp_path / "out", NEEDLES, texts) + _leaks(tmp_path / "out-slice", NEEDLES, [])
    assert not leaks, leaks


def test_real_volunteer_identifiers_never_reach_predict_outputs(tiny_model: Path, tmp_path: Path, capsys,
                                                                caplog) -> None:
    ds = pydicom.dcmread(FIELDMAP / "00001.dcm", stop_before_pixels=True)
    assert "Rorden" in str(ds.PatientName)  # the shared series carries the volunteer's test identifiers
    needles = [b"Rorden", b"Upgrade Test", str(ds.PatientBirthDate).encode(), str(ds.InstitutionName).encode(),
               str(ds.InstitutionAddress).split(",")[0].encode(), str(ds.StudyInstanceUID).encode(),
               str(ds.SeriesInstanceUID).encode(), str(ds.SOPInstanceUID).encode()]
    texts = _predict(tiny_model, FIELDMAP, tmp_path / "out", capsys, caplog, *NO_SEG)
    leaks = _leaks(tmp_path / "out", needles, texts)
    assert not leaks, leaks


def test_default_predict_writes_identifiers_only_inside_the_dicom_seg(tiny_model: Path, tmp_path: Path, capsys,
                                                                      caplog) -> None:
    """By default predict writes a DICOM SEG for a series (issue: 'a DICOM SEG keeps only what the
    standard requires to reference its source'); no identifier appears in any other output, log or
    message."""
    series = _marked_series(tmp_path / "in" / "series")
    texts = _predict(tiny_model, series, tmp_path / "out", capsys, caplog)
    assert (tmp_path / "out" / "series_seg.dcm").is_file()
    leaks = [leak for leak in _leaks(tmp_path / "out", NEEDLES, texts) if not leak.startswith("series_seg.dcm:")]
    assert not leaks, leaks


@pytest.mark.skipif(not NO_SEG, reason="this predict has no DICOM SEG output")
def test_dicom_seg_carries_only_the_identifiers_it_needs(tiny_model: Path, tmp_path: Path, capsys, caplog) -> None:
    """With --dicom-seg the SEG names the patient and study (the standard requires it to file the
    SEG with its source), but nothing more: no institution, address, station or study description."""
    series = _marked_series(tmp_path / "in" / "series")
    texts = _predict(tiny_model, series, tmp_path / "out", capsys, caplog)
    ds = pydicom.dcmread(FIELDMAP / "00001.dcm", stop_before_pixels=True)
    extra = [b"MARKERINST", str(ds.InstitutionAddress).split(",")[0].encode(), str(ds.StationName).encode(),
             str(ds.StudyDescription).encode()]  # (the scanner serial is part of the UIDs the SEG references)
    segs = list((tmp_path / "out").rglob("*_seg.dcm"))
    assert segs, "no DICOM SEG written with --dicom-seg"
    assert not _leaks(tmp_path / "out", extra, [])
    outside = [leak for leak in _leaks(tmp_path / "out", NEEDLES, texts) if not leak.startswith("series_seg.dcm:")]
    assert not outside, outside


def test_invalid_birth_date_is_written_empty_and_shown_nowhere(tiny_model: Path, tmp_path: Path, capsys,
                                                               caplog) -> None:
    """A birth date that is no valid DICOM date (issue 15: the SEG writer failed and its error, with
    the value, went to the console and regions.json): the SEG is written with it empty, and the
    value is in no output (the SEG included), message or log line."""
    series = _marked_series(tmp_path / "in" / "series", {"PatientBirthDate": "MARKERBD1901"})
    texts = _predict(tiny_model, series, tmp_path / "out", capsys, caplog)
    seg = pydicom.dcmread(tmp_path / "out" / "series_seg.dcm")
    assert seg.PatientBirthDate == "" and seg.PatientName == pydicom.dcmread(series / "00001.dcm").PatientName
    regions = json.loads((tmp_path / "out" / "regions.json").read_text())
    assert regions["failed"] == [] and regions["images"][0]["dicom_seg"] == "series_seg.dcm"
    assert "PatientBirthDate" in caplog.text  # said by keyword
    leaks = _leaks(tmp_path / "out", [b"MARKERBD", b"MARKER"], texts)
    assert not leaks, leaks


def test_readme_help_and_this_test_say_the_same_about_the_dicom_seg() -> None:
    """On by default, keeps the patient module, --no-dicom-seg leaves it out: README ("Patient
    privacy"), predict's help and this module's docstring."""
    action = _predict_actions()["--dicom-seg"]
    assert action.default is True
    section = re.search(r"^## Patient privacy\n(.*?)^## ", README.read_text(encoding="utf-8"),
                        re.MULTILINE | re.DOTALL)
    assert section, "README.md has no 'Patient privacy' section"
    for text in (" ".join(action.help.split()), " ".join(section.group(1).split()), " ".join(__doc__.split())):
        for phrase in ("by default", "patient module", "--no-dicom-seg", "file it next to the study"):
            assert phrase in text, (phrase, text)

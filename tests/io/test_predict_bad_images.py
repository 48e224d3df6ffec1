"""Bad image files through ``medanomaly predict``: the corpus of tests/io/conftest.py fed to it
in-process (``medanomaly.apps.cli.main``), plus one subprocess run over all of it to prove no
traceback reaches stderr.

The contract (README, "Bad input"): ``predict`` keeps going past a file it cannot read, reports it
and exits with 1; a user error ends with one paragraph on stderr naming the file and the fix, exit
code 2, no traceback and no partial output. :data:`OUTCOMES` lists every kind of file tested here
with its documented outcome (the README table is made from these rows and those of
tests/data/test_bad_layouts.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

import medanomaly.io as mio
from medanomaly.apps.cli import build_parser

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
DICOM = DATA / "dicom"
pytestmark = pytest.mark.shared_data()  # the bad-input corpus is generated from it

#: kind id -> documented outcome (the README "Bad input" table is made from these rows).
OUTCOMES: dict[str, str] = {
    "dicom-truncated": "predict: `failed: <file>: ... has no DICOM pixel data: it is truncated ...`, exit 1, no output for it",
    "dicom-no-pixels": "predict: same message (truncated or a non-image object), exit 1",
    "dicom-j2k-no-decoder": "predict: error naming the transfer syntax and `pip install pylibjpeg pylibjpeg-openjpeg`, exit 1",
    "dicom-huge-header": "Rows x Columns x frames above `MAX_PIXELS`: refused from the header before decoding, exit 1",
    "dicom-invalid-uid": "handled: read normally; library complaints, if any, become one warning line naming the file, exit 0",
    "nifti-nan-voxel-size": "NaN/inf in pixdim, srow or quatern: `... gives a non-finite affine or voxel size ...`, exit 1",
    "dicom-invalid-geometry": "handled: PixelSpacing 0 or NaN -> spacing unknown; degenerate ImageOrientationPatient -> identity; a warning each, exit 0",
    "series-invalid-orientation": "a series whose ImageOrientationPatient has no slice normal: `... is not two perpendicular unit vectors, so the slices cannot be ordered`, exit 1",
    "mha-bad-ndims": "MetaImage NDims < 1 or large (crashes ITK's MetaIO: segfault) or DimSize not matching it: refused before ITK parses it, exit 1",
    "mhd-data-file-is-a-pipe": "header whose data file is a FIFO/device (`/dev/stdin`): refused before reading (it would block forever), exit 1",
    "nhdr-data-file-missing": "`<header>: the data file <raw> named in its header does not exist; put it beside the header ...`, exit 1",
    "mha-truncated": "`cannot read <file> (RuntimeError: ... data not read completely ...)` on one line (ITK's own stderr chatter captured), exit 1",
    "series-duplicate-slice": "predict: `... has several slices at the same position (<a>.dcm and <b>.dcm ...)`, exit 1",
    "series-missing-slice": "read with a warning `uneven slice spacing (3.600-7.200 mm)`; predicted, exit 0",
    "series-mixed-sizes": "predict: `slice <file> is 32x32 but <file> is 64x64 ...`, exit 1",
    "series-with-readme": "handled: notes/sidecars (README.txt, *.json...) are ignored; one volume predicted, exit 0",
    "nifti-nan": "predict: `... contains 1 NaN/inf voxels; ... numpy.nan_to_num`, exit 1; train: exit 2",
    "nifti-inf": "predict: same as NaN, exit 1",
    "nifti-huge-header": "dims above `MAX_PIXELS` (2**28 values): refused from the header in milliseconds, exit 1",
    "nifti-4d": "the 4th axis is read as channels: a 1-channel model says `model expects 1-channel images; ... has 3 channels`, exit 1",
    "nrrd-huge-header": "sizes above `MAX_PIXELS`: refused from the header (SimpleITK ReadImageInformation), exit 1",
    "tiff-huge-header": "ImageWidth x ImageLength above `MAX_PIXELS`: refused from the header, exit 1",
    "zero-byte": "predict: `... is empty (0 bytes); re-copy or re-export the file`, exit 1",
    "text-as-png": "predict: `cannot read <file> (UnidentifiedImageError ...)`, exit 1",
    "png-truncated": "predict: `cannot read <file> (OSError: image file is truncated)`, exit 1",
    "png-rgba": "handled: alpha dropped, read as RGB (3 channels); a 1-channel model refuses it naming both counts, exit 1",
    "png-16bit": "handled: values kept (percentile normalisation), predicted, exit 0",
    "png-1x1": "handled: predicted (upsampled to the model size and back), a 1x1 mask, exit 0",
    "png-huge-header": "IHDR above `MAX_PIXELS`: refused from the header before decoding (no memory used), exit 1",
    "png-uppercase-suffix": "handled: `.PNG` is read as PNG, exit 0",
    "non-ascii-path": "handled: `données patient/é 1.png` is predicted to the mirrored path, exit 0",
    "symlink-loop": "handled: discovery does not follow a link back into the tree (nor a self-link), exit 0",
}
#: kinds predict shares with train/evaluate: their rows are in tests/data/test_bad_layouts.py
SHARED_KINDS = {"permission-denied", "empty-folder", "only-masks", "nonexistent-path"}

#: kind -> (exit code, regex the stderr must match (None for exit 0), files expected for exit 0);
#: the builders are the ``bad_images`` fixture's (tests/io/conftest.py)
PREDICT_CASES: dict[str, tuple[int, str | None, tuple[str, ...]]] = {
    "dicom-truncated": (1, r"no DICOM pixel data.*truncated", ()),
    "dicom-no-pixels": (1, r"no DICOM pixel data", ()),
    "dicom-j2k-no-decoder": (1, r"transfer syntax.*JPEG 2000.*pylibjpeg-openjpeg", ()),
    "dicom-huge-header": (1, r"65535x65535.*MAX_PIXELS", ()),
    "dicom-invalid-uid": (0, None, ("baduid_pred.nii.gz", "baduid_score.nii.gz")),
    "nifti-nan-voxel-size": (1, r"non-finite affine or voxel size", ()),
    "dicom-invalid-geometry": (0, None, ("flat_pred.nii.gz", "flat_score.nii.gz")),
    "series-invalid-orientation": (1, r"ImageOrientationPatient \[.*\] is not two perpendicular unit vectors", ()),
    "mha-bad-ndims": (1, r"MetaImage header has NDims = -1; only 2D and 3D", ()),
    "mhd-data-file-is-a-pipe": (1, r"the data file \S*slice\.raw named in its header is not a regular file", ()),
    "nhdr-data-file-missing": (1, r"the data file \S*brain\.raw named in its header does not exist", ()),
    "mha-truncated": (1, r"cannot read .*brain\.mha \(RuntimeError: .*data not read completely", ()),
    "series-duplicate-slice": (1, r"same position \(00005(_copy)?\.dcm and 00005(_copy)?\.dcm", ()),
    "series-missing-slice": (0, None, ("series_pred.nii.gz", "series_score.nii.gz")),
    "series-mixed-sizes": (1, r"slice 00007\.dcm is 32x32 but \S+ is 64x64", ()),
    "series-with-readme": (0, None, ("series_pred.nii.gz", "series_score.nii.gz", "series_overlay.png")),
    "nifti-nan": (1, r"contains 1 NaN/inf voxels.*nan_to_num", ()),
    "nifti-inf": (1, r"contains 1 NaN/inf voxels", ()),
    "nifti-huge-header": (1, r"30000x30000x30000.*MAX_PIXELS", ()),
    "nifti-4d": (1, r"model expects 1-channel images; .* has 3 channels", ()),
    "nrrd-huge-header": (1, r"100000x100000x100000.*MAX_PIXELS", ()),
    "tiff-huge-header": (1, r"65535x65535.*MAX_PIXELS", ()),
    "zero-byte": (1, r"is empty \(0 bytes\)", ()),
    "text-as-png": (1, r"cannot read .*not the image type its name says", ()),
    "png-truncated": (1, r"cannot read .*truncated", ()),
    "png-rgba": (1, r"model expects 1-channel images; .* has 3 channels", ()),
    "png-16bit": (0, None, ("deep_pred.png", "deep_score.tif", "deep_overlay.png")),
    "png-1x1": (0, None, ("dot_pred.png", "dot_score.tif", "dot_overlay.png")),
    "png-huge-header": (1, r"100000x100000.*MAX_PIXELS", ()),
    "png-uppercase-suffix": (0, None, ("SLICE_pred.png", "SLICE_score.tif")),
    "non-ascii-path": (0, None, ("données patient/é 1_pred.png", "données patient/é 1_score.tif")),
    "symlink-loop": (0, None, ("a_pred.png", "a_score.tif")),
    "permission-denied": (1, r"permission denied: \S*locked\.png", ()),
}


def _predict_options() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {o for a in sub.choices["predict"]._actions for o in a.option_strings}


#: predict's flag that leaves the DICOM SEG out (where predict has a SEG output at all)
NO_SEG = ["--no-dicom-seg"] if "--no-dicom-seg" in _predict_options() else []


def _no_j2k_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without any JPEG 2000 plugin (as tests/io/test_read.py does)."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(pydicom.dcmread(DICOM / "JPEG2000.dcm").file_meta.TransferSyntaxUID)
    monkeypatch.setattr(decoder, "_available", {})


def _loose_lines(err: str) -> list[str]:
    """stderr lines that are neither a 'failed: ' report nor a log line."""
    return [ln for ln in err.splitlines() if not re.match(r"(failed: |\d\d:\d\d:\d\d (WARNING|ERROR) )", ln)]


@pytest.mark.parametrize("kind", list(PREDICT_CASES))
def test_predict_bad_input(kind: str, tiny_lgg_model: Path, tmp_path: Path, cli, bad_images, deny_read, time_limit,
                           caplog, monkeypatch) -> None:
    rc_expected, pattern, expected = PREDICT_CASES[kind]
    src = tmp_path / "in"
    src.mkdir()
    given = bad_images[kind](src)
    if kind == "dicom-j2k-no-decoder":
        _no_j2k_decoder(monkeypatch)
    if kind == "permission-denied":
        deny_read(given)
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING)
    t0 = time.perf_counter()
    with time_limit(120):
        rc, err = cli("predict", tiny_lgg_model, given, "--out", out)
    assert time.perf_counter() - t0 < 20, "a crafted input must not make predict slow"
    assert "Traceback" not in err
    assert rc == rc_expected, err
    assert not cli.tmp_files(out)
    regions = json.loads((out / "regions.json").read_text())
    if rc_expected == 0:
        assert not regions["failed"] and regions["images"]
        for name in expected:
            assert (out / name).is_file(), (name, sorted(p.relative_to(out).as_posix() for p in out.rglob("*")))
        return
    assert cli.names(err, given) and cli.says(err, pattern), err
    assert [f["input"] for f in regions["failed"]] == [str(given)]
    assert not regions["images"] and not cli.outputs_of(out, mio.stem_of(given))


def test_predict_nonexistent_input(tiny_lgg_model: Path, tmp_path: Path, cli) -> None:
    rc, err = cli("predict", tiny_lgg_model, tmp_path / "in" / "nope.png", "--out", tmp_path / "out")
    assert rc == 2 and "Traceback" not in err and "does not exist" in err
    assert cli.names(err, tmp_path / "in" / "nope.png")
    assert not (tmp_path / "out").exists()


def test_predict_nonexistent_input_is_reported_before_the_output_check(tiny_lgg_model: Path, tmp_path: Path,
                                                                        cli) -> None:
    rc, err = cli("predict", tiny_lgg_model, tmp_path / "nope.png", "--out", tmp_path / "out")
    assert rc == 2 and "does not exist" in err


@pytest.mark.parametrize("kind", ["empty-folder", "only-masks"])
def test_predict_input_without_images_is_an_error(kind: str, tiny_lgg_model: Path, tmp_path: Path, cli,
                                                  bad_images) -> None:
    src = tmp_path / "in"
    src.mkdir()
    given = bad_images[kind](src)
    rc, err = cli("predict", tiny_lgg_model, given, "--out", tmp_path / "out")
    assert rc == 2 and cli.names(err, given) and "Traceback" not in err
    assert not (tmp_path / "out" / "regions.json").exists()


@pytest.mark.skipif(not NO_SEG, reason="this predict has no DICOM SEG output")
def test_dicom_seg_keeps_stderr_clean(tiny_lgg_model: Path, tmp_path: Path, bad_images) -> None:
    src = tmp_path / "in"
    (src / "series").mkdir(parents=True)
    bad_images["dicom-invalid-uid"](src / "series")  # one DICOM file in a folder: a 1-slice series
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medanomaly", "-q", "predict", str(tiny_lgg_model), str(src),
                           "--out", str(tmp_path / "out"), "--dicom-seg"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not _loose_lines(proc.stderr), proc.stderr


def _corpus_folder(src: Path, bad_images) -> dict[str, tuple[Path, int]]:
    """Every predict kind built in src/<kind>/ except the two that need an in-process monkeypatch;
    kind -> (the input path, its exit code alone)."""
    given = {}
    for kind, (rc, _, _) in PREDICT_CASES.items():
        if kind in ("dicom-j2k-no-decoder", "permission-denied"):
            continue
        (src / kind).mkdir()
        given[kind] = (bad_images[kind](src / kind), rc)
    return given


def test_predict_folder_keeps_going_past_every_bad_file(tiny_lgg_model: Path, tmp_path: Path, cli,
                                                       bad_images) -> None:
    """The whole predict corpus in one folder, through a real ``python -m medanomaly`` process:
    every bad file is reported, every good one predicted, exit 1, and no traceback on stderr."""
    src = tmp_path / "corpus"
    src.mkdir()
    given = _corpus_folder(src, bad_images)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medanomaly", "-q", "predict", str(tiny_lgg_model), str(src),
                           "--out", str(tmp_path / "out"), *NO_SEG], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    loose = _loose_lines(proc.stderr)
    assert not loose, f"lines on stderr that are neither a report nor a log line: {loose}"
    regions = json.loads((tmp_path / "out" / "regions.json").read_text())
    failed = {f["input"] for f in regions["failed"]}
    for kind, (path, rc) in given.items():
        if mio.is_dicom_series_dir(path.parent):  # a folder holding one DICOM file is a 1-slice series
            path = path.parent
        assert (str(path) in failed) == (rc == 1), kind
        if rc == 1:
            assert f"failed: {path}: " in proc.stderr, kind
    assert len(failed) == sum(rc == 1 for _, rc in given.values())
    assert len(regions["images"]) == 4 + 5  # 2 series, 2 DICOM (bad UID, bad geometry); 16-bit, 1x1, .PNG, non-ASCII, link
    assert not cli.tmp_files(tmp_path / "out")


def test_outcomes_table_covers_every_case(bad_images) -> None:
    """Every kind predict is tested on has its documented outcome here, or in the train/evaluate
    table for the kinds the three commands share; every corpus builder is used."""
    used = set(PREDICT_CASES) | {"empty-folder", "only-masks"}
    assert used - SHARED_KINDS == set(OUTCOMES)
    assert set(bad_images) == used
    assert len(OUTCOMES) >= 25

"""Bad image files at the reader level: what ``medanomaly.io.read_image`` does with the corpus of
tests/io/conftest.py (warnings, channels, fallbacks), the size limit checked from the header before
anything is decoded, permissions, pipes. Every failure is a ``MedanomalyError`` naming the file."""

from __future__ import annotations

import logging
import os
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import ImageFile

import medanomaly.io as mio
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import discover
from medanomaly.io import read_image, safety

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
DICOM = DATA / "dicom"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
IXI = DATA / "volumes" / "ixi-t1-healthy" / "IXI012-HH-1211-T1_ds.nii.gz"
NRRD = DATA / "volumes" / "brain1_image.nrrd"
KAGGLE_TIF = DATA / "lgg-kaggle3m-sample" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10.tif"
pytestmark = pytest.mark.shared_data()  # the bad-input corpus is generated from it


def test_missing_slice_is_read_with_a_warning(tmp_path: Path, caplog, bad_images) -> None:
    series = bad_images["series-missing-slice"](tmp_path)
    with caplog.at_level(logging.WARNING, logger="medanomaly.io"):
        img = read_image(series)
    assert img.spatial_shape == (35, 64, 64)
    assert "uneven slice spacing (3.600-7.200 mm)" in caplog.text


def test_series_readme_is_ignored_and_read_as_one_volume(tmp_path: Path, bad_images) -> None:
    series = bad_images["series-with-readme"](tmp_path)
    assert mio.is_dicom_series_dir(series)
    np.testing.assert_array_equal(read_image(series).array, read_image(FIELDMAP).array)
    assert [s.image for s in discover(tmp_path)] == [series]  # one sample, not 36 slices


def test_library_complaints_become_one_warning_naming_the_file(tmp_path: Path, caplog, bad_images) -> None:
    path = bad_images["dicom-invalid-uid"](tmp_path)
    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        read_image(path)
    assert not escaped, [str(w.message) for w in escaped]
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    ours = [r.getMessage() for r in caplog.records if r.name == "medanomaly.io"]
    assert len(ours) == 1 and ours[0].startswith(f"{path}: ") and "Invalid value for VR UI" in ours[0], ours


def test_detached_header_with_a_regular_data_file_still_reads(tmp_path: Path, mhd_header) -> None:
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(NRRD)))[0].astype("<i2")
    (tmp_path / "slice.raw").write_bytes(a.tobytes())
    (tmp_path / "slice.mhd").write_text(mhd_header("slice.raw"))
    np.testing.assert_array_equal(read_image(tmp_path / "slice.mhd").array[0], a)


def test_invalid_dicom_geometry_falls_back_with_warnings(tmp_path: Path, caplog, bad_images) -> None:
    path = bad_images["dicom-invalid-geometry"](tmp_path)
    with caplog.at_level(logging.WARNING, logger="medanomaly.io"):
        img = read_image(path)
    assert not img.geometry.spacing_known and img.geometry.spacing == (1.0, 1.0)
    assert np.isfinite(mio.affine_from_geometry(img.geometry)).all()
    assert "invalid PixelSpacing" in caplog.text and "invalid ImageOrientationPatient" in caplog.text


def test_rgba_and_4d_are_read_as_channels(tmp_path: Path, bad_images) -> None:
    assert read_image(bad_images["png-rgba"](tmp_path)).channels == 3
    img = read_image(bad_images["nifti-4d"](tmp_path))
    assert img.array.shape == (3, 8, 32, 32)


# --- size limit, permissions, pipes ---------------------------------------------------------------

HUGE = {"png": "png-huge-header", "nifti": "nifti-huge-header", "nrrd": "nrrd-huge-header",
        "tiff": "tiff-huge-header", "dicom": "dicom-huge-header"}  # format -> the corpus kind


@pytest.mark.parametrize("fmt", list(HUGE))
def test_crafted_huge_header_is_refused_fast_and_without_memory(fmt: str, tmp_path: Path, bad_images) -> None:
    path = bad_images[HUGE[fmt]](tmp_path)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MedanomalyError, match=r"MAX_PIXELS") as exc:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a header"
    assert str(path) in str(exc.value)


def _boom(*args, **kwargs):
    raise AssertionError("pixels decoded before the size check")


def _spy(monkeypatch, obj, name: str) -> None:
    monkeypatch.setattr(obj, name, _boom)


def _spy_property(monkeypatch, cls, name: str) -> None:
    monkeypatch.setattr(cls, name, property(_boom))


def _as_mha(src: Path, dst: Path) -> Path:
    sitk.WriteImage(sitk.ReadImage(str(src)), str(dst))
    return dst


#: format -> (real file from (tmp folder, an LGG FLAIR png), the decoding call that must not be reached)
SIZE_CHECKED = {
    "png": (lambda d, flair: flair, lambda mp: _spy(mp, ImageFile.ImageFile, "load")),
    "tiff": (lambda d, flair: KAGGLE_TIF, lambda mp: _spy(mp, tifffile.TiffPageSeries, "asarray")),
    "nifti": (lambda d, flair: IXI, lambda mp: _spy(mp, nib.Nifti1Image, "get_fdata")),
    "nrrd": (lambda d, flair: NRRD, lambda mp: _spy(mp, sitk.ImageFileReader, "Execute")),
    "mha": (lambda d, flair: _as_mha(NRRD, d / "brain1.mha"), lambda mp: _spy(mp, sitk.ImageFileReader, "Execute")),
    "dicom": (lambda d, flair: DICOM / "MR_small.dcm", lambda mp: _spy_property(mp, pydicom.Dataset, "pixel_array")),
    "dicom-series": (lambda d, flair: FIELDMAP, lambda mp: _spy_property(mp, pydicom.Dataset, "pixel_array")),
}


@pytest.mark.parametrize("fmt", list(SIZE_CHECKED))
def test_max_pixels_is_checked_from_the_header_before_decoding(fmt: str, tmp_path: Path, monkeypatch, real_lgg) -> None:
    make, spy = SIZE_CHECKED[fmt]
    path = make(tmp_path, real_lgg.flair)
    assert read_image(path).array.size > 1000
    monkeypatch.setattr(safety, "MAX_PIXELS", 1000)  # the limit lives (and is read at call time) in io.safety
    spy(monkeypatch)
    with pytest.raises(MedanomalyError, match=r"above the limit of 1,000 \(medanomaly\.io\.safety\.MAX_PIXELS\)"):
        read_image(path)


def test_permission_denied_names_the_file(tmp_path: Path, bad_images, deny_read) -> None:
    path = bad_images["permission-denied"](tmp_path)
    deny_read(path)
    with pytest.raises(MedanomalyError, match=r"permission denied: .*locked\.png; make it readable"):
        read_image(path)


def test_real_chmod_000_file_and_folder(tmp_path: Path, bad_images) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: root ignores file permissions, so chmod 000 cannot be tested for real "
                    "(test_permission_denied_names_the_file simulates it)")
    path = bad_images["permission-denied"](tmp_path)
    series = Path(shutil.copytree(FIELDMAP, tmp_path / "series"))
    path.chmod(0)
    series.chmod(0)
    try:
        for p in (path, series):
            with pytest.raises(MedanomalyError, match="permission denied"):
                read_image(p)
    finally:
        path.chmod(0o644)
        series.chmod(0o755)


def test_a_pipe_named_like_an_image_is_refused_without_blocking(tmp_path: Path, time_limit) -> None:
    os.mkfifo(tmp_path / "scan.png")
    with time_limit(30), pytest.raises(MedanomalyError, match=r"scan\.png is not a regular file"):
        read_image(tmp_path / "scan.png")
    with time_limit(30):
        assert not mio.is_dicom_series_dir(tmp_path)

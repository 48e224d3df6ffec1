"""Tests for medanomaly.io.dicom_series: a DICOM series folder read as one volume, slices ordered
along their normal with the spacing between them, and the folders refused (one position twice, two
series); on series written here with pydicom (tests/conftest.py) and on the real series of
../shared/data where present."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import affine_from_geometry, is_dicom_series_dir, mask_suffix, read_image, write_mask

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()
DICOM = DATA / "dicom"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
MPRAGE = DATA / "dicom-series" / "mr-t1-mprage-sagittal"


def test_series_is_read_in_position_order_with_its_spacing(tmp_path: Path, dicom_series) -> None:
    pixels = dicom_series(tmp_path / "s")
    img = read_image(tmp_path / "s")
    assert img.array.shape == (1, 3, 3, 4) and img.geometry.kind == "dicom" and img.geometry.spacing_known
    np.testing.assert_array_equal(img.array[0], np.stack([pixels[1], pixels[2], pixels[0]]))  # z = 0, 2, 4
    assert img.geometry.spacing == pytest.approx((2.0, 0.5, 0.5))
    assert img.geometry.origin == pytest.approx((0.0, 5.0, -10.0))  # (z, y, x) of the lowest slice, LPS


def test_slices_at_one_position_or_of_two_series_are_refused(tmp_path: Path, dicom_series, dicom_slice) -> None:
    dicom_series(tmp_path / "dup", zs=(0.0, 2.0, 2.0))
    with pytest.raises(MedanomalyError, match="several slices at the same position"):
        read_image(tmp_path / "dup")
    dicom_series(tmp_path / "two", zs=(0.0, 2.0))
    dicom_slice(tmp_path / "two" / "other.dcm", np.zeros((3, 4)), 4.0, generate_uid())
    with pytest.raises(MedanomalyError, match="holds 2 DICOM series"):
        read_image(tmp_path / "two")


@needs_data
def test_fieldmap_series_sorted_by_position() -> None:
    assert is_dicom_series_dir(FIELDMAP)
    assert not is_dicom_series_dir(DICOM / "CT_small.dcm")
    img = read_image(FIELDMAP)
    g = img.geometry
    assert img.array.shape == (1, 36, 64, 64)
    spacing_between = float(pydicom.dcmread(FIELDMAP / "00001.dcm").SpacingBetweenSlices)
    assert 3.0 <= g.spacing[0] <= 4.0 and g.spacing[0] == pytest.approx(spacing_between, abs=0.01)
    assert g.spacing[1:] == pytest.approx((3.0, 3.0))
    lps = g.meta["lps_affine"]
    normal = lps[:3, 2] / np.linalg.norm(lps[:3, 2])
    ks = []
    for f in sorted(FIELDMAP.iterdir()):
        ds = pydicom.dcmread(f)
        k = (normal @ (np.asarray(ds.ImagePositionPatient, float) - lps[:3, 3])) / g.spacing[0]
        assert k == pytest.approx(round(k), abs=0.05)
        np.testing.assert_array_equal(img.array[0, round(k)], ds.pixel_array)
        ks.append(round(k))
    assert sorted(ks) == list(range(36))
    assert "PatientName" not in str(g.meta) and "Rorden" not in str(g.meta)


@needs_data
def test_mprage_oblique_series(tmp_path: Path) -> None:
    img = read_image(MPRAGE)
    g = img.geometry
    assert img.array.shape == (1, 176, 256, 256)
    d = np.reshape(g.direction, (3, 3))
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-6)
    assert np.abs(d - np.round(d)).max() > 0.05  # oblique: not a permutation matrix
    ras = affine_from_geometry(g)
    for f in sorted(MPRAGE.iterdir())[:3]:  # every slice position lies on the affine's grid
        pos = np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float)
        ijk = np.linalg.solve(ras[:3, :3], np.array([-pos[0], -pos[1], pos[2]]) - ras[:3, 3])
        np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)
    out = write_mask(np.zeros(img.spatial_shape, bool), img, tmp_path / "seg")
    assert out.name == "seg.nii.gz" and mask_suffix(img) == ".nii.gz"
    np.testing.assert_allclose(nib.load(out).affine, ras, atol=1e-4)

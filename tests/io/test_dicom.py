"""Tests for medanomaly.io.dicom: which folders are DICOM series (notes and sidecars ignored), files
recognised by their preamble, and the geometry of a single DICOM file, on files written here with
pydicom (tests/conftest.py). Series: tests/io/test_dicom_series.py; pixel values and decoders:
tests/io/test_dicom_values.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from medanomaly.io import affine_from_geometry, is_dicom_series_dir, read_image
from medanomaly.io.dicom import _has_dicm, series_files


def test_sidecars_and_dicomdir_are_not_slices(tmp_path: Path, dicom_series) -> None:
    dicom_series(tmp_path / "s")
    for name in ("README.txt", "info.json", "DICOMDIR", ".hidden"):
        (tmp_path / "s" / name).write_bytes(b"not a slice")
    assert [p.name for p in series_files(tmp_path / "s")] == ["000.dcm", "001.dcm", "002.dcm"]
    assert is_dicom_series_dir(tmp_path / "s") and read_image(tmp_path / "s").array.shape == (1, 3, 3, 4)
    (tmp_path / "s" / "scan.png").write_bytes(b"\x89PNG")  # a file that is neither a slice nor a note
    assert not is_dicom_series_dir(tmp_path / "s")
    assert not is_dicom_series_dir(tmp_path / "s" / "000.dcm") and not is_dicom_series_dir(tmp_path / "absent")


def test_preamble_and_rescale_of_one_file(tmp_path: Path, dicom_slice) -> None:
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = dicom_slice(tmp_path / "noext", raw, 0.0, generate_uid(), slope=2.0, intercept=-100.0)
    assert _has_dicm(path) and not _has_dicm(tmp_path / "absent")
    img = read_image(path)  # no suffix: recognised by its preamble
    np.testing.assert_array_equal(img.array[0], raw * 2.0 - 100.0)
    assert img.geometry.spacing == (0.5, 0.5) and img.geometry.voxel_volume_mm() == pytest.approx(0.25)


def test_a_single_slice_keeps_its_3d_placement(tmp_path: Path, dicom_slice) -> None:
    img = read_image(dicom_slice(tmp_path / "one.dcm", np.zeros((3, 4)), 7.5, generate_uid()))
    g = img.geometry
    assert (g.kind, g.origin, g.direction) == ("dicom", (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))  # 2D: on its pixel grid
    lps = g.meta["lps_affine"]
    np.testing.assert_allclose(lps[:3, 3], [-10.0, 5.0, 7.5])  # ImagePositionPatient, LPS mm
    np.testing.assert_allclose(np.diag(lps)[:2], [0.5, 0.5])
    np.testing.assert_allclose(affine_from_geometry(g)[:3, 3], [10.0, -5.0, 7.5])  # RAS: x and y negated

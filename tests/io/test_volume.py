"""Tests for medanomaly.io.volume: NIfTI through nibabel (axis order, channels, geometry), NRRD and
MetaImage through SimpleITK, and the header checks made before ITK parses a file (data files
named by the header, MetaImage sizes). The real-volume round trips are in tests/io/test_write.py."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import read_image
from medanomaly.io.volume import _check_itk_data_files, _itk_data_files, _read_itk, _read_nifti


def test_nifti_2d_stays_3d(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.arange(20, dtype=np.int16).reshape(4, 5), np.eye(4)),
             tmp_path / "flat.nii")
    img = read_image(tmp_path / "flat.nii")
    assert img.array.shape == (1, 1, 5, 4)
    assert img.array[0, 0, 2, 1] == 1 * 5 + 2  # nibabel [x=1, y=2]


def test_nifti_axes_geometry_and_channels(tmp_path: Path) -> None:
    xyz = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (X, Y, Z)
    affine = np.diag([0.5, 0.75, 3.0, 1.0])
    affine[:3, 3] = (10.0, 20.0, 30.0)
    nib.save(nib.Nifti1Image(xyz, affine), tmp_path / "v.nii.gz")
    arr, geo = _read_nifti(tmp_path / "v.nii.gz")
    assert arr.shape == (1, 4, 3, 2) and arr[0, 3, 2, 1] == xyz[1, 2, 3]  # (C, Z, Y, X)
    assert geo.kind == "nifti" and geo.spacing_known
    assert geo.spacing == (3.0, 0.75, 0.5) and geo.origin == (30.0, 20.0, 10.0)
    np.testing.assert_array_equal(geo.affine, affine)
    channels = np.stack([xyz, xyz + 100], axis=-1)  # (X, Y, Z, C)
    nib.save(nib.Nifti1Image(channels, affine), tmp_path / "c.nii.gz")
    arr, _ = _read_nifti(tmp_path / "c.nii.gz")
    assert arr.shape == (2, 4, 3, 2) and arr[1, 3, 2, 1] == xyz[1, 2, 3] + 100
    vector = channels[:, :, :, None, :]  # NIfTI vector images: (X, Y, Z, 1, C)
    nib.save(nib.Nifti1Image(vector, affine), tmp_path / "vec.nii.gz")
    np.testing.assert_array_equal(_read_nifti(tmp_path / "vec.nii.gz")[0], arr)


def test_nifti_of_five_real_axes_is_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2, 2), np.float32), np.eye(4)), tmp_path / "5d.nii")
    with pytest.raises(MedanomalyError, match=r"5d\.nii: NIfTI with shape \(2, 2, 2, 2, 2\) is not supported"):
        _read_nifti(tmp_path / "5d.nii")


def test_mha_2d_image_keeps_its_geometry(tmp_path: Path) -> None:
    yx = np.arange(12, dtype=np.int16).reshape(3, 4)
    src = sitk.GetImageFromArray(yx)
    src.SetSpacing((0.5, 2.0))
    src.SetOrigin((-1.0, 7.0))
    sitk.WriteImage(src, str(tmp_path / "flat.mha"))
    arr, geo = _read_itk(tmp_path / "flat.mha")
    np.testing.assert_array_equal(arr, yx[None])
    assert (geo.kind, geo.spacing, geo.origin, geo.direction) == ("itk", (2.0, 0.5), (7.0, -1.0), (1.0, 0.0, 0.0, 1.0))
    assert geo.meta["pixel_type"] == "16-bit signed integer"


def _header(path: Path, lines: list[str], nrrd: bool) -> Path:
    path.write_text("\n".join(lines) + ("\n\n" if nrrd else "\n"), encoding="latin-1")
    return path


def test_data_files_named_by_a_header(tmp_path: Path) -> None:
    nrrd = ["NRRD0004", "type: uint8", "dimension: 2", "sizes: 2 2", "encoding: raw"]
    assert _itk_data_files(_header(tmp_path / "a.nhdr", [*nrrd, "data file: a.raw"], True)) == [tmp_path / "a.raw"]
    assert _itk_data_files(_header(tmp_path / "b.nhdr", [*nrrd, "datafile: LOCAL"], True)) == []
    listed = _header(tmp_path / "c.nhdr", [*nrrd, "data file: LIST", "s1.raw", "s2.raw"], True)
    assert _itk_data_files(listed) == [tmp_path / "s1.raw", tmp_path / "s2.raw"]
    pattern = _header(tmp_path / "d.nhdr", [*nrrd, "data file: s%02d.raw 3 1 -1"], True)
    assert _itk_data_files(pattern) == [tmp_path / "s03.raw", tmp_path / "s02.raw", tmp_path / "s01.raw"]
    mhd = ["NDims = 2", "DimSize = 2 2", "ElementType = MET_UCHAR", "ElementDataFile = /abs/x.raw"]
    assert _itk_data_files(_header(tmp_path / "e.mhd", mhd, False)) == [Path("/abs/x.raw")]
    with pytest.raises(MedanomalyError, match="invalid or too long sequence"):
        _itk_data_files(_header(tmp_path / "f.nhdr", [*nrrd, "data file: s%d.raw 1 9 0"], True))


def test_header_checks_before_itk_reads(tmp_path: Path) -> None:
    mhd = ["ObjectType = Image", "NDims = 2", "DimSize = 2 2", "ElementType = MET_UCHAR", "ElementDataFile = x.raw"]
    with pytest.raises(MedanomalyError, match=r"the data file .*x\.raw named in its header does not exist"):
        _check_itk_data_files(_header(tmp_path / "a.mhd", mhd, False))
    (tmp_path / "x.raw").mkdir()
    with pytest.raises(MedanomalyError, match="is not a regular file"):
        _check_itk_data_files(tmp_path / "a.mhd")
    with pytest.raises(MedanomalyError, match=r"NDims = 4; only 2D and 3D"):
        _check_itk_data_files(_header(tmp_path / "b.mha", ["NDims = 4", "DimSize = 2 2 2 2"], False))
    with pytest.raises(MedanomalyError, match=r"DimSize = 2 -2, which is not 2 non-negative whole numbers"):
        _check_itk_data_files(_header(tmp_path / "c.mha", ["NDims = 2", "DimSize = 2 -2"], False))
    with pytest.raises(MedanomalyError, match="ElementNumberOfChannels = 0"):
        _check_itk_data_files(_header(tmp_path / "d.mha", ["NDims = 2", "DimSize = 2 2",
                                                           "ElementNumberOfChannels = 0"], False))
    (tmp_path / "e.nrrd").write_bytes(b"PNG not an nrrd")
    with pytest.raises(MedanomalyError, match="does not start with 'NRRD'"):
        _check_itk_data_files(tmp_path / "e.nrrd")
    (tmp_path / "x.raw").rmdir()
    (tmp_path / "x.raw").write_bytes(bytes([0, 1, 2, 3]))
    _check_itk_data_files(tmp_path / "a.mhd")  # a regular data file: nothing to say
    np.testing.assert_array_equal(read_image(tmp_path / "a.mhd").array, [[[0, 1], [2, 3]]])

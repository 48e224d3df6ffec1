"""Tests for medanomaly.io.write: masks and score maps written atomically next to their image, in its
format and with its geometry (hand-made rasters and volumes; the real NRRD, NIfTI and DICOM files of
../shared/data where present), read back by medanomaly.io and by the format's own library."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image as PILImage

from medanomaly.io import (
    Geometry,
    Image,
    affine_from_geometry,
    mask_suffix,
    read_image,
    read_mask,
    score_suffix,
    write_mask,
    write_score,
)

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()
DICOM = DATA / "dicom"
IXI = DATA / "volumes" / "ixi-t1-healthy" / "IXI012-HH-1211-T1_ds.nii.gz"
NRRD = DATA / "volumes" / "brain1_image.nrrd"


def _no_temp_left(folder: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in folder.iterdir())


def _like(kind: str, shape: tuple[int, ...]) -> Image:
    n = len(shape)
    geo = Geometry(kind, (1.0,) * n, (0.0,) * n, tuple(np.eye(n).ravel()), kind != "raster")
    return Image(np.zeros((1, *shape), np.float32), geo, Path("x"))


def test_suffixes_follow_the_input_kind() -> None:
    expected = {"raster": (".png", ".tif"), "nifti": (".nii.gz",) * 2, "dicom": (".nii.gz",) * 2,
                "nrrd": (".nrrd",) * 2, "itk": (".mha",) * 2}
    for kind, (m, s) in expected.items():
        like = _like(kind, (2, 2))
        assert (mask_suffix(like), score_suffix(like)) == (m, s), kind


def test_raster_mask_is_0_255_png_and_score_float32_tiff(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "img.png")
    image = read_image(tmp_path / "img.png")
    labels = np.array([[0, 1, 2, 0], [0, 0, 0, 0], [5, 0, 0, 0]], np.uint8)  # non-zero = lesion
    out = write_mask(labels, image, tmp_path / "out" / "img_pred")
    assert out == tmp_path / "out" / "img_pred.png"
    np.testing.assert_array_equal(np.asarray(PILImage.open(out)), (labels != 0) * 255)
    score = np.arange(12, dtype=np.float64).reshape(3, 4) / 11
    sout = write_score(score, image, tmp_path / "out" / "img_score")
    back = tifffile.imread(sout)
    assert sout.suffix == ".tif" and back.dtype == np.float32
    np.testing.assert_array_equal(back, score.astype(np.float32))
    assert _no_temp_left(tmp_path / "out")


def test_a_second_write_replaces_the_first(tmp_path: Path) -> None:
    like = _like("itk", (2, 3, 4))
    first = write_mask(np.ones((2, 3, 4), bool), like, tmp_path / "m")
    second = write_mask(np.zeros((2, 3, 4), bool), like, tmp_path / "m")
    assert first == second and not sitk.GetArrayFromImage(sitk.ReadImage(str(second))).any()
    assert _no_temp_left(tmp_path)


def test_dicom_series_mask_is_nifti_in_ras(tmp_path: Path) -> None:
    lps = np.diag([0.5, 0.5, 2.0, 1.0])
    lps[:3, 3] = (10.0, 20.0, 30.0)
    geo = Geometry("dicom", (2.0, 0.5, 0.5), (30.0, 20.0, 10.0), tuple(np.eye(3).ravel()), True,
                   meta={"lps_affine": lps})
    like = Image(np.zeros((1, 2, 3, 4), np.float32), geo, Path("series"))
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 2, 3] = True
    back = nib.load(write_mask(mask, like, tmp_path / "seg"))
    assert back.get_data_dtype() == np.uint8 and back.shape == (4, 3, 2)  # (x, y, z)
    np.testing.assert_allclose(back.affine, affine_from_geometry(geo))
    np.testing.assert_allclose(back.affine[:3, 3], [-10.0, -20.0, 30.0])
    assert np.asarray(back.dataobj)[3, 2, 1] == 1 and np.asarray(back.dataobj).sum() == 1


def test_write_shape_mismatch_is_value_error(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "img.png")
    image = read_image(tmp_path / "img.png")
    with pytest.raises(ValueError):
        write_mask(np.zeros((6, 5), bool), image, tmp_path / "out")
    with pytest.raises(ValueError):
        write_score(np.zeros((5, 5), np.float32), image, tmp_path / "out")


def test_mha_vector_image_round_trip(tmp_path: Path) -> None:
    vec = np.random.default_rng(2).random((3, 4, 5, 2)).astype(np.float32)  # (Z, Y, X, C)
    src = sitk.GetImageFromArray(vec, isVector=True)
    src.SetSpacing((0.5, 0.7, 2.0))
    src.SetOrigin((1.0, -2.0, 3.0))
    src.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(src, str(tmp_path / "vec.mha"))
    img = read_image(tmp_path / "vec.mha")
    assert img.geometry.kind == "itk" and img.array.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(img.array, np.moveaxis(vec, -1, 0))
    assert img.geometry.spacing == (2.0, 0.7, 0.5) and img.geometry.origin == (3.0, -2.0, 1.0)
    out = write_score(img.array[1], img, tmp_path / "score")
    back = sitk.ReadImage(str(out))
    assert out.name == "score.mha" and back.GetSpacing() == src.GetSpacing()
    assert back.GetOrigin() == src.GetOrigin() and back.GetDirection() == src.GetDirection()
    ras = affine_from_geometry(img.geometry)
    np.testing.assert_allclose(ras[:3, 3], [-1.0, 2.0, 3.0])
    np.testing.assert_allclose(ras[:3, 0], [0.0, 0.5, 0.0])  # LPS (0, -1, 0) * 0.5 -> RAS


# --- real files -----------------------------------------------------------------------------------

@needs_data
def test_dicom_2d_writes_nifti(tmp_path: Path) -> None:
    img = read_image(DICOM / "CT_small.dcm")
    mask = img.array[0] > 0
    out = write_mask(mask, img, tmp_path / "ct_mask")
    back = nib.load(out)
    assert back.shape == (128, 128, 1)
    np.testing.assert_array_equal(np.asarray(back.dataobj)[:, :, 0].T, mask.astype(np.uint8))
    ipp = np.asarray(pydicom.dcmread(DICOM / "CT_small.dcm").ImagePositionPatient, float)
    np.testing.assert_allclose(back.affine[:3, 3], [-ipp[0], -ipp[1], ipp[2]], atol=1e-3)


@needs_data
def test_nrrd_matches_simpleitk_and_round_trips(tmp_path: Path) -> None:
    ref = sitk.ReadImage(str(NRRD))
    img = read_image(NRRD)
    assert img.array.shape == (1, *sitk.GetArrayFromImage(ref).shape) == (1, 25, 256, 256)
    assert img.geometry.spacing == pytest.approx(ref.GetSpacing()[::-1])
    assert img.geometry.origin == pytest.approx(ref.GetOrigin()[::-1])
    np.testing.assert_array_equal(img.array[0], sitk.GetArrayFromImage(ref))
    mask = read_mask(DATA / "volumes" / "brain1_label.nrrd", like=img)
    assert mask.dtype == bool and mask.any()
    out = write_mask(mask, img, tmp_path / "sub" / "brain1_mask")
    back = sitk.ReadImage(str(out))
    assert out.suffix == ".nrrd" and back.GetPixelIDValue() == sitk.sitkUInt8
    assert back.GetSpacing() == ref.GetSpacing() and back.GetOrigin() == ref.GetOrigin()
    assert back.GetDirection() == ref.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask.astype(np.uint8))
    score_out = write_score(img.array[0] / 10, img, tmp_path / "brain1_score")
    np.testing.assert_allclose(read_image(score_out).array[0], img.array[0] / 10, rtol=1e-6)
    assert _no_temp_left(tmp_path / "sub") and _no_temp_left(tmp_path)


@needs_data
def test_ixi_nifti_affine_and_round_trip(tmp_path: Path) -> None:
    ref = nib.load(IXI)
    img = read_image(IXI)
    assert img.array.shape == (1, 90, 120, 120) and img.geometry.kind == "nifti"
    assert np.array_equal(img.geometry.affine, ref.affine)
    assert np.array_equal(affine_from_geometry(img.geometry), ref.affine)
    np.testing.assert_allclose(img.array[0], ref.get_fdata().transpose(2, 1, 0), rtol=1e-6)
    mask = img.array[0] > np.percentile(img.array, 90)
    out = write_mask(mask, img, tmp_path / "ixi_mask")
    back = nib.load(out)
    assert out.name == "ixi_mask.nii.gz" and back.get_data_dtype() == np.uint8
    assert np.array_equal(back.affine, ref.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask.transpose(2, 1, 0))
    np.testing.assert_array_equal(read_mask(out, like=img), mask)
    score = np.random.default_rng(1).random(img.spatial_shape, dtype=np.float32)
    sout = write_score(score, img, tmp_path / "ixi_score")
    back = nib.load(sout)
    assert back.get_data_dtype() == np.float32 and np.array_equal(back.affine, ref.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), score.transpose(2, 1, 0))
    assert _no_temp_left(tmp_path)

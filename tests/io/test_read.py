"""Tests for medanomaly.io: readers, mask checks, writers, geometry (real data where present)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import (
    IMAGE_SUFFIXES,
    Geometry,
    affine_from_geometry,
    full_suffix,
    is_dicom_series_dir,
    mask_suffix,
    read_image,
    read_mask,
    score_suffix,
    stem_of,
    write_mask,
    write_score,
)

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()
DICOM = DATA / "dicom"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
MPRAGE = DATA / "dicom-series" / "mr-t1-mprage-sagittal"
IXI = DATA / "volumes" / "ixi-t1-healthy" / "IXI012-HH-1211-T1_ds.nii.gz"
NRRD = DATA / "volumes" / "brain1_image.nrrd"
LGG = DATA / "lgg-flair" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10"
KAGGLE = DATA / "lgg-kaggle3m-sample" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10"


def _no_temp_left(folder: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in folder.iterdir())


# --- names and small helpers (no data needed) -------------------------------------------------

def test_suffix_and_stem() -> None:
    assert full_suffix("a/B.NII.GZ") == ".nii.gz"
    assert full_suffix("x.Png") == ".png"
    assert full_suffix("00001") == ""
    assert stem_of("dir/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert stem_of("case_1.5.png") == "case_1.5"
    assert stem_of("noext") == "noext"
    assert {".nii.gz", ".dcm", ".mha", ".png"} <= set(IMAGE_SUFFIXES)


def test_voxel_volume() -> None:
    known = Geometry("nrrd", (2.0, 0.5, 0.5), (0.0,) * 3, tuple(np.eye(3).ravel()), True)
    assert known.voxel_volume_mm() == pytest.approx(0.5)
    assert Geometry("raster", (1.0, 1.0), (0.0, 0.0), (1, 0, 0, 1), False).voxel_volume_mm() is None


def test_16bit_png_keeps_values(tmp_path: Path) -> None:
    arr = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    PILImage.fromarray(arr).save(tmp_path / "deep.png")
    img = read_image(tmp_path / "deep.png")
    assert img.array.shape == (1, 12, 10) and img.array.dtype == np.float32
    assert img.array.max() > 255
    np.testing.assert_array_equal(img.array[0], arr)


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (8, 9, 4), dtype=np.uint8)
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert img.channels == 3 and img.spatial_shape == (8, 9)
    np.testing.assert_array_equal(img.array, rgba[..., :3].transpose(2, 0, 1))


def test_palette_png_is_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[2:4, 3:5] = (255, 0, 0)
    PILImage.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    img = read_image(tmp_path / "pal.png")
    np.testing.assert_array_equal(img.array, rgb.transpose(2, 0, 1))


@settings(max_examples=25, deadline=None)
@given(arr=st.one_of(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12))),
                     arrays(np.uint16, st.tuples(st.integers(1, 12), st.integers(1, 12)))),
       use_tiff=st.booleans())
def test_property_raster_round_trip(arr: np.ndarray, use_tiff: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("a.tif" if use_tiff else "a.png")
        if use_tiff:
            tifffile.imwrite(path, arr)
        else:
            PILImage.fromarray(arr).save(path)
        img = read_image(path)
    assert img.array.shape == (1, *arr.shape)
    np.testing.assert_array_equal(img.array[0], arr.astype(np.float32))


@pytest.mark.parametrize("content", [b"", b"this is not an image\n"])
def test_broken_png_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(MedanomalyError, match="bad.png"):
        read_image(path)


def test_unknown_suffix_missing_file_and_plain_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MedanomalyError, match=r"unsupported file type '\.txt'.*\.nii\.gz"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(MedanomalyError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    assert not is_dicom_series_dir(tmp_path)
    with pytest.raises(MedanomalyError, match="not a DICOM series"):
        read_image(tmp_path)


def test_nan_nifti_raises(tmp_path: Path) -> None:
    data = np.ones((4, 5, 3), dtype=np.float32)
    data[0, 0, :] = np.nan
    data[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(MedanomalyError, match=r"nan\.nii\.gz contains 4 NaN/inf voxels.*nan_to"):
        read_image(tmp_path / "nan.nii.gz")


def test_nifti_2d_stays_3d(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.arange(20, dtype=np.int16).reshape(4, 5), np.eye(4)),
             tmp_path / "flat.nii")
    img = read_image(tmp_path / "flat.nii")
    assert img.array.shape == (1, 1, 5, 4)
    assert img.array[0, 0, 2, 1] == 1 * 5 + 2  # nibabel [x=1, y=2]


def test_mask_value_checks(tmp_path: Path) -> None:
    bad = np.zeros((6, 6), dtype=np.uint8)
    bad[1, 1], bad[2, 2] = 128, 255
    PILImage.fromarray(bad).save(tmp_path / "grey.png")
    with pytest.raises(MedanomalyError, match=r"grey\.png has values \{0,128,255\}; expected"):
        read_mask(tmp_path / "grey.png")
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[1, 1], labels[2, 2] = 1, 3
    PILImage.fromarray(labels).save(tmp_path / "labels.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.png"), labels > 0)
    PILImage.fromarray(labels * 85).save(tmp_path / "one.png")  # {0, 85, 255}: not labels
    with pytest.raises(MedanomalyError):
        read_mask(tmp_path / "one.png")


def test_mask_shape_mismatch(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((256, 256), np.uint8)).save(tmp_path / "img.png")
    PILImage.fromarray(np.full((240, 240), 255, np.uint8)).save(tmp_path / "m.png")
    image = read_image(tmp_path / "img.png")
    with pytest.raises(MedanomalyError, match=r"mask 240x240 does not match image 256x256") as err:
        read_mask(tmp_path / "m.png", like=image)
    assert "m.png" in str(err.value) and "img.png" in str(err.value)


def test_write_shape_mismatch_is_value_error(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "img.png")
    image = read_image(tmp_path / "img.png")
    with pytest.raises(ValueError):
        write_mask(np.zeros((6, 5), bool), image, tmp_path / "out")
    with pytest.raises(ValueError):
        write_score(np.zeros((5, 5), np.float32), image, tmp_path / "out")


# --- DICOM ---------------------------------------------------------------------------------------

@needs_data
def test_ct_rescale_applied() -> None:
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    img = read_image(DICOM / "CT_small.dcm")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert img.array.shape == (1, 128, 128) and img.geometry.kind == "dicom"
    np.testing.assert_array_equal(img.array[0], expected.astype(np.float32))
    assert -1100 < img.array.min() < 0 < img.array.max() < 3100  # Hounsfield units
    assert img.geometry.spacing == pytest.approx((0.661468, 0.661468))
    assert img.geometry.voxel_volume_mm() == pytest.approx(0.661468**2)


@needs_data
def test_mr_transfer_syntaxes_agree() -> None:
    arrays_ = [read_image(DICOM / n).array for n in
               ("MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm")]
    assert arrays_[0].shape == (1, 64, 64)
    np.testing.assert_array_equal(arrays_[0], arrays_[1])
    np.testing.assert_array_equal(arrays_[0], arrays_[2])


@needs_data
def test_jpeg2000_without_decoder_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels import get_decoder

    decoder = get_decoder(pydicom.dcmread(DICOM / "JPEG2000.dcm").file_meta.TransferSyntaxUID)
    monkeypatch.setattr(decoder, "_available", {})  # as on a machine without any J2K plugin
    with pytest.raises(MedanomalyError, match=r"JPEG2000\.dcm.*transfer syntax.*pylibjpeg-openjp"):
        read_image(DICOM / "JPEG2000.dcm")


@needs_data
def test_jpeg2000_with_decoder_matches_pydicom() -> None:
    ds = pydicom.dcmread(DICOM / "JPEG2000.dcm")
    try:
        expected = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no JPEG 2000 decoder installed: {exc}")
    np.testing.assert_array_equal(read_image(DICOM / "JPEG2000.dcm").array[0], expected)


@needs_data
def test_truncated_and_pixelless_dicom(tmp_path: Path) -> None:
    raw = (DICOM / "CT_small.dcm").read_bytes()
    for n in (len(raw) // 2, 1000):
        (tmp_path / "cut.dcm").write_bytes(raw[:n])
        with pytest.raises(MedanomalyError, match=r"cut\.dcm"):
            read_image(tmp_path / "cut.dcm")
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix")  # no suffix: recognised by its DICM preamble
    with pytest.raises(MedanomalyError, match="no DICOM pixel data"):
        read_image(tmp_path / "nopix")


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


# --- volumes --------------------------------------------------------------------------------------

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


# --- rasters --------------------------------------------------------------------------------------

@needs_data
def test_ph2_jpeg_and_png_mask(tmp_path: Path) -> None:
    img = read_image(DATA / "ph2" / "images" / "IMD002.jpg")
    h, w = img.spatial_shape
    assert img.channels == 3 and img.array.shape == (3, 572, 765)
    assert not img.geometry.spacing_known and img.geometry.voxel_volume_mm() is None
    mask = read_mask(DATA / "ph2" / "masks" / "IMD002.png", like=img)
    assert mask.shape == (h, w) and mask.any() and not mask.all()
    out = write_mask(mask, img, tmp_path / "IMD002_pred")
    with PILImage.open(out) as written:
        assert written.size == (w, h) and written.mode == "L"
        values = np.asarray(written)
    assert set(np.unique(values)) == {0, 255} and out.suffix == mask_suffix(img) == ".png"
    np.testing.assert_array_equal(values > 0, mask)


@needs_data
def test_lgg_png() -> None:
    img = read_image(f"{LGG}_flair.png")
    assert img.array.shape == (1, 256, 256) and img.array.max() > 1
    mask = read_mask(f"{LGG}_mask.png", like=img)
    assert mask.shape == (256, 256) and mask.dtype == bool


@needs_data
def test_kaggle_tiff_and_score(tmp_path: Path) -> None:
    img = read_image(f"{KAGGLE}.tif")
    assert img.array.shape == (3, 256, 256)
    np.testing.assert_array_equal(img.array, tifffile.imread(f"{KAGGLE}.tif").transpose(2, 0, 1))
    mask = read_mask(f"{KAGGLE}_mask.tif", like=img)
    assert mask.dtype == bool and mask.shape == (256, 256)
    score = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)
    out = write_score(score, img, tmp_path / "s")
    assert out.name == "s.tif" and score_suffix(img) == ".tif"
    back = tifffile.imread(out)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, score)


@needs_data
def test_truncated_real_png(tmp_path: Path) -> None:
    (tmp_path / "cut.png").write_bytes((DATA / "ph2" / "masks" / "IMD002.png").read_bytes()[:100])
    with pytest.raises(MedanomalyError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")

"""Tests for medanomaly.io.dicom_values: DICOM pixel values in modality units (rescale), high values
bright (MONOCHROME1 inverted), padding pixels filled, transfer syntaxes decoded or refused with the
package to install; on files written here with pydicom (tests/conftest.py) and on the real files
of ../shared/data where present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import read_image
from medanomaly.io.dicom_values import check_photometric, dicom_values, fill_padding

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()
DICOM = DATA / "dicom"


def test_monochrome1_is_inverted_within_the_stored_range(tmp_path: Path, dicom_slice) -> None:
    raw = np.array([[0, 10], [200, 255]], np.uint16)
    path = dicom_slice(tmp_path / "m1.dcm", raw, 0.0, generate_uid(), BitsStored=8, HighBit=7,
                       PhotometricInterpretation="MONOCHROME1")
    values, pad = dicom_values(pydicom.dcmread(path), path)
    assert pad is None and values.dtype == np.float32 and values.shape == (1, 2, 2)
    np.testing.assert_array_equal(values[0], 255 - raw)  # stored 0..255: white (0) becomes the brightest


def test_padding_pixels_are_found_and_filled_with_the_darkest_other_value(tmp_path: Path, dicom_slice) -> None:
    raw = np.array([[7, 30], [50, 7]], np.uint16)
    path = dicom_slice(tmp_path / "pad.dcm", raw, 0.0, generate_uid(), slope=2.0, PixelPaddingValue=7)
    values, pad = dicom_values(pydicom.dcmread(path), path)
    np.testing.assert_array_equal(pad, raw == 7)
    np.testing.assert_array_equal(fill_padding(values, pad, path)[0], [[60.0, 60.0], [100.0, 60.0]])
    np.testing.assert_array_equal(read_image(path).array[0], [[60.0, 60.0], [100.0, 60.0]])
    same = np.ones((1, 2, 2), np.float32)
    assert fill_padding(same, None, path) is same and (same == 1).all()


def test_photometric_interpretation_must_fit_the_samples(tmp_path: Path, dicom_slice) -> None:
    path = dicom_slice(tmp_path / "a.dcm", np.zeros((2, 2)), 0.0, generate_uid())
    ds = pydicom.dcmread(path)
    assert check_photometric(ds, path) == "MONOCHROME2"
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(MedanomalyError, match="'RGB' needs 3 samples per pixel but SamplesPerPixel is 1"):
        check_photometric(ds, path)
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(MedanomalyError, match="PhotometricInterpretation 'HSV' is not read"):
        check_photometric(ds, path)


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

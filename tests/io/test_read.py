"""Tests for medanomaly.io.read: read_image picks the reader and turns every failure into one
MedanomalyError naming the file; read_mask checks mask values and shape. The readers' own specifics
are in tests/io/test_raster.py, test_volume.py and test_dicom.py, the writers' in test_write.py."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import is_dicom_series_dir, read_channels, read_image, read_mask

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()


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


@needs_data
def test_truncated_real_png(tmp_path: Path) -> None:
    (tmp_path / "cut.png").write_bytes((DATA / "ph2" / "masks" / "IMD002.png").read_bytes()[:100])
    with pytest.raises(MedanomalyError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")


@pytest.mark.parametrize("error, shown", [(ValueError("Invalid value 'MARKER^PATIENT' for PatientName"), False),
                                          (EOFError("unexpected end of file"), True)])
def test_dicom_library_errors_never_quote_header_values(tmp_path: Path, monkeypatch, error, shown) -> None:
    """A DICOM reader's library error may quote a header value (a patient identifier): its text
    reaches the message only for structural errors, which quote none."""

    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pydicom, "dcmread", fail)
    with pytest.raises(MedanomalyError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and type(error).__name__ in message
    assert ("MARKER" in message or "unexpected end of file" in message) == shown


def test_other_library_errors_keep_their_text(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(MedanomalyError, match=r"cannot read .*x\.png \(\w+: .+\)"):
        read_image(path)


def test_read_channels_concatenates_in_order_and_keeps_names(tmp_path):
    for c in range(2):
        PILImage.fromarray(np.full((6, 5), 10 * (c + 1), np.uint8)).save(tmp_path / f"x_{c:04d}.png")
    img = read_channels([tmp_path / "x_0000.png", tmp_path / "x_0001.png"], ("FLAIR", "T1"))
    assert img.array.shape == (2, 6, 5) and img.array[:, 0, 0].tolist() == [10.0, 20.0]
    assert img.geometry.meta["channel_names"] == ("FLAIR", "T1") and img.path == tmp_path / "x_0000.png"
    assert img.geometry.meta.get("dtype") == "uint8"
    one = read_channels([tmp_path / "x_0000.png"])
    assert one.array.shape == (1, 6, 5) and "channel_names" not in one.geometry.meta


def test_read_channels_refuses_files_of_other_size(tmp_path):
    PILImage.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "a.png")
    PILImage.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(MedanomalyError, match=r"b.png is 6x6 but .*a.png is 6x5"):
        read_channels([tmp_path / "a.png", tmp_path / "b.png"])

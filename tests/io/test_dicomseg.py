"""DICOM SEG output: exact round trips on real series, slice matching by position, geometry, privacy."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

pytest.importorskip("highdicom")

from medanomaly.core.errors import MedanomalyError  # noqa: E402
from medanomaly.io import read_image  # noqa: E402
from medanomaly.io.dicomseg import SERIES_DESCRIPTION, read_dicom_seg, sorted_series_datasets, write_dicom_seg  # noqa: E402

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
AXIAL = DATA / "dicom-series" / "mr-gre-fieldmap-axial"  # 36 slices 64x64
SAGITTAL = DATA / "dicom-series" / "mr-t1-mprage-sagittal"  # 176 oblique slices 256x256
pytestmark = pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial")

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def blobs(shape: tuple[int, ...], seed: int, fraction: float = 0.1) -> np.ndarray:
    """Random smooth blobs, a few empty slices at both ends (so some SEG frames are omitted)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), sigma=2)
    mask = field > np.quantile(field, 1 - fraction)
    mask[:3] = mask[-3:] = False
    return mask


def source_of_frame(frame) -> str:
    return str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)


@pytest.fixture(scope="module")
def axial_seg(tmp_path_factory) -> tuple[np.ndarray, Path]:
    mask = blobs((36, 64, 64), seed=0)
    out = tmp_path_factory.mktemp("seg") / "case_seg.dcm"
    return mask, write_dicom_seg(mask, AXIAL, out, version="9.9.9")


def test_round_trip_exact(axial_seg):
    mask, path = axial_seg
    back = read_dicom_seg(path, AXIAL)
    assert back.dtype == bool and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # atomic: no temp file left


def test_pydicom_reads_a_seg_referencing_the_series(axial_seg):
    mask, path = axial_seg
    seg = pydicom.dcmread(path)
    src = pydicom.dcmread(sorted(AXIAL.iterdir())[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SOPClassUID == SEG_STORAGE
    assert seg.SegmentationType == "BINARY" and seg.BitsAllocated == 1
    assert seg.SeriesDescription == SERIES_DESCRIPTION
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert len(ref.ReferencedInstanceSequence) == 36
    n_present = int(mask.any(axis=(1, 2)).sum())
    assert int(seg.NumberOfFrames) == n_present == len(seg.PerFrameFunctionalGroupsSequence)
    assert seg.pixel_array.reshape(n_present, 64, 64).sum() == mask.sum()
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal structure
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # lesion
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("medanomaly", "9.9.9")


def test_frames_sit_on_their_source_slices(axial_seg):
    """Each SEG frame's PlanePosition is its source slice's ImagePositionPatient, and its pixels are
    the mask slice at that source's index in read_image's order."""
    mask, path = axial_seg
    seg = pydicom.dcmread(path)
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                                                     for f in AXIAL.iterdir())}
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sorted_series_datasets(AXIAL))}
    frames = seg.pixel_array.reshape(-1, 64, 64)
    for frame, pixels in zip(seg.PerFrameFunctionalGroupsSequence, frames):
        uid = source_of_frame(frame)
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(position, np.asarray(sources[uid].ImagePositionPatient, float), atol=1e-4)
        np.testing.assert_array_equal(pixels.astype(bool), mask[index[uid]])
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(np.asarray(orientation, float),
                               np.asarray(next(iter(sources.values())).ImageOrientationPatient, float), atol=1e-6)


def test_slice_order_is_read_image_order_whatever_the_file_names(tmp_path):
    """Files renamed in reverse order: slices are still matched by position, not by name."""
    shuffled = tmp_path / "series"
    shuffled.mkdir()
    files = sorted(AXIAL.iterdir())
    for f, name in zip(files, reversed([f.name for f in files])):
        shutil.copy(f, shuffled / name)
    volume = read_image(shuffled).array[0]
    for k, ds in enumerate(sorted_series_datasets(shuffled)):
        full = pydicom.dcmread(shuffled / Path(ds.filename).name)
        np.testing.assert_array_equal(apply_modality_lut(full.pixel_array, full).astype(np.float32), volume[k])
    mask = blobs((36, 64, 64), seed=1)
    path = write_dicom_seg(mask, shuffled, tmp_path / "out" / "seg.dcm", version="1")
    np.testing.assert_array_equal(read_dicom_seg(path, shuffled), mask)
    np.testing.assert_array_equal(read_dicom_seg(path, AXIAL), mask)  # same instances, original names


def test_empty_mask(tmp_path):
    mask = np.zeros((36, 64, 64), bool)
    path = write_dicom_seg(mask, AXIAL, tmp_path / "empty.dcm", version="1")
    assert int(pydicom.dcmread(path).NumberOfFrames) == 36
    back = read_dicom_seg(path, AXIAL)
    assert back.shape == mask.shape and not back.any()


def test_privacy_only_what_referencing_requires(axial_seg):
    _, path = axial_seg
    seg = pydicom.dcmread(path)
    src = pydicom.dcmread(sorted(AXIAL.iterdir())[0], stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):  # required: copied
        assert seg[keyword].value == src[keyword].value
    for keyword in ("PatientAge", "PatientSize", "PatientWeight", "StudyDescription", "InstitutionName",
                    "InstitutionAddress", "StationName", "InstitutionalDepartmentName", "PerformingPhysicianName",
                    "ProtocolName", "OperatorsName"):
        assert keyword not in seg, keyword
    found: dict[str, list] = {}
    seg.walk(lambda ds, elem: found.setdefault(elem.keyword, []).append(elem.value))  # nested sequences too
    for keyword in ("InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName"):
        assert keyword not in found, keyword
    assert src.DeviceSerialNumber not in found["DeviceSerialNumber"]  # the scanner's serial number
    raw = path.read_bytes()
    for keyword in ("InstitutionName", "InstitutionAddress", "StationName"):
        assert str(src[keyword].value).encode() not in raw, keyword


def test_anonymised_series_without_type2_attributes(tmp_path):
    """A de-identified series lacking PatientID, birth date, accession number...: they are written empty."""
    stripped = tmp_path / "series"
    stripped.mkdir()
    for f in AXIAL.iterdir():
        ds = pydicom.dcmread(f)
        for keyword in ("PatientID", "PatientSex", "PatientBirthDate", "AccessionNumber", "StudyID", "StudyTime",
                        "ReferringPhysicianName"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(stripped / f.name)
    mask = blobs((36, 64, 64), seed=3)
    path = write_dicom_seg(mask, stripped, tmp_path / "seg.dcm", version="1")
    np.testing.assert_array_equal(read_dicom_seg(path, stripped), mask)
    seg = pydicom.dcmread(path)
    assert seg.PatientID == "" and seg.AccessionNumber == ""  # Type 2: present, empty


def test_errors(tmp_path, axial_seg):
    with pytest.raises(MedanomalyError, match="does not match"):
        write_dicom_seg(np.zeros((35, 64, 64), bool), AXIAL, tmp_path / "x.dcm", version="1")
    assert not (tmp_path / "x.dcm").exists()
    if SAGITTAL.is_dir():
        with pytest.raises(MedanomalyError, match="does not reference"):
            read_dicom_seg(axial_seg[1], SAGITTAL)


@pytest.mark.shared_data("dicom-series/mr-t1-mprage-sagittal")
def test_oblique_sagittal_round_trip(tmp_path):
    mask = np.zeros((176, 256, 256), bool)
    mask[60:120, 40:200, 60:220] = blobs((60, 160, 160), seed=2, fraction=0.05)
    path = write_dicom_seg(mask, SAGITTAL, tmp_path / "sag.dcm", version="1")
    np.testing.assert_array_equal(read_dicom_seg(path, SAGITTAL), mask)
    assert read_image(SAGITTAL).spatial_shape == mask.shape


def test_no_header_value_reaches_the_log(tmp_path, caplog):
    """highdicom logs the source instance UIDs it copies from (INFO) and pydicom quotes values it
    finds invalid: writing and reading a SEG of the real series logs neither, even at DEBUG."""
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(AXIAL.iterdir())]
    values = {str(ds[k].value) for ds in src for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                                                       "PatientName", "PatientID", "PatientBirthDate")}
    with caplog.at_level(logging.DEBUG):
        path = write_dicom_seg(blobs((36, 64, 64), seed=4), AXIAL, tmp_path / "seg.dcm", version="1")
        read_dicom_seg(path, AXIAL)
    leaked = [v for v in values if v and v in caplog.text]
    assert not leaked, leaked

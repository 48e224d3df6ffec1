"""Multi-segment DICOM SEG of a label map (medanomaly.io.dicomseg_labels) on the real axial series:
segment count, labels and frames per segment read back with pydicom and highdicom, an exact round
trip, the binary writer's header (privacy: nothing copied beyond it), refusals of bad labels."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

highdicom = pytest.importorskip("highdicom")

from medanomaly.config.labels import Label  # noqa: E402
from medanomaly.core.errors import MedanomalyError  # noqa: E402
from medanomaly.io.dicomseg import read_dicom_seg, sorted_series_datasets, write_dicom_seg  # noqa: E402
from medanomaly.io.dicomseg_labels import label_pairs, read_dicom_seg_labels, write_dicom_seg_labels  # noqa: E402

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
AXIAL = DATA / "dicom-series" / "mr-gre-fieldmap-axial"  # 36 slices 64x64
pytestmark = pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial")
LABELS = {1: "edema", 2: "enhancing", 4: "necrosis"}  # necrosis absent from the map: a segment without frames


def _label_map(seed: int = 0) -> np.ndarray:
    """Edema blobs with enhancing cores, slices 3..32; value 4 (necrosis) nowhere."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random((36, 64, 64)), sigma=2)
    out = np.zeros(field.shape, np.uint8)
    out[field > np.quantile(field, 0.9)] = 1
    out[field > np.quantile(field, 0.97)] = 2
    out[:3] = out[-3:] = 0
    return out


@pytest.fixture(scope="module")
def labels_seg(tmp_path_factory) -> tuple[np.ndarray, Path]:
    lm = _label_map()
    return lm, write_dicom_seg_labels(lm, AXIAL, tmp_path_factory.mktemp("seg") / "case_seg.dcm", LABELS,
                                      version="9.9.9")


def test_segments_and_frames_match_the_label_map(labels_seg):
    lm, path = labels_seg
    seg = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["edema", "enhancing", "necrosis"]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    algo = seg.SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("medanomaly", "9.9.9")
    per_segment = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                   for f in seg.PerFrameFunctionalGroupsSequence]
    for number, value in ((1, 1), (2, 2), (3, 4)):  # one frame per slice holding the label, none for necrosis
        assert per_segment.count(number) == int((lm == value).any(axis=(1, 2)).sum())
    assert int(seg.NumberOfFrames) == len(per_segment)


def test_round_trip_exact(labels_seg):
    lm, path = labels_seg
    back, names = read_dicom_seg_labels(path, AXIAL)
    assert names == ("edema", "enhancing", "necrosis")
    expected = np.searchsorted([1, 2, 4], lm) + 1  # value -> segment number
    np.testing.assert_array_equal(back, np.where(lm > 0, expected, 0))
    np.testing.assert_array_equal(read_dicom_seg(path, AXIAL), lm > 0)  # the binary reader: any segment
    uids = [str(ds.SOPInstanceUID) for ds in sorted_series_datasets(AXIAL)]
    seg = highdicom.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[2],
                                               assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), lm == 2)


def test_header_is_the_binary_writers(labels_seg, tmp_path):
    """Privacy: the multi-segment SEG holds no attribute that the binary one does not."""
    lm, path = labels_seg
    binary = pydicom.dcmread(write_dicom_seg(lm > 0, AXIAL, tmp_path / "binary.dcm", version="9.9.9"))
    labels = pydicom.dcmread(path)
    found: dict[str, set] = {"binary": set(), "labels": set()}
    binary.walk(lambda ds, elem: found["binary"].add(elem.keyword))
    labels.walk(lambda ds, elem: found["labels"].add(elem.keyword))
    assert found["labels"] <= found["binary"]  # (the binary one adds DimensionOrganizationType "3D")
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "SeriesDescription"):
        assert labels[keyword].value == binary[keyword].value
    for keyword in ("PatientAge", "StudyDescription", "InstitutionName"):
        assert keyword not in labels


def test_binary_writer_is_the_one_label_case(tmp_path):
    mask = _label_map(1) > 0
    a = pydicom.dcmread(write_dicom_seg(mask, AXIAL, tmp_path / "a.dcm", version="1"))
    b = pydicom.dcmread(write_dicom_seg_labels(mask.astype(np.uint8), AXIAL, tmp_path / "b.dcm",
                                               [Label(1, "lesion")], version="1"))
    assert a.PixelData == b.PixelData and a.NumberOfFrames == b.NumberOfFrames
    assert a.SegmentSequence == b.SegmentSequence


def test_empty_label_map_keeps_every_frame(tmp_path):
    path = write_dicom_seg_labels(np.zeros((36, 64, 64), np.uint8), AXIAL, tmp_path / "e.dcm",
                                  [{"value": 1, "name": "edema"}, {"value": 2, "name": "enhancing"}], version="1")
    assert int(pydicom.dcmread(path).NumberOfFrames) == 2 * 36
    back, names = read_dicom_seg_labels(path, AXIAL)
    assert names == ("edema", "enhancing") and not back.any()


def test_refusals(tmp_path):
    lm = _label_map()
    with pytest.raises(MedanomalyError, match=r"holds value\(s\) 2 that are not among its labels \(1=edema\)"):
        write_dicom_seg_labels(lm, AXIAL, tmp_path / "x.dcm", {1: "edema"}, version="1")
    with pytest.raises(MedanomalyError, match="integer label values"):
        write_dicom_seg_labels(lm * 0.5, AXIAL, tmp_path / "x.dcm", LABELS, version="1")
    with pytest.raises(MedanomalyError, match="does not match"):
        write_dicom_seg_labels(lm[:35], AXIAL, tmp_path / "x.dcm", LABELS, version="1")
    assert not (tmp_path / "x.dcm").exists()
    with pytest.raises(MedanomalyError, match="cannot be a DICOM SegmentLabel"):
        label_pairs({1: "a\\b"})
    with pytest.raises(MedanomalyError, match="not an integer 1..65535 given once"):
        label_pairs([(1, "a"), (1, "b")])
    with pytest.raises(MedanomalyError, match="at least one label"):
        label_pairs({})
    assert label_pairs([Label(2, "b"), Label(1, "a")]) == [(1, "a"), (2, "b")]


def test_no_header_value_reaches_the_log(tmp_path, caplog):
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(AXIAL.iterdir())]
    values = {str(ds[k].value) for ds in src for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                                                       "PatientName", "PatientID", "PatientBirthDate")}
    with caplog.at_level(logging.DEBUG):
        path = write_dicom_seg_labels(_label_map(2), AXIAL, tmp_path / "seg.dcm", LABELS, version="1")
        read_dicom_seg_labels(path, AXIAL)
    assert not [v for v in values if v and v in caplog.text]

"""Lesion masks as DICOM Segmentation objects (SEG), for PACS and DICOM viewers.

:func:`write_dicom_seg` turns a (Z, Y, X) mask predicted on a DICOM series folder into one
BINARY DICOM SEG instance that references the series' instances slice by slice;
:func:`read_dicom_seg` reads it back in the slice order of :func:`medanomaly.io.read_image`.

Slice order: ``read_image(series_dir)`` stacks the slices sorted by their position along the
slice normal (``ImagePositionPatient`` projected on ``row x column`` of ``ImageOrientationPatient``,
ascending), whatever the file names are. Both functions sort the source datasets the same way, so
mask slice ``k`` is the segmentation of the instance at the ``k``-th position.

What the SEG contains (privacy): the segmentation and what the DICOM standard requires to file it
with, and reference, its source: the Type 1/2 attributes of the Patient and General Study modules,
copied from the source series so that archives file it with the right patient and study (PatientName,
PatientID, PatientBirthDate, PatientSex, StudyInstanceUID, StudyDate, StudyTime, StudyID,
AccessionNumber, ReferringPhysicianName; PatientIdentityRemoved and the de-identification method
where the source carries them), the FrameOfReferenceUID and the source instance UIDs. Nothing else
is copied: optional (Type 3) patient and study attributes (age, size, weight, study description,
other patient IDs, comments, ...) and the optional Patient Study and Clinical Trial modules are
removed, and so is the description of the source's acquisition equipment that highdicom adds by
default (it holds InstitutionName, InstitutionAddress, StationName and the scanner's serial number).
The series is described as "medanomaly lesion mask"; the equipment is medanomaly itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from medanomaly.core.atomic import atomic_path
from medanomaly.core.errors import MedanomalyError
from medanomaly.io.dicom import series_files  # read_image's slices
from medanomaly.io.safety import library_notes  # read_image's warning capture

SERIES_DESCRIPTION = "medanomaly lesion mask"

# Optional (Type 3) attributes of the Patient and General Study modules, and every attribute of the
# optional Patient Study, Clinical Trial Subject and Clinical Trial Study modules (DICOM PS3.3
# C.7.1.1, C.7.2.1, C.7.2.2, C.7.1.3, C.7.2.3). highdicom copies whatever of these the source holds;
# the SEG does not need them to reference its source, so they are removed.
_OPTIONAL_PATIENT_STUDY = frozenset("""
ReferencedPatientSequence IssuerOfPatientID TypeOfPatientID IssuerOfPatientIDQualifiersSequence
SourcePatientGroupIdentificationSequence GroupOfPatientsIdentificationSequence PatientBirthTime
PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar PatientAlternativeCalendar
QualityControlSubject StrainDescription StrainNomenclature StrainStockSequence StrainAdditionalInformation
StrainCodeSequence GeneticModificationsSequence OtherPatientNames OtherPatientIDsSequence OtherPatientIDs
ReferencedPatientPhotoSequence EthnicGroup EthnicGroupCodeSequence PatientComments
IssuerOfAccessionNumberSequence ReferringPhysicianIdentificationSequence ConsultingPhysicianName
ConsultingPhysicianIdentificationSequence StudyDescription ProcedureCodeSequence PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence NameOfPhysiciansReadingStudy
PhysiciansReadingStudyIdentificationSequence ReferencedStudySequence RequestingService
RequestingServiceCodeSequence ReasonForPerformedProcedureCodeSequence
AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence PatientAge PatientSize PatientSizeCodeSequence
PatientBodyMassIndex MeasuredAPDimension MeasuredLateralDimension PatientWeight MedicalAlerts Allergies
Occupation SmokingStatus AdditionalPatientHistory PregnancyStatus LastMenstrualDate PatientSexNeutered
ReasonForVisit ReasonForVisitCodeSequence AdmissionID IssuerOfAdmissionIDSequence ServiceEpisodeID
ServiceEpisodeDescription IssuerOfServiceEpisodeIDSequence PatientState
ClinicalTrialSponsorName ClinicalTrialProtocolID ClinicalTrialProtocolName IssuerOfClinicalTrialProtocolID
OtherClinicalTrialProtocolIDsSequence ClinicalTrialSiteID ClinicalTrialSiteName IssuerOfClinicalTrialSiteID
ClinicalTrialSubjectID IssuerOfClinicalTrialSubjectID ClinicalTrialSubjectReadingID
IssuerOfClinicalTrialSubjectReadingID ClinicalTrialProtocolEthicsCommitteeName
ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialTimePointID
ClinicalTrialTimePointDescription LongitudinalTemporalOffsetFromEvent LongitudinalTemporalEventType
ClinicalTrialTimePointTypeCodeSequence IssuerOfClinicalTrialTimePointID ConsentForClinicalTrialUseSequence
""".split())
_ACQUISITION_EQUIPMENT = "109101"  # DCM code of ContributingEquipment "Acquisition Equipment"
# Type 2 (required, may be empty) Patient/General Study attributes that highdicom reads from the
# source: an anonymised series may lack them; they are then written empty ("unknown").
_TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                      "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_TYPE1_FROM_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                      "FrameOfReferenceUID", "Rows", "Columns")

log = logging.getLogger(__name__)


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def sorted_series_datasets(series_dir: str | Path) -> list[pydicom.Dataset]:
    """The datasets (headers only) of a single-frame DICOM series folder, in the slice order of
    ``medanomaly.io.read_image(series_dir)``: ascending position along the slice normal."""
    folder = Path(series_dir)
    if not folder.is_dir():
        raise MedanomalyError(f"{folder} is not a folder; give the DICOM series folder the mask was predicted on")
    notes: list[str] = []
    try:
        with library_notes(notes):  # pydicom's complaints: logged once, not as raw warnings
            datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(folder)]
    except Exception as exc:  # noqa: BLE001 - library errors become one user-facing error
        raise MedanomalyError(f"cannot read the DICOM series {folder} ({type(exc).__name__}: {exc})") from exc
    for note in dict.fromkeys(notes):
        log.warning("%s: %s", folder, note)
    if not datasets:
        raise MedanomalyError(f"{folder} holds no DICOM files")
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) > 1:
        raise MedanomalyError(f"{folder} holds several DICOM series; give each its own folder")
    for ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise MedanomalyError(f"{folder}: a slice lacks ImagePositionPatient/ImageOrientationPatient, "
                                  "so no DICOM SEG can reference the slices")
    normal = _normal(datasets[0])
    pos = np.array([normal @ np.asarray(ds.ImagePositionPatient, float) for ds in datasets])
    order = np.argsort(pos, kind="stable")
    if len(order) > 1 and np.min(np.diff(pos[order])) < 1e-3:
        raise MedanomalyError(f"{folder} has several slices at the same position; keep one volume per folder")
    return [datasets[i] for i in order]


def _highdicom():
    """highdicom, imported on use: 0.75 s to import (with pydicom's code dictionaries), paid only
    when a DICOM SEG is written."""
    try:
        import highdicom
    except ImportError as exc:
        raise MedanomalyError("DICOM SEG needs the highdicom package: pip install highdicom "
                              "(the version pinned in requirements.lock)") from exc
    return highdicom


def _check_sources(sources: list[pydicom.Dataset], folder: Path) -> None:
    """Type 1 references must be there; missing Type 2 attributes become empty (in memory only)."""
    for ds in sources:
        missing = [k for k in _TYPE1_FROM_SOURCE if not ds.get(k)]
        if missing:
            raise MedanomalyError(f"{folder}: {Path(ds.filename).name} lacks {', '.join(missing)}, which a DICOM "
                                  "SEG needs to reference its source; no DICOM SEG can be made for this series")
        for keyword in _TYPE2_FROM_SOURCE:
            if keyword not in ds:
                setattr(ds, keyword, None)  # empty, as Type 2 allows


def _segment_description(label: str, algorithm: str, version: str):
    hd = _highdicom()
    from pydicom.sr.codedict import codes  # on use: 0.7 s to import, as highdicom

    # SNOMED CT 49755003 "Morphologically abnormal structure" (formerly "Morphologically altered
    # structure", the name in the DICOM CID 7150 segmentation category list) / 52988006 "Lesion".
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version),
    )


def _strip_to_required(seg: pydicom.Dataset) -> None:
    """Remove what highdicom copied from the source that the SEG does not need (module docstring)."""
    for keyword in _OPTIONAL_PATIENT_STUDY:
        if keyword in seg:
            delattr(seg, keyword)
    equipment = [item for item in seg.get("ContributingEquipmentSequence", [])
                 if not any(code.get("CodeValue") == _ACQUISITION_EQUIPMENT
                            for code in item.get("PurposeOfReferenceCodeSequence", []))]
    if equipment:
        seg.ContributingEquipmentSequence = equipment
    elif "ContributingEquipmentSequence" in seg:
        del seg.ContributingEquipmentSequence


def write_dicom_seg(mask: np.ndarray, series_dir: Path, out_path: Path, *, label: str = "lesion",
                    algorithm: str = "medanomaly", version: str) -> Path:
    """Write ``mask`` as a BINARY DICOM SEG referencing the series in ``series_dir``; return ``out_path``.

    ``mask``: (Z, Y, X), non-zero = lesion, in the slice order of ``read_image(series_dir)`` (see
    the module docstring); slice ``k`` is matched to its source instance by ImagePositionPatient,
    never by file name. One segment: SegmentLabel ``label``, category "Morphologically abnormal
    (formerly altered) structure", type "Lesion" (SNOMED CT), algorithm type AUTOMATIC with an
    AlgorithmIdentificationSequence naming ``algorithm`` and ``version``. Empty slices are left out
    of the SEG (readers treat missing frames as empty); an all-empty mask keeps every frame.

    Privacy: the SEG carries only what the standard requires to reference its source: the
    required (Type 1/2) Patient and General Study attributes copied from the source (PatientName,
    PatientID, PatientBirthDate, PatientSex, the study's UID, date, time, ID, AccessionNumber,
    ReferringPhysicianName), the FrameOfReferenceUID and the source instance UIDs. Optional
    patient/study attributes and the source's acquisition equipment (InstitutionName, StationName,
    ...) are removed; SeriesDescription is "medanomaly lesion mask". New Series/SOP Instance UIDs
    are generated for each call.

    The file is written atomically (a temporary file in the same folder, then ``os.replace``).
    """
    _highdicom()
    series_dir, out_path = Path(series_dir), Path(out_path)
    notes: list[str] = []
    try:
        # pydicom validates values lazily, on access: keep its complaints in notes, logged once
        with library_notes(notes):
            _write(series_dir, out_path, np.asarray(mask) != 0, label=label, algorithm=algorithm, version=version)
    except MedanomalyError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom's checks become one user-facing error
        raise MedanomalyError(f"cannot build a DICOM SEG for {series_dir} ({type(exc).__name__}: {exc})") from exc
    for note in dict.fromkeys(notes):
        log.warning("%s: %s", out_path.name, note)
    return out_path


def _write(series_dir: Path, out_path: Path, mask: np.ndarray, *, label: str, algorithm: str, version: str) -> None:
    sources = sorted_series_datasets(series_dir)
    _check_sources(sources, series_dir)
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if mask.shape != shape:
        raise MedanomalyError(f"mask shape {mask.shape} does not match the DICOM series {series_dir} "
                              f"({shape[0]} slices of {shape[1]}x{shape[2]}); give the mask predicted on that series")
    try:
        series_number = int(sources[0].get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        series_number = 1000
    seg = _build(sources, mask, label=label, algorithm=algorithm, version=version, series_number=series_number)
    _strip_to_required(seg)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)


def _build(sources: list[pydicom.Dataset], mask: np.ndarray, *, label: str, algorithm: str, version: str,
           series_number: int):
    hd = _highdicom()

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(label, algorithm, version)],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medanomaly",
        manufacturer_model_name=algorithm,
        software_versions=version,
        device_serial_number="0",
        content_label="MEDANOMALY",
        content_description=SERIES_DESCRIPTION,
        series_description=SERIES_DESCRIPTION,
        omit_empty_frames=bool(mask.any()),  # all-empty: keep the frames rather than a warning
    )


def read_dicom_seg(path: Path, series_dir: Path) -> np.ndarray:
    """The (Z, Y, X) bool mask of a DICOM SEG, in the slice order of ``read_image(series_dir)``.

    Every segment of the SEG is merged (a pixel is True if it belongs to any segment); slices of
    the series that the SEG has no frame for are empty. The SEG must reference ``series_dir``'s
    instances.
    """
    hd = _highdicom()
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001
        raise MedanomalyError(f"cannot read DICOM SEG {path} ({type(exc).__name__}: {exc})") from exc
    sources = sorted_series_datasets(series_dir)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    _check_references(seg, uids, path, Path(series_dir))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               assert_missing_frames_are_empty=True, dtype=np.uint8)
    return pixels.any(axis=-1)


def _check_references(seg, uids: Sequence[str], path: Path, series_dir: Path) -> None:
    referenced = {str(inst.ReferencedSOPInstanceUID) for series in seg.get("ReferencedSeriesSequence", [])
                  for inst in series.get("ReferencedInstanceSequence", [])}
    if not referenced & set(uids):
        raise MedanomalyError(f"DICOM SEG {path} does not reference the series in {series_dir}; "
                              "give the series the segmentation was made on")

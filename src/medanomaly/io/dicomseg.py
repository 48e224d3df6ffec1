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

Identifiers never reach a message or a log: header values are neither logged nor quoted in errors.
The library's exception texts and warnings (which quote the offending value) are replaced by fixed
text naming the attribute's keyword only, and highdicom's own log lines (which name source UIDs) are
silenced while it runs. A copied Type 2 attribute whose value is not valid for its VR (a
PatientBirthDate "1990-13-45", a PatientSex "X") is written empty, as the standard allows for
Type 2, rather than failing; Type 1 references (UIDs) are copied as the source has them, and one
that highdicom refuses is named by keyword.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import DA, TM, VALIDATORS

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

_SEXES = ("", "M", "F", "O")  # PatientSex's enumerated values (C.7.1.1), as highdicom checks them
_PARSED = {"DA": DA, "TM": TM}  # highdicom parses these VRs into dates/times: the value must convert too
_UNSEARCHED_VRS = frozenset({"SQ", "OB", "OW", "OD", "OF", "OL", "OV", "UN"})  # no text to match an error against

log = logging.getLogger(__name__)


@contextmanager
def _quiet(notes: list[str]) -> Iterator[None]:
    """pydicom's and highdicom's complaints into ``notes`` (never logged as such: they quote header
    values), and highdicom's log lines silenced (its info lines name the source instance UIDs)."""
    hd_log = logging.getLogger("highdicom")
    level = hd_log.level
    hd_log.setLevel(logging.CRITICAL + 1)  # its children log through it; its errors come back as exceptions
    try:
        with library_notes(notes):
            yield
    finally:
        hd_log.setLevel(level)


def _log_notes(where: str, notes: list[str]) -> None:
    """Say that the libraries complained, without their text (it quotes header values)."""
    if notes:
        log.warning("%s: pydicom/highdicom reported %d problem(s) with header values (not shown: they may hold "
                    "patient identifiers)", where, len(dict.fromkeys(notes)))


def _keyword_quoted(text: str, datasets: Sequence[pydicom.Dataset]) -> str | None:
    """The keyword of the header attribute whose value ``text`` (a library's error) quotes, if any
    (the longest such value wins); so that a refusal can name the attribute but not its value."""
    best: tuple[int, str] | None = None
    with library_notes([]):  # reading the values again: the same complaints, already counted
        for ds in datasets:
            for elem in ds:
                if elem.VR in _UNSEARCHED_VRS or not elem.keyword:
                    continue
                value = str(elem.value).strip()
                if len(value) >= 3 and value in text and (best is None or len(value) > best[0]):
                    best = (len(value), elem.keyword)
            if best is not None:
                return best[1]
    return None


def _refusal(what: str, exc: Exception, datasets: Sequence[pydicom.Dataset], fix: str) -> MedanomalyError:
    """A library error as a MedanomalyError built from fixed text and a keyword, never its text."""
    keyword = _keyword_quoted(str(exc), datasets)
    detail = (f"pydicom/highdicom refused the value of {keyword} ({type(exc).__name__})" if keyword else
              f"{type(exc).__name__} in pydicom/highdicom")
    return MedanomalyError(f"{what}: {detail} (the library's message is not shown: it may quote patient "
                           f"identifiers); {fix}")


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
    with _quiet(notes):  # pydicom's complaints: counted, not shown (they quote header values)
        datasets = [_read_header(f, folder) for f in series_files(folder)]
        n_series = len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets} - {""})  # none: said later
    _log_notes(str(folder), notes)
    if not datasets:
        raise MedanomalyError(f"{folder} holds no DICOM files")
    if n_series > 1:
        raise MedanomalyError(f"{folder} holds several DICOM series; give each its own folder")
    for ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise MedanomalyError(f"{folder}: {Path(ds.filename).name} lacks ImagePositionPatient/"
                                  "ImageOrientationPatient, so no DICOM SEG can reference the slices")
    normal = _normal(datasets[0])
    pos = np.array([normal @ np.asarray(ds.ImagePositionPatient, float) for ds in datasets])
    order = np.argsort(pos, kind="stable")
    if len(order) > 1 and np.min(np.diff(pos[order])) < 1e-3:
        raise MedanomalyError(f"{folder} has several slices at the same position; keep one volume per folder")
    return [datasets[i] for i in order]


def _read_header(path: Path, folder: Path) -> pydicom.Dataset:
    """One slice's header; a MedanomalyError naming the file (pydicom's text only where it describes
    the file's structure, never for errors that may quote a header value)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError) as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - anything else: its text may quote a value
        reason = f"{type(exc).__name__}; the header is damaged"
    raise MedanomalyError(f"cannot read the DICOM series {folder}: {path.name} is not readable ({reason}); "
                          "remove or re-export that file")


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
    """Type 1 references must be there (copied as they are: they are the source's own); missing or
    invalid Type 2 attributes become empty (in memory only), each said once by keyword, never by value."""
    emptied: dict[str, None] = {}
    for ds in sources:
        name = Path(ds.filename).name
        missing = [k for k in _TYPE1_FROM_SOURCE if not ds.get(k)]
        if missing:
            raise MedanomalyError(f"{folder}: {name} lacks {', '.join(missing)}, which a DICOM "
                                  "SEG needs to reference its source; no DICOM SEG can be made for this series")
        for keyword in _TYPE2_FROM_SOURCE:
            if keyword not in ds:
                setattr(ds, keyword, None)  # empty, as Type 2 allows
            elif not _valid(ds[keyword]):
                ds[keyword].value = None  # made valid by emptying it, as Type 2 allows
                emptied[keyword] = None
    if emptied:
        log.warning("%s: %s of the source series: not a valid DICOM value; written empty in the DICOM SEG (allowed "
                    "for these Type 2 attributes)", folder, ", ".join(emptied))


def _valid(elem: pydicom.DataElement) -> bool:
    """Whether a copied attribute's value is what its VR allows (and what highdicom parses)."""
    value = elem.value
    if value is None or value == "":
        return True
    if elem.VM != 1:  # the attributes copied here are single-valued
        return False
    validator = VALIDATORS.get(elem.VR)
    if validator is not None and not validator(elem.VR, value)[0]:
        return False
    if elem.keyword == "PatientSex" and str(value) not in _SEXES:
        return False
    try:
        _PARSED.get(elem.VR, str)(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _segment_description(label: str, algorithm: str, version: str, number: int = 1):
    hd = _highdicom()
    from pydicom.sr.codedict import codes  # on use: 0.7 s to import, as highdicom

    # SNOMED CT 49755003 "Morphologically abnormal structure" (formerly "Morphologically altered
    # structure", the name in the DICOM CID 7150 segmentation category list) / 52988006 "Lesion".
    return hd.seg.SegmentDescription(
        segment_number=number,
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

    Privacy (module docstring): only the required (Type 1/2) Patient and General Study attributes,
    the FrameOfReferenceUID and the source instance UIDs are copied; invalid Type 2 values are
    written empty; no header value is logged or quoted in an error. New Series/SOP Instance UIDs
    are generated for each call.

    The file is written atomically (a temporary file in the same folder, then ``os.replace``).
    """
    segments = (np.asarray(mask) != 0).astype(np.uint8)
    return write_segments(segments, (label,), series_dir, out_path, algorithm=algorithm, version=version)


def write_segments(segments: np.ndarray, names: Sequence[str], series_dir: Path, out_path: Path, *,
                   algorithm: str = "medanomaly", version: str) -> Path:
    """The writer behind :func:`write_dicom_seg` and :func:`medanomaly.io.dicomseg_labels.write_dicom_seg_labels`:
    ``segments`` (Z, Y, X) holds segment numbers (0: none; ``k``: the segment labelled ``names[k - 1]``),
    each written as a BINARY segment described as in :func:`write_dicom_seg`, with its privacy rules."""
    _highdicom()
    series_dir, out_path = Path(series_dir), Path(out_path)
    notes: list[str] = []
    sources: list[pydicom.Dataset] = []
    try:
        # pydicom validates values lazily, on access: its complaints are counted, never shown
        with _quiet(notes):
            _write(series_dir, out_path, segments, tuple(names), sources, algorithm=algorithm, version=version)
    except MedanomalyError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom's checks become one user-facing error
        raise _refusal(f"cannot build a DICOM SEG for {series_dir}", exc, sources,
                       "repair that attribute in the series, or predict with --no-dicom-seg") from None
    _log_notes(out_path.name, notes)
    return out_path


def _write(series_dir: Path, out_path: Path, mask: np.ndarray, names: tuple[str, ...], sources: list[pydicom.Dataset],
           *, algorithm: str, version: str) -> None:
    """Build and save the SEG; ``sources`` (empty) is filled with the series' datasets, for the
    caller's error message."""
    sources += sorted_series_datasets(series_dir)
    _check_sources(sources, series_dir)
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if mask.shape != shape:
        raise MedanomalyError(f"mask shape {mask.shape} does not match the DICOM series {series_dir} "
                              f"({shape[0]} slices of {shape[1]}x{shape[2]}); give the mask predicted on that series")
    try:
        series_number = int(sources[0].get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        series_number = 1000
    seg = _build(sources, mask, names, algorithm=algorithm, version=version, series_number=series_number)
    _strip_to_required(seg)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)


def _build(sources: list[pydicom.Dataset], mask: np.ndarray, names: tuple[str, ...], *, algorithm: str, version: str,
           series_number: int):
    hd = _highdicom()

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8 if len(names) < 256 else np.uint16),  # segment numbers
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(name, algorithm, version, k + 1) for k, name in enumerate(names)],
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
    return read_segments(path, series_dir)[0].any(axis=-1)


def read_segments(path: Path, series_dir: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """The (Z, Y, X, S) bool pixels of each of the S segments of a DICOM SEG, in the slice order of
    ``read_image(series_dir)`` (as :func:`read_dicom_seg`), and their SegmentLabels in segment order."""
    hd = _highdicom()
    path = Path(path)
    sources = sorted_series_datasets(series_dir)
    notes: list[str] = []
    seg = None
    try:
        with _quiet(notes):
            seg = hd.seg.segread(path)
            uids = [str(ds.SOPInstanceUID) for ds in sources]
            _check_references(seg, uids, path, Path(series_dir))
            pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                                       assert_missing_frames_are_empty=True, dtype=np.uint8)
    except MedanomalyError:
        raise
    except Exception as exc:  # noqa: BLE001 - library errors become one user-facing error, without their text
        raise _refusal(f"cannot read DICOM SEG {path}", exc, [seg, *sources] if seg is not None else sources,
                       "give a DICOM SEG (BINARY or FRACTIONAL) made on this series") from None
    _log_notes(path.name, notes)
    return pixels.astype(bool), tuple(str(item.get("SegmentLabel", "")) for item in seg.SegmentSequence)


def _check_references(seg, uids: Sequence[str], path: Path, series_dir: Path) -> None:
    referenced = {str(inst.ReferencedSOPInstanceUID) for series in seg.get("ReferencedSeriesSequence", [])
                  for inst in series.get("ReferencedInstanceSequence", [])}
    if not referenced & set(uids):
        raise MedanomalyError(f"DICOM SEG {path} does not reference the series in {series_dir}; "
                              "give the series the segmentation was made on")

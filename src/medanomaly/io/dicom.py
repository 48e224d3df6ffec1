"""DICOM reading: single files (single- or multi-frame) and their geometry, and which folders are
DICOM series (read by :mod:`~medanomaly.io.dicom_series`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medanomaly.core.errors import MedanomalyError
from medanomaly.io.dicom_values import _dicom_attr, dicom_values, fill_padding
from medanomaly.io.image import Geometry, _reversed_geometry, full_suffix
from medanomaly.io.safety import library_notes

#: the package's logger, shared by its modules: records keep the name "medanomaly.io"
logger = logging.getLogger("medanomaly.io")

#: Files that may sit in a DICOM series folder without being part of it (notes, sidecars).
_SIDECAR_SUFFIXES = (".txt", ".md", ".rst", ".json", ".xml", ".csv", ".tsv", ".html", ".htm", ".pdf",
                     ".log", ".ini", ".cfg", ".yaml", ".yml", ".rtf", ".doc", ".docx", ".bval", ".bvec")
_SIDECAR_NAMES = ("readme", "license", "licence", "notes", "thumbs.db", "desktop.ini")


def _has_dicm(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_sidecar(p: Path) -> bool:
    """A note or sidecar (README.txt, info.json...) that a DICOM series folder may hold."""
    name = p.name.lower()
    return full_suffix(p) in _SIDECAR_SUFFIXES or Path(name).stem in _SIDECAR_NAMES


def series_files(folder: Path) -> list[Path]:
    """The files of a folder that must be slices if it is a DICOM series: all but hidden
    files, DICOMDIR and notes/sidecars (README.txt, *.json...), which are ignored."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.upper() != "DICOMDIR" and not _is_sidecar(p))


def is_dicom_series_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder whose (non-hidden) files all carry the DICOM preamble
    ('DICM' at byte 128) and the first one holds pixel data. Only the first file is parsed.
    Notes and sidecars (README.txt, *.json, *.xml...) and DICOMDIR are ignored."""
    folder = Path(path)
    try:
        if not folder.is_dir():
            return False
        files = series_files(folder)
        if not files or not all(_has_dicm(f) for f in files):
            return False
        with library_notes([]):  # a probe: its complaints are reported when the series is read
            return "PixelData" in pydicom.dcmread(files[0], defer_size=256)
    except Exception:  # noqa: BLE001 - unreadable or broken simply means "not a series"
        return False


def _numbers(value: Any, n: int) -> np.ndarray | None:
    """``value`` (a DICOM multi-value, list or single value) as ``n`` finite floats, else None
    (missing, another count, not numbers, NaN or inf)."""
    if value is None or (isinstance(value, (str, bytes)) and not value):
        return None
    items = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    try:
        vals = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError, OverflowError):
        return None
    return vals if vals.shape == (n,) and np.isfinite(vals).all() else None


def _dicom_plane(ds: pydicom.Dataset, where: Path | None = None, strict: bool = False,
                 quiet: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """(3x3 LPS direction with columns row/column/normal, (dx, dy), spacing known).

    An invalid ImageOrientationPatient (not two perpendicular unit vectors, NaN...) raises when
    ``strict`` (a series needs it to order its slices), else falls back to the identity with a
    warning; an invalid PixelSpacing (NaN, zero, negative, wrong count) is treated as unknown.
    ``quiet``: no warnings (a series warns once, for the slice that gives its geometry)."""
    iop_raw = _dicom_attr(ds, "ImageOrientationPatient")
    iop = _numbers(iop_raw, 6)
    if iop is not None:
        r, c = iop[:3], iop[3:]
        if min(np.linalg.norm(r), np.linalg.norm(c), np.linalg.norm(np.cross(r, c))) < 0.5:
            iop = None
    if iop is None:
        if iop_raw is not None:
            if strict:
                raise MedanomalyError(f"{where}: ImageOrientationPatient {_shown(iop_raw)} is not two perpendicular "
                                      "unit vectors, so the slices cannot be ordered; fix the header or convert "
                                      "the series with dcm2niix")
            if not quiet:
                logger.warning("%s: invalid ImageOrientationPatient %s; using the identity orientation", where,
                               _shown(iop_raw))
        iop = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    r, c = iop[:3], iop[3:]
    spacing_raw = _dicom_attr(ds, "PixelSpacing") or _dicom_attr(ds, "ImagerPixelSpacing")
    spacing = _numbers(spacing_raw, 2)
    if spacing is not None and (spacing <= 0).any():
        spacing = None
    if spacing is None and spacing_raw is not None and not quiet:
        logger.warning("%s: invalid PixelSpacing %s; the pixel size is treated as unknown", where,
                       _shown(spacing_raw))
    dxdy = np.array([spacing[1], spacing[0]] if spacing is not None else [1.0, 1.0])
    return np.stack([r, c, np.cross(r, c)], axis=1), dxdy, spacing is not None


def _shown(value: Any) -> str:
    text = str(list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dicom_geometry(ds: pydicom.Dataset, shape: tuple[int, ...], dz: float,
                    origin: Any, where: Path | None = None) -> Geometry:
    direction, (dx, dy), known = _dicom_plane(ds, where)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array([dx, dy, dz])
    lps[:3, 3] = np.asarray(origin if origin is not None else (0, 0, 0), float)
    meta = {"lps_affine": lps, "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "")),
            "Modality": str(ds.get("Modality", "")),
            "PhotometricInterpretation": str(ds.get("PhotometricInterpretation", ""))}
    if len(shape) == 2:  # full 3D placement of a single slice: meta["lps_affine"]
        return Geometry("dicom", (float(dy), float(dx)), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), known,
                        meta=meta)
    geo = _reversed_geometry((dx, dy, dz), lps[:3, 3], direction)
    return Geometry("dicom", spacing_known=known, meta=meta, **geo)


def _read_dicom_file(path: Path) -> tuple[np.ndarray, Geometry]:
    ds = pydicom.dcmread(path)
    arr, pad = dicom_values(ds, path)
    fill_padding(arr, pad, path)
    dz_raw = _dicom_attr(ds, "SpacingBetweenSlices") or _dicom_attr(ds, "SliceThickness")
    dz = _numbers(dz_raw, 1)
    dz = abs(float(dz[0])) if dz is not None and dz[0] != 0 else 1.0
    ipp_raw = _dicom_attr(ds, "ImagePositionPatient")
    origin = _numbers(ipp_raw, 3)
    if origin is None and ipp_raw is not None:
        logger.warning("%s: invalid ImagePositionPatient %s; placing the image at the origin", path,
                       _shown(ipp_raw))
    return arr, _dicom_geometry(ds, arr.shape[1:], dz, origin, path)

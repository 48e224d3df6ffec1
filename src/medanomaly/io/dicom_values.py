"""DICOM pixel values as the standard defines them (PS3.3 C.7.6.3, C.11.1, C.7.5.1.1.2): decoded,
padding found on the stored values, the Modality LUT or rescale applied (also from the functional
groups of enhanced multi-frame files), PALETTE COLOR expanded to RGB and MONOCHROME1 inverted, so
that a high value always means a bright pixel."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import JPEG2000TransferSyntaxes

from medanomaly.core.errors import MedanomalyError
from medanomaly.io.safety import _check_size

#: the package's logger, shared by its modules: records keep the name "medanomaly.io"
logger = logging.getLogger("medanomaly.io")

#: photometric interpretations read, with their samples per pixel (YBR* are decoded to RGB by pydicom)
_PHOTOMETRIC = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
                "YBR_FULL_422": 3, "YBR_ICT": 3, "YBR_RCT": 3, "YBR_PARTIAL_420": 3}


def _dicom_attr(ds: pydicom.Dataset, keyword: str) -> Any:
    """An attribute from the top level or the first (shared, then per-frame) functional group."""
    if keyword in ds:
        return ds[keyword].value
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in list(ds.get(group, []))[:1]:
            for elem in item:
                if elem.VR == "SQ" and elem.value and keyword in elem.value[0]:
                    return elem.value[0][keyword].value
    return None


def _dicom_shape(ds: pydicom.Dataset) -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples per pixel) from the header, before decoding."""
    return (int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0),
            int(ds.get("Columns", 0) or 0), int(ds.get("SamplesPerPixel", 1) or 1))


def _check_decoder(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse pixel data that is missing, or compressed with a codec no installed plugin decodes."""
    if "PixelData" not in ds:
        raise MedanomalyError(f"{path} has no DICOM pixel data: it is truncated or a non-image "
                              "object (e.g. a report); give a complete DICOM image instead")
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsuid is None or not tsuid.is_compressed:
        return
    try:
        available = get_decoder(tsuid).is_available
    except NotImplementedError:
        available = False
    if not available:
        pkg = "pylibjpeg pylibjpeg-openjpeg" if tsuid in JPEG2000TransferSyntaxes else "pylibjpeg pylibjpeg-libjpeg"
        raise MedanomalyError(
            f"{path}: DICOM transfer syntax '{tsuid.name}' ({tsuid}) is not supported because "
            f"no decoder for it is installed; install one (pip install {pkg}) or convert the "
            "file to an uncompressed transfer syntax (e.g. gdcmconv --raw)")


def check_photometric(ds: pydicom.Dataset, path: Path) -> str:
    """The file's PhotometricInterpretation, refused when unknown or at odds with SamplesPerPixel."""
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if pi not in _PHOTOMETRIC:
        raise MedanomalyError(f"{path}: PhotometricInterpretation '{pi}' is not read (only "
                              f"{', '.join(_PHOTOMETRIC)}); convert the image, e.g. to MONOCHROME2 or RGB")
    if _PHOTOMETRIC[pi] != samples:
        raise MedanomalyError(f"{path}: PhotometricInterpretation '{pi}' needs {_PHOTOMETRIC[pi]} samples per pixel "
                              f"but SamplesPerPixel is {samples}; the header is inconsistent: fix it or re-export")
    return pi


def _stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    """The smallest and largest stored value that BitsStored and PixelRepresentation allow."""
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _stored_value(value: Any, ds: pydicom.Dataset) -> int:
    """A padding value as a stored value: an SS value read as US (ambiguous VR) made signed again."""
    v = int(value)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) and v >= 2 ** (bits - 1):
        v -= 2**bits
    return v


def _padding(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Pixels that Pixel Padding Value (and Pixel Padding Range Limit, both ends included) mark as
    padding, on the stored values of a grey image; None when the file declares no padding."""
    if "PixelPaddingValue" not in ds or ds.PixelPaddingValue is None:
        return None
    lo = hi = _stored_value(ds.PixelPaddingValue, ds)
    if ds.get("PixelPaddingRangeLimit") is not None:
        lo, hi = sorted((lo, _stored_value(ds.PixelPaddingRangeLimit, ds)))
    pad = (stored >= lo) & (stored <= hi)
    return pad if pad.any() else None


def _modality_source(ds: pydicom.Dataset, frame: int) -> Dataset:
    """The dataset holding the Modality LUT or rescale of ``frame``: the file itself, else the
    Pixel Value Transformation of its per-frame, then shared, functional group (enhanced files)."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return ds
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    groups = per_frame[frame: frame + 1] + list(ds.get("SharedFunctionalGroupsSequence", []))[:1]
    for group in groups:
        seq = group.get("PixelValueTransformationSequence")
        if seq:
            return seq[0]
    return ds


def _rescaled(stored: np.ndarray, source: Dataset, path: Path) -> np.ndarray:
    """``apply_modality_lut``, with a slope that is zero or not finite refused (it would map every
    pixel to one value, or to NaN), and a lone slope or intercept completed by its default."""
    if source.get("ModalityLUTSequence"):
        return apply_modality_lut(stored, source)
    slope, intercept = source.get("RescaleSlope"), source.get("RescaleIntercept")
    if slope is None and intercept is None:
        return stored
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    if not (np.isfinite(slope) and slope != 0 and np.isfinite(intercept)):
        raise MedanomalyError(f"{path}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g} would map every pixel "
                              "to one value or to NaN; fix the header (the slope is usually 1, the intercept 0)")
    lut = Dataset()
    lut.RescaleSlope, lut.RescaleIntercept = slope, intercept
    return apply_modality_lut(stored, lut)


def _modality(stored: np.ndarray, ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored grey values ((H, W) or (F, H, W)) to modality values (e.g. HU), float64."""
    if stored.ndim == 3 and "PerFrameFunctionalGroupsSequence" in ds and _modality_source(ds, 0) is not ds:
        return np.stack([np.asarray(_rescaled(f, _modality_source(ds, i), path), np.float64)
                         for i, f in enumerate(stored)])
    return np.asarray(_rescaled(stored, _modality_source(ds, 0), path), np.float64)


def _inverted(values: np.ndarray, ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """MONOCHROME1 (the smallest value is white) turned into MONOCHROME2 values: mirrored inside
    the modality range of every stored value the header allows, a fixed map, so that the slices of
    a series stay comparable (pydicom's ``apply_presentation_lut`` mirrors about each image's own
    maximum, which differs from slice to slice)."""
    lo, hi = _stored_range(ds)
    ends = np.asarray(_rescaled(np.array([lo, hi]), _modality_source(ds, 0), path), np.float64)
    if ds.get("ModalityLUTSequence") and hi - lo < 2**17:
        ends = np.asarray(apply_modality_lut(np.arange(lo, hi + 1), ds), np.float64)
    return float(ends.min() + ends.max()) - values


def dicom_values(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, padding): the file's pixels as float32 channels first, (C, H, W) or (C, F, H, W)
    for multi-frame, in modality units with high = bright; and the (H, W) / (F, H, W) bool mask
    of its padding pixels (None when it has none), to be filled by :func:`fill_padding`."""
    _check_decoder(ds, path)
    _check_size(path, _dicom_shape(ds), "DICOM image")  # from the header, before decoding
    pi = check_photometric(ds, path)
    stored = ds.pixel_array
    if pi == "PALETTE COLOR":
        arr = np.asarray(apply_color_lut(stored, ds), np.float32)
        return np.moveaxis(arr, -1, 0), None
    if _PHOTOMETRIC[pi] == 3:
        return np.moveaxis(np.asarray(stored, np.float32), -1, 0), None
    pad = _padding(stored, ds)
    values = _modality(stored, ds, path)
    if pi == "MONOCHROME1":
        values = _inverted(values, ds, path)
    return np.asarray(values, np.float32)[None], pad


def fill_padding(arr: np.ndarray, pad: np.ndarray | None, where: Path) -> np.ndarray:
    """Set the padding pixels (``pad``, the spatial shape of ``arr`` (C, ...)) to the smallest value
    of the other pixels, in place: padding is not tissue, and its stored value (often -2000, or the
    largest value) would otherwise read as an intensity. Returns ``arr``."""
    if pad is None or not pad.any():
        return arr
    rest = arr[:, ~pad]
    fill = float(rest.min()) if rest.size else 0.0
    arr[:, pad] = fill
    logger.info("%s: %d padding pixels (Pixel Padding Value) set to %g, the darkest other value", where,
                int(pad.sum()), fill)
    return arr

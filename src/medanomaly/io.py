"""Read medical images and masks, and write masks and anomaly scores next to them.

Every reader returns an :class:`Image` whose ``array`` is float32, channels first:
``(C, H, W)`` for 2D and ``(C, Z, Y, X)`` for 3D. Spatial geometry is kept in array axis order:
``spacing``, ``origin`` and ``direction`` are all reversed from the ITK/DICOM (x, y, z) order, so
``world_zyx = origin + D @ diag(spacing) @ index_zyx``. :func:`affine_from_geometry` gives the usual
4x4 RAS affine on (x, y, z) indices. Every reading problem is raised as :class:`MedanomalyError`.

Images larger than :data:`MAX_PIXELS` values (voxels x channels) are refused from the header,
before any pixel is decoded, so a crafted or corrupt header cannot exhaust memory.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
import tifffile
from PIL import Image as PILImage
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import JPEG2000TransferSyntaxes

from medanomaly.errors import MedanomalyError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii",
                                   ".nii.gz", ".nrrd", ".nhdr", ".dcm", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_MAX_LABEL = 10
#: Largest image read, in values (voxels x channels): 2**28 = 268 million, 1 GiB as float32
#: (e.g. a 16384 x 16384 grey slice, 9459 x 9459 RGB, or a 645^3 volume). Checked from the
#: header before decoding. Read at call time, so it can be raised: ``medanomaly.io.MAX_PIXELS = ...``.
MAX_PIXELS = 2**28
#: Files that may sit in a DICOM series folder without being part of it (notes, sidecars).
_SIDECAR_SUFFIXES = (".txt", ".md", ".rst", ".json", ".xml", ".csv", ".tsv", ".html", ".htm", ".pdf",
                     ".log", ".ini", ".cfg", ".yaml", ".yml", ".rtf", ".doc", ".docx", ".bval", ".bvec")
_SIDECAR_NAMES = ("readme", "license", "licence", "notes", "thumbs.db", "desktop.ini")


def _check_size(path: Path, shape: Any, what: str = "image") -> None:
    """Refuse an image of ``shape`` (sizes of every axis, channels included) above MAX_PIXELS,
    or with a negative or zero size, before its pixels are decoded."""
    dims = [int(s) for s in shape]
    if any(d <= 0 for d in dims):
        raise MedanomalyError(f"{path}: the header gives the {what} size {'x'.join(map(str, dims))}, "
                              "with an empty axis; the file is damaged or holds no pixels: re-export it")
    n = 1
    for d in dims:
        n *= d  # Python ints: no overflow on crafted headers
    if n > MAX_PIXELS:
        raise MedanomalyError(
            f"{path}: the header gives the {what} size {'x'.join(map(str, dims))} = {n:,} values, above "
            f"the limit of {MAX_PIXELS:,} (medanomaly.io.MAX_PIXELS); if the header is right, crop or "
            "downsample the image first (if it is wrong, the file is damaged: re-export it)")


def full_suffix(path: str | Path) -> str:
    """Lower-case suffix of ``path``, treating ``.nii.gz`` as one suffix ("" if none)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | Path) -> str:
    """File name of ``path`` without :func:`full_suffix` (``a.nii.gz`` -> ``a``)."""
    name, suffix = Path(path).name, full_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


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


def _series_files(folder: Path) -> list[Path]:
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
        files = _series_files(folder)
        if not files or not all(_has_dicm(f) for f in files):
            return False
        with _library_notes([]):  # a probe: its complaints are reported when the series is read
            return "PixelData" in pydicom.dcmread(files[0], defer_size=256)
    except Exception:  # noqa: BLE001 - unreadable or broken simply means "not a series"
        return False


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class Geometry:
    """Where the voxels are. ``spacing`` (mm), ``origin`` (mm, LPS for DICOM/NRRD/ITK, RAS for
    NIfTI) and the row-major ndim x ndim ``direction`` are all in array axis order, e.g. (z, y, x).
    Rasters and single 2D DICOM slices have origin 0 and identity direction; a DICOM slice keeps
    its full 3D placement in ``meta["lps_affine"]`` (4x4, (col, row, slice) index -> LPS mm)."""

    kind: str
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    spacing_known: bool
    affine: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def voxel_volume_mm(self) -> float | None:
        """Voxel volume in mm^3 (pixel area in mm^2 for 2D), or None if spacing is unknown."""
        return float(np.prod(self.spacing)) if self.spacing_known else None


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class Image:
    """A float32 channels-first array ((C, H, W) or (C, Z, Y, X)) with its geometry and file."""

    array: np.ndarray
    geometry: Geometry
    path: Path

    @property
    def ndim_spatial(self) -> int:
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])


def _reversed_geometry(spacing: Any, origin: Any, direction_xyz: np.ndarray) -> dict:
    """ITK-order (x, y, z) geometry -> Geometry fields in array axis order."""
    d = np.asarray(direction_xyz, dtype=float)[::-1, ::-1]
    return {"spacing": tuple(float(s) for s in reversed(tuple(spacing))),
            "origin": tuple(float(o) for o in reversed(tuple(origin))),
            "direction": tuple(float(v) for v in d.ravel())}


def _raster_geometry(meta: dict) -> Geometry:
    return Geometry("raster", (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False, meta=meta)


def _open_pillow(path: Path) -> PILImage.Image:
    """PILImage.open with Pillow's own decompression-bomb check replaced by MAX_PIXELS (checked
    by the caller from the header, with a message that says what to do)."""
    saved = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = None
    try:
        return PILImage.open(path)
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved


def _read_pillow(path: Path) -> tuple[np.ndarray, Geometry]:
    with _open_pillow(path) as im:
        _check_size(path, (len(im.getbands()), im.height, im.width))
        im.load()
        mode, info = im.mode, dict(im.info)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in info else "RGB")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            logger.info("%s: dropping the alpha channel of a %s image", path, mode)
            im = im.convert("RGB" if im.mode.startswith(("RGB", "P")) else "L")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    meta = {"mode": mode, "dtype": str(arr.dtype), "bits": 1 if mode == "1" else arr.itemsize * 8,
            "dpi": info.get("dpi")}
    return arr, _raster_geometry(meta)


def _read_tiff(path: Path) -> tuple[np.ndarray, Geometry]:
    with tifffile.TiffFile(path) as tf:
        if not tf.series:
            raise MedanomalyError(f"{path}: the TIFF holds no image; re-export it")
        series = tf.series[0]
        _check_size(path, series.shape)
        arr, axes, photometric = series.asarray(), series.axes, tf.pages[0].photometric
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and axes.endswith("S"):
        if arr.shape[-1] == 4 and photometric == tifffile.PHOTOMETRIC.RGB:
            logger.info("%s: dropping the alpha channel of an RGBA TIFF", path)
            arr = arr[..., :3]
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim != 3:
        raise MedanomalyError(f"{path}: TIFF layout {axes} {arr.shape} is not supported; expected "
                              "a 2D image (H, W), (H, W, C) or a stack of channel pages (C, H, W)")
    meta = {"dtype": str(arr.dtype), "bits": arr.itemsize * 8, "axes": axes}
    return arr, _raster_geometry(meta)


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    img = nib.load(str(path))
    _check_size(path, img.header.get_data_shape())
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector images: (X, Y, Z, 1, C)
        data = data[:, :, :, 0]
    if data.ndim not in (3, 4):
        raise MedanomalyError(f"{path}: NIfTI with shape {data.shape} is not supported; expected "
                              "a 3D volume (X, Y, Z) or one with channels (X, Y, Z, C)")
    arr = data.transpose(2, 1, 0)[None] if data.ndim == 3 else data.transpose(3, 2, 1, 0)
    affine = np.array(img.affine)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / np.where(lengths > 0, lengths, 1.0)
    meta = {"header": img.header.copy(), "dtype": str(img.get_data_dtype())}
    if not (np.isfinite(affine).all() and np.isfinite(zooms).all()):
        raise MedanomalyError(f"{path}: the header gives a non-finite affine or voxel size (NaN/inf in pixdim, "
                              "srow or quatern); fix the header (e.g. with nibabel) or re-export the image")
    geo = _reversed_geometry(zooms, affine[:3, 3], direction)
    return arr, Geometry("nifti", spacing_known=True, affine=affine, meta=meta, **geo)


@contextmanager
def _capture_fd2(notes: list[str]) -> Iterator[None]:
    """Collect into ``notes`` what C++ code (ITK's MetaIO, NRRD readers) prints straight on file
    descriptor 2 while reading, instead of letting loose lines reach the terminal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(4096).decode("utf-8", "replace").strip()
            if text:
                notes.append(" ".join(text.split()))


def _itk_reason(exc: Exception, notes: list[str]) -> str:
    """The useful part of a SimpleITK exception ('ITK ERROR: Class(0x..): what'), with what the
    C++ reader printed, on one line (ITK's 'Reason: <errno>' is stale and misleading: dropped)."""
    text = str(exc)
    text = text.split("ITK ERROR:", 1)[1] if "ITK ERROR:" in text else text
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = re.sub(r"\s*Reason:.*$", "", text, flags=re.S)
    return "; ".join([" ".join(text.split())] + notes)


_HEADER_BYTES = 1 << 16
_MAX_DATA_FILES = 100_000


def _is_nrrd(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"NRRD"


def _itk_data_files(path: Path) -> list[Path]:
    """The detached data files that an NRRD or MetaImage header names ('data file:' /
    'ElementDataFile ='), resolved beside the header: a single name, a LIST of names, or a
    printf pattern with min max step. [] for data inside the file (LOCAL, or none named)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES).decode("latin-1")
    lines = head.splitlines()
    is_nrrd = head.startswith("NRRD")
    key = re.compile(r"^\s*(data ?file)\s*:\s*(.*)$" if is_nrrd else r"^\s*ElementDataFile\s*[=:]\s*(.*)$", re.I)
    for i, line in enumerate(lines):
        if is_nrrd and not line.strip():
            break  # the end of an NRRD header
        m = key.match(line)
        if not m:
            continue
        value = m.group(m.lastindex).strip()
        words = value.split()
        if not words or words[0].upper() == "LOCAL":
            return []
        if words[0].upper() == "LIST":
            names = [ln.strip() for ln in lines[i + 1:] if ln.strip()]
        elif len(words) >= 4 and "%" in words[0]:  # pattern min max step [subdim]
            lo, hi, step = (int(w) for w in words[1:4])
            if step == 0 or (hi - lo) // step + 1 > _MAX_DATA_FILES:
                raise MedanomalyError(f"{path}: the header names the data files '{value}', an invalid or "
                                      f"too long sequence; fix the header")
            names = [words[0] % k for k in range(lo, hi + (1 if step > 0 else -1), step)]
        else:
            names = [value]
        return [Path(n) if os.path.isabs(n) else path.parent / n for n in names[:_MAX_DATA_FILES]]
    return []


def _metaimage_fields(path: Path) -> dict[str, str]:
    """The 'Key = Value' fields of a MetaImage header, up to ElementDataFile (the last one)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES).decode("latin-1")
    fields: dict[str, str] = {}
    for line in head.splitlines():
        m = re.match(r"^\s*(\w+)\s*[=:]\s*(.*?)\s*$", line)
        if m:
            fields.setdefault(m.group(1), m.group(2))
            if m.group(1) == "ElementDataFile":
                break
    return fields


def _check_metaimage_header(path: Path) -> None:
    """Check the fields that size MetaIO's arrays before ITK parses them: a negative or large
    NDims, or a DimSize that does not match it, crashes the process (segmentation fault, heap
    corruption) inside ITK's MetaIO, where no exception can be caught."""
    fields = _metaimage_fields(path)
    ndims, sizes = fields.get("NDims", ""), fields.get("DimSize", "").split()
    fix = "fix the header or re-export the image"
    if not re.fullmatch(r"[23]", ndims):
        raise MedanomalyError(f"{path}: MetaImage header has NDims = {ndims or '(missing)'}; only 2D and 3D images "
                              f"(NDims = 2 or 3) are read; {fix}")
    if len(sizes) != int(ndims) or not all(re.fullmatch(r"\d{1,10}", v) for v in sizes):
        raise MedanomalyError(f"{path}: MetaImage header has DimSize = {' '.join(sizes) or '(missing)'}, which is "
                              f"not {ndims} non-negative whole numbers; {fix}")
    channels = fields.get("ElementNumberOfChannels", "1")
    if not re.fullmatch(r"\d{1,6}", channels) or int(channels) < 1:
        raise MedanomalyError(f"{path}: MetaImage header has ElementNumberOfChannels = {channels}; {fix}")


def _check_itk_data_files(path: Path) -> None:
    """Refuse a header whose data file is missing or not a regular file: a FIFO, a device
    (/dev/stdin, /dev/zero) or a folder would make the reader block or read forever."""
    suffix = full_suffix(path)
    if suffix not in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return
    if suffix in (".mha", ".mhd"):
        _check_metaimage_header(path)
    elif not _is_nrrd(path):
        raise MedanomalyError(f"cannot read {path}: it does not start with 'NRRD', so it is not an NRRD file (or "
                              "it is damaged); re-export it")
    for f in _itk_data_files(path):
        if not f.exists():
            raise MedanomalyError(f"{path}: the data file {f} named in its header does not exist; put it "
                                  "beside the header (or fix 'data file'/'ElementDataFile' in the header)")
        if not f.is_file():
            raise MedanomalyError(f"{path}: the data file {f} named in its header is not a regular file "
                                  "(a pipe, device or folder); point the header at the image data file")


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    _check_itk_data_files(path)
    notes: list[str] = []
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _capture_fd2(notes):
            reader.ReadImageInformation()  # the header only: check the size before reading pixels
            _check_size(path, (*reader.GetSize(), reader.GetNumberOfComponents()))
            img = reader.Execute()
    except RuntimeError as exc:  # SimpleITK's only exception type
        raise RuntimeError(_itk_reason(exc, notes)) from exc
    for note in notes:
        logger.warning("%s: %s", path, note)
    ndim = img.GetDimension()
    if ndim not in (2, 3):
        raise MedanomalyError(f"{path}: {ndim}D images are not supported; expected 2D or 3D")
    arr = sitk.GetArrayFromImage(img)
    arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    kind = "nrrd" if full_suffix(path) in (".nrrd", ".nhdr") else "itk"
    geo = _reversed_geometry(img.GetSpacing(), img.GetOrigin(),
                             np.reshape(img.GetDirection(), (ndim, ndim)))
    meta = {"pixel_type": img.GetPixelIDTypeAsString()}
    return arr, Geometry(kind, spacing_known=True, meta=meta, **geo)


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


def _dicom_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Decoded, rescaled pixels: (C, H, W) or (C, F, H, W) for multi-frame."""
    if "PixelData" not in ds:
        raise MedanomalyError(f"{path} has no DICOM pixel data: it is truncated or a non-image "
                              "object (e.g. a report); give a complete DICOM image instead")
    tsuid = ds.file_meta.get("TransferSyntaxUID")
    if tsuid is not None and tsuid.is_compressed:
        try:
            available = get_decoder(tsuid).is_available
        except NotImplementedError:
            available = False
        if not available:
            pkg = ("pylibjpeg pylibjpeg-openjpeg" if tsuid in JPEG2000TransferSyntaxes
                   else "pylibjpeg pylibjpeg-libjpeg")
            raise MedanomalyError(
                f"{path}: DICOM transfer syntax '{tsuid.name}' ({tsuid}) is not supported because "
                f"no decoder for it is installed; install one (pip install {pkg}) or convert the "
                "file to an uncompressed transfer syntax (e.g. gdcmconv --raw)")
    _check_size(path, _dicom_shape(ds), "DICOM image")
    arr = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    return np.moveaxis(arr, -1, 0) if int(ds.get("SamplesPerPixel", 1)) > 1 else arr[None]


def _dicom_shape(ds: pydicom.Dataset) -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples per pixel) from the header, before decoding."""
    return (int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0),
            int(ds.get("Columns", 0) or 0), int(ds.get("SamplesPerPixel", 1) or 1))


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


def _dicom_plane(ds: pydicom.Dataset, where: Path | None = None,
                 strict: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """(3x3 LPS direction with columns row/column/normal, (dx, dy), spacing known).

    An invalid ImageOrientationPatient (not two perpendicular unit vectors, NaN...) raises when
    ``strict`` (a series needs it to order its slices), else falls back to the identity with a
    warning; an invalid PixelSpacing (NaN, zero, negative, wrong count) is treated as unknown."""
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
            logger.warning("%s: invalid ImageOrientationPatient %s; using the identity orientation", where,
                           _shown(iop_raw))
        iop = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    r, c = iop[:3], iop[3:]
    spacing_raw = _dicom_attr(ds, "PixelSpacing") or _dicom_attr(ds, "ImagerPixelSpacing")
    spacing = _numbers(spacing_raw, 2)
    if spacing is not None and (spacing <= 0).any():
        spacing = None
    if spacing is None and spacing_raw is not None:
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
    arr = _dicom_pixels(ds, path)
    dz_raw = _dicom_attr(ds, "SpacingBetweenSlices") or _dicom_attr(ds, "SliceThickness")
    dz = _numbers(dz_raw, 1)
    dz = abs(float(dz[0])) if dz is not None and dz[0] != 0 else 1.0
    ipp_raw = _dicom_attr(ds, "ImagePositionPatient")
    origin = _numbers(ipp_raw, 3)
    if origin is None and ipp_raw is not None:
        logger.warning("%s: invalid ImagePositionPatient %s; placing the image at the origin", path,
                       _shown(ipp_raw))
    return arr, _dicom_geometry(ds, arr.shape[1:], dz, origin, path)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    datasets = [(f, pydicom.dcmread(f)) for f in _series_files(folder)]
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(uids) > 1:
        raise MedanomalyError(f"{folder} holds {len(uids)} DICOM series; give each its own folder")
    for f, ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise MedanomalyError(f"{f} lacks ImagePositionPatient/ImageOrientationPatient, so the "
                                  f"slices of {folder} cannot be ordered; convert it with dcm2niix")
    normal = _dicom_plane(datasets[0][1], datasets[0][0], strict=len(datasets) > 1)[0][:, 2]
    positions = [_numbers(ds.ImagePositionPatient, 3) for _, ds in datasets]
    for (f, ds), xyz in zip(datasets, positions):
        if xyz is None:
            raise MedanomalyError(f"{f}: ImagePositionPatient {_shown(ds.ImagePositionPatient)} is not 3 numbers, so "
                                  f"the slices of {folder} cannot be ordered; fix the header or remove the slice")
    pos = np.array([normal @ xyz for xyz in positions])
    order = np.argsort(pos, kind="stable")
    steps = np.diff(pos[order])
    if len(datasets) > 1 and np.min(steps) < 1e-3:
        k = int(np.argmin(steps))
        a, b = (datasets[order[i]][0].name for i in (k, k + 1))
        raise MedanomalyError(f"{folder} has several slices at the same position ({a} and {b}, at "
                              f"{pos[order[k]]:.2f} mm: a duplicated slice, or several echoes, time points "
                              "or series?); remove the duplicates, keep one volume per folder")
    shapes = [_dicom_shape(ds) for _, ds in datasets]
    odd = next((i for i in order if shapes[i] != shapes[order[0]]), None)
    if odd is not None:
        sizes = ["x".join(map(str, shapes[i][1:3])) for i in (odd, order[0])]
        raise MedanomalyError(f"{folder}: slice {datasets[odd][0].name} is {sizes[0]} but "
                              f"{datasets[order[0]][0].name} is {sizes[1]} (or they differ in frames or "
                              "channels); keep one single-frame series of one size per folder")
    _check_size(folder, (len(datasets), *shapes[order[0]]), "DICOM series")
    dz = float(np.median(steps)) if len(steps) else 1.0
    if len(steps) and np.ptp(steps) > 0.01 * dz:
        logger.warning("%s: uneven slice spacing (%.3f-%.3f mm)", folder, steps.min(), steps.max())
    slices = [_dicom_pixels(datasets[i][1], datasets[i][0]) for i in order]
    if len({s.shape for s in slices}) > 1 or slices[0].ndim != 3:
        raise MedanomalyError(f"{folder}: slices differ in size or are multi-frame; keep one "
                              "single-frame series per folder (or read multi-frame files alone)")
    arr = np.stack(slices, axis=1)
    first = datasets[order[0]][1]
    return arr, _dicom_geometry(first, arr.shape[1:], dz, positions[order[0]], folder)


_READERS: dict[str, Callable[[Path], tuple[np.ndarray, Geometry]]] = {
    ".png": _read_pillow, ".jpg": _read_pillow, ".jpeg": _read_pillow, ".bmp": _read_pillow,
    ".tif": _read_tiff, ".tiff": _read_tiff, ".nii": _read_nifti, ".nii.gz": _read_nifti,
    ".nrrd": _read_itk, ".nhdr": _read_itk, ".mha": _read_itk, ".mhd": _read_itk,
    ".dcm": _read_dicom_file}


def _pick_reader(p: Path) -> Callable[[Path], tuple[np.ndarray, Geometry]]:
    """The reader for ``p``; PermissionError (unreadable file or folder) passes through."""
    if p.is_dir():
        os.listdir(p)  # PermissionError here, rather than "not a DICOM series"
        if not is_dicom_series_dir(p):
            raise MedanomalyError(f"{p} is a folder but not a DICOM series (all its files must be "
                                  "DICOM images of one series; notes such as README.txt are ignored); "
                                  "give an image file or a folder holding one DICOM series instead")
        return _read_dicom_series
    if not p.is_file():
        if p.exists():
            raise MedanomalyError(f"{p} is not a regular file (a pipe, socket or device); give an image file")
        if p.is_symlink():
            raise MedanomalyError(f"{p} is a broken symbolic link (or a link loop); point it at an image")
        raise MedanomalyError(f"{p} does not exist; check the path")
    with open(p, "rb"):  # PermissionError here, whatever the reader library would say
        pass
    if p.stat().st_size == 0:
        raise MedanomalyError(f"{p} is empty (0 bytes); re-copy or re-export the file")
    reader = _READERS.get(full_suffix(p)) or (_read_dicom_file if _has_dicm(p) else None)
    if reader is None:
        raise MedanomalyError(f"{p}: unsupported file type '{full_suffix(p)}'; supported: "
                              f"{', '.join(IMAGE_SUFFIXES)} or a folder holding one DICOM series")
    return reader


def _permission_error(p: Path, exc: PermissionError) -> MedanomalyError:
    where = exc.filename or p
    return MedanomalyError(f"permission denied: {where}; make it readable for this user "
                           "(chmod u+r, or u+rx for a folder) or copy it somewhere readable")


def _to_float32(raw: np.ndarray, p: Path) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype.kind not in "biuf":
        kind = "complex" if raw.dtype.kind == "c" else f"'{raw.dtype}'"
        raise MedanomalyError(f"{p} holds {kind} pixel values, which medanomaly does not read; save "
                              "the magnitude (or a grey/RGB image) as real numbers instead")
    return np.ascontiguousarray(raw, dtype=np.float32)


#: loggers of the reading libraries whose records are collected while a file is read
_LIBRARY_LOGGERS = ("pydicom", "tifffile", "nibabel", "nibabel.global")


class _Collect(logging.Filter):
    def __init__(self, notes: list[str]) -> None:
        super().__init__()
        self.notes = notes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.notes.append(" ".join(record.getMessage().split()))
        return False


@contextmanager
def _library_notes(notes: list[str]) -> Iterator[None]:
    """Collect the Python warnings and the log records of the reading libraries (pydicom both
    warns and logs each complaint) into ``notes``, so that :func:`read_image` reports each once,
    on one line naming the file (or not at all when the read fails with its own error)."""
    collect = _Collect(notes)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    for lg in loggers:
        lg.addFilter(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(collect)
        notes.extend(" ".join(str(w.message).split()) for w in caught)


def read_image(path: str | Path) -> Image:
    """Read a 2D/3D image file or a DICOM series folder as a float32 channels-first Image.

    Shapes: rasters (C, H, W) with C in {1, 3}; volumes and DICOM series (C, Z, Y, X).
    DICOM values are rescaled to modality units (e.g. HU); other values are kept as stored.
    Raises :class:`MedanomalyError` (and nothing else) for any file it cannot read, including
    images above :data:`MAX_PIXELS` values (refused from the header) and unreadable files.
    """
    p = Path(path)
    notes: list[str] = []
    try:
        with _library_notes(notes):
            reader = _pick_reader(p)
            raw, geometry = reader(p)
            arr = _to_float32(raw, p)
    except MedanomalyError:
        raise
    except PermissionError as exc:
        raise _permission_error(p, exc) from exc
    except Exception as exc:  # noqa: BLE001 - library errors become one user-facing error
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        msg = f"cannot read {p} ({type(exc).__name__}: {detail}); the file is damaged, truncated"
        raise MedanomalyError(msg + " or not the image type its name says; re-export it") from exc
    for note in dict.fromkeys(notes):  # once each, naming the file
        logger.warning("%s: %s", p, note)
    g = geometry
    if not (np.isfinite([*g.spacing, *g.origin, *g.direction]).all() and min(g.spacing) > 0):
        raise MedanomalyError(f"{p}: the header gives an invalid geometry (spacing {g.spacing}, origin {g.origin}); "
                              "fix the header or re-export the image")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise MedanomalyError(f"{p} contains {bad} NaN/inf voxels; fix the file or replace them, "
                              "e.g. with numpy.nan_to_num")
    return Image(arr, geometry, p)


def _check_mask_values(values: np.ndarray, path: Path) -> None:
    nonzero = values[values != 0]
    if nonzero.size <= 1 and not (values < 0).any():
        return
    if (values >= 0).all() and np.all(values == np.round(values)) and values.max() <= _MAX_LABEL:
        return
    shown = ",".join(f"{v:g}" for v in values[:8]) + (",..." if values.size > 8 else "")
    hint = " (JPEG compression blurs masks: store them as PNG)" if full_suffix(path) in (
        ".jpg", ".jpeg") else ""
    raise MedanomalyError(f"mask {path} has values {{{shown}}}; expected {{0,1}} or {{0,255}}, "
                          f"one non-zero value, or integer labels 1..{_MAX_LABEL} (non-zero = "
                          f"lesion){hint}; re-export the mask as a binary image")


def read_mask(path: str | Path, like: Image | None = None) -> np.ndarray:
    """Read a mask as a bool array of spatial shape ((H, W) or (Z, Y, X)); True = lesion.

    Multi-channel masks use channel 0 if all channels agree, else their maximum. If ``like`` is
    given, the mask must have its spatial shape.
    """
    img = read_image(path)
    arr = img.array
    agree = all(np.array_equal(arr[0], arr[i]) for i in range(1, arr.shape[0]))
    mask = arr[0] if agree else arr.max(axis=0)
    if like is not None and mask.shape != like.spatial_shape:
        sizes = ["x".join(map(str, shape)) for shape in (mask.shape, like.spatial_shape)]
        raise MedanomalyError(f"mask {sizes[0]} does not match image {sizes[1]}: {img.path} vs "
                              f"{like.path}; resample the mask or fix the pairing")
    _check_mask_values(np.unique(mask), img.path)
    return mask != 0


def mask_suffix(like: Image) -> str:
    """Suffix of written masks: .png (raster), .nii.gz (NIfTI, DICOM), .nrrd (NRRD), .mha (ITK)."""
    return {"raster": ".png", "nrrd": ".nrrd", "itk": ".mha"}.get(like.geometry.kind, ".nii.gz")


def score_suffix(like: Image) -> str:
    """Suffix of written score maps: .tif (float32) for rasters, else :func:`mask_suffix`."""
    return ".tif" if like.geometry.kind == "raster" else mask_suffix(like)


def affine_from_geometry(g: Geometry) -> np.ndarray:
    """4x4 RAS affine mapping (x, y, z) = (column, row, slice) indices to mm.

    NIfTI: ``g.affine``. DICOM/NRRD/ITK: the LPS geometry with the first two rows negated
    (as nibabel and dcm2niix do). Rasters: spacing on the diagonal, no flip. 2D -> z step 1.
    """
    if g.kind == "nifti" and g.affine is not None:
        return np.array(g.affine, dtype=float)
    if g.kind == "dicom" and "lps_affine" in g.meta:
        return _LPS_TO_RAS @ np.asarray(g.meta["lps_affine"], float)
    n = len(g.spacing)
    direction = np.eye(3)
    direction[:n, :n] = np.reshape(g.direction, (n, n))[::-1, ::-1]
    spacing = np.ones(3)
    spacing[:n] = g.spacing[::-1]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:n, 3] = g.origin[::-1]
    return affine if g.kind == "raster" else _LPS_TO_RAS @ affine


def _atomic_write(final: Path, write: Callable[[Path], None]) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{secrets.token_hex(4)}-{final.name}"  # same folder, same suffix
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _write_nifti(data: np.ndarray, like: Image, tmp: Path) -> None:
    xyz = (data[None] if data.ndim == 2 else data).transpose(2, 1, 0)
    g = like.geometry
    if g.kind == "nifti":
        header = g.meta["header"].copy()
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = cls(xyz, g.affine, header=header)
    else:
        img = nib.Nifti1Image(xyz, affine_from_geometry(g))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        img.header.set_xyzt_units("mm")
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    nib.save(img, str(tmp))


def _write_itk(data: np.ndarray, like: Image, tmp: Path) -> None:
    img = sitk.GetImageFromArray(data)
    n = data.ndim
    g = like.geometry
    img.SetSpacing(tuple(reversed(g.spacing)))
    img.SetOrigin(tuple(reversed(g.origin)))
    img.SetDirection(tuple(np.reshape(g.direction, (n, n))[::-1, ::-1].ravel()))
    sitk.WriteImage(img, str(tmp), True)


def _write(data: np.ndarray, like: Image, out_stem: str | Path, suffix: str, what: str) -> Path:
    if data.shape != like.spatial_shape:
        raise ValueError(f"{what} shape {data.shape} != image spatial shape {like.spatial_shape}")
    writers: dict[str, Callable[[Path], None]] = {
        ".png": lambda t: PILImage.fromarray(data * 255).save(t, format="PNG"),
        ".tif": lambda t: tifffile.imwrite(t, data),
        ".nii.gz": lambda t: _write_nifti(data, like, t)}
    writer = writers.get(suffix, lambda t: _write_itk(data, like, t))
    final = Path(str(out_stem) + suffix)
    return _atomic_write(final, writer)


def write_mask(mask: np.ndarray, like: Image, out_stem: str | Path) -> Path:
    """Write a bool/uint8 mask of ``like.spatial_shape`` (non-zero = lesion) atomically to
    ``out_stem + mask_suffix(like)`` and return that path.

    Rasters: 8-bit PNG with values 0/255. NIfTI: uint8 0/1 with the input's exact affine and
    header. NRRD/ITK: uint8 0/1 with spacing, origin and direction copied. DICOM (2D or series):
    uint8 0/1 NIfTI whose affine is the DICOM LPS geometry converted to RAS (first two rows
    negated, as nibabel and dcm2niix do).
    """
    data = (np.asarray(mask) != 0).astype(np.uint8)
    return _write(data, like, out_stem, mask_suffix(like), "mask")


def write_score(score: np.ndarray, like: Image, out_stem: str | Path) -> Path:
    """Write a float32 anomaly score map of ``like.spatial_shape`` atomically to
    ``out_stem + score_suffix(like)`` and return that path (float32 TIFF for rasters, otherwise
    the same format and geometry as :func:`write_mask`)."""
    data = np.ascontiguousarray(score, dtype=np.float32)
    return _write(data, like, out_stem, score_suffix(like), "score")

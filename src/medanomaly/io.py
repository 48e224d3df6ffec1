"""Read medical images and masks, and write masks and anomaly scores next to them.

Every reader returns an :class:`Image` whose ``array`` is float32, channels first:
``(C, H, W)`` for 2D and ``(C, Z, Y, X)`` for 3D. Spatial geometry is kept in array axis order:
``spacing``, ``origin`` and ``direction`` are all reversed from the ITK/DICOM (x, y, z) order, so
``world_zyx = origin + D @ diag(spacing) @ index_zyx``. :func:`affine_from_geometry` gives the usual
4x4 RAS affine on (x, y, z) indices. Every reading problem is raised as :class:`MedanomalyError`.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.upper() != "DICOMDIR")


def is_dicom_series_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder whose (non-hidden) files all carry the DICOM preamble
    ('DICM' at byte 128) and the first one holds pixel data. Only the first file is parsed."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    files = _series_files(folder)
    if not files or not all(_has_dicm(f) for f in files):
        return False
    try:
        return "PixelData" in pydicom.dcmread(files[0], defer_size=256)
    except Exception:  # noqa: BLE001 - a broken file simply means "not a series"
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


def _read_pillow(path: Path) -> tuple[np.ndarray, Geometry]:
    with PILImage.open(path) as im:
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
        series = tf.series[0]
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
    geo = _reversed_geometry(zooms, affine[:3, 3], direction)
    return arr, Geometry("nifti", spacing_known=True, affine=affine, meta=meta, **geo)


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    img = sitk.ReadImage(str(path))
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
    arr = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    return np.moveaxis(arr, -1, 0) if int(ds.get("SamplesPerPixel", 1)) > 1 else arr[None]


def _dicom_plane(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, bool]:
    """(3x3 LPS direction with columns row/column/normal, (dx, dy), spacing known)."""
    iop = _dicom_attr(ds, "ImageOrientationPatient") or (1, 0, 0, 0, 1, 0)
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    spacing = _dicom_attr(ds, "PixelSpacing") or _dicom_attr(ds, "ImagerPixelSpacing")
    dxdy = np.array([float(spacing[1]), float(spacing[0])] if spacing else [1.0, 1.0])
    return np.stack([r, c, np.cross(r, c)], axis=1), dxdy, spacing is not None


def _dicom_geometry(ds: pydicom.Dataset, shape: tuple[int, ...], dz: float,
                    origin: Any) -> Geometry:
    direction, (dx, dy), known = _dicom_plane(ds)
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
    dz = float(_dicom_attr(ds, "SpacingBetweenSlices") or _dicom_attr(ds, "SliceThickness") or 1)
    return arr, _dicom_geometry(ds, arr.shape[1:], dz, _dicom_attr(ds, "ImagePositionPatient"))


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    datasets = [(f, pydicom.dcmread(f)) for f in _series_files(folder)]
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(uids) > 1:
        raise MedanomalyError(f"{folder} holds {len(uids)} DICOM series; give each its own folder")
    for f, ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise MedanomalyError(f"{f} lacks ImagePositionPatient/ImageOrientationPatient, so the "
                                  f"slices of {folder} cannot be ordered; convert it with dcm2niix")
    normal = _dicom_plane(datasets[0][1])[0][:, 2]
    pos = np.array([normal @ np.asarray(ds.ImagePositionPatient, float) for _, ds in datasets])
    order = np.argsort(pos, kind="stable")
    steps = np.diff(pos[order])
    if len(datasets) > 1 and np.min(steps) < 1e-3:
        raise MedanomalyError(f"{folder} has several slices at the same position (several echoes, "
                              "time points or series?); keep one volume per folder")
    dz = float(np.median(steps)) if len(steps) else 1.0
    if len(steps) and np.ptp(steps) > 0.01 * dz:
        logger.warning("%s: uneven slice spacing (%.3f-%.3f mm)", folder, steps.min(), steps.max())
    slices = [_dicom_pixels(datasets[i][1], datasets[i][0]) for i in order]
    if len({s.shape for s in slices}) > 1 or slices[0].ndim != 3:
        raise MedanomalyError(f"{folder}: slices differ in size or are multi-frame; keep one "
                              "single-frame series per folder (or read multi-frame files alone)")
    arr = np.stack(slices, axis=1)
    first = datasets[order[0]][1]
    return arr, _dicom_geometry(first, arr.shape[1:], dz, first.ImagePositionPatient)


_READERS: dict[str, Callable[[Path], tuple[np.ndarray, Geometry]]] = {
    ".png": _read_pillow, ".jpg": _read_pillow, ".jpeg": _read_pillow, ".bmp": _read_pillow,
    ".tif": _read_tiff, ".tiff": _read_tiff, ".nii": _read_nifti, ".nii.gz": _read_nifti,
    ".nrrd": _read_itk, ".nhdr": _read_itk, ".mha": _read_itk, ".mhd": _read_itk,
    ".dcm": _read_dicom_file}


def _pick_reader(p: Path) -> Callable[[Path], tuple[np.ndarray, Geometry]]:
    if p.is_dir():
        if not is_dicom_series_dir(p):
            raise MedanomalyError(f"{p} is a folder but not a DICOM series (all files must be "
                                  "DICOM images of one series); give an image file instead")
        return _read_dicom_series
    if not p.is_file():
        raise MedanomalyError(f"{p} does not exist; check the path")
    if p.stat().st_size == 0:
        raise MedanomalyError(f"{p} is empty (0 bytes); re-copy or re-export the file")
    reader = _READERS.get(full_suffix(p)) or (_read_dicom_file if _has_dicm(p) else None)
    if reader is None:
        raise MedanomalyError(f"{p}: unsupported file type '{full_suffix(p)}'; supported: "
                              f"{', '.join(IMAGE_SUFFIXES)} or a folder holding one DICOM series")
    return reader


def read_image(path: str | Path) -> Image:
    """Read a 2D/3D image file or a DICOM series folder as a float32 channels-first Image.

    Shapes: rasters (C, H, W) with C in {1, 3}; volumes and DICOM series (C, Z, Y, X).
    DICOM values are rescaled to modality units (e.g. HU); other values are kept as stored.
    """
    p = Path(path)
    reader = _pick_reader(p)
    try:
        raw, geometry = reader(p)
    except MedanomalyError:
        raise
    except Exception as exc:  # noqa: BLE001 - library errors become one user-facing error
        msg = f"cannot read {p} ({type(exc).__name__}: {exc}); the file is damaged, truncated"
        raise MedanomalyError(msg + " or not the image type its name says; re-export it") from exc
    arr = np.ascontiguousarray(raw, dtype=np.float32)
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

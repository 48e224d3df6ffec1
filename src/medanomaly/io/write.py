"""Writers: masks and anomaly score maps, written atomically next to the image they belong to,
in its format and with its geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from PIL import Image as PILImage

from medanomaly.core.atomic import atomic_path
from medanomaly.io.image import Image, affine_from_geometry


def mask_suffix(like: Image) -> str:
    """Suffix of written masks: .png (raster), .nii.gz (NIfTI, DICOM), .nrrd (NRRD), .mha (ITK)."""
    return {"raster": ".png", "nrrd": ".nrrd", "itk": ".mha"}.get(like.geometry.kind, ".nii.gz")


def score_suffix(like: Image) -> str:
    """Suffix of written score maps: .tif (float32) for rasters, else :func:`mask_suffix`."""
    return ".tif" if like.geometry.kind == "raster" else mask_suffix(like)


def _atomic_write(final: Path, write: Callable[[Path], None]) -> Path:
    with atomic_path(final) as tmp:  # same folder, same suffix, then os.replace
        write(tmp)
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


def _write(data: np.ndarray, like: Image, out_stem: str | Path, suffix: str, what: str, png_scale: int = 255) -> Path:
    if data.shape != like.spatial_shape:
        raise ValueError(f"{what} shape {data.shape} != image spatial shape {like.spatial_shape}")
    writers: dict[str, Callable[[Path], None]] = {
        ".png": lambda t: PILImage.fromarray(data * png_scale).save(t, format="PNG"),
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


def write_labels(labels: np.ndarray, like: Image, out_stem: str | Path) -> Path:
    """Write an integer label map (0 background, label values 1..255) as :func:`write_mask` writes a
    mask, the values kept (uint8; PNG too holds the label values, not x 255); return the path."""
    data = np.asarray(labels).astype(np.uint8)
    return _write(data, like, out_stem, mask_suffix(like), "label map", png_scale=1)


def write_score(score: np.ndarray, like: Image, out_stem: str | Path) -> Path:
    """Write a float32 anomaly score map of ``like.spatial_shape`` atomically to
    ``out_stem + score_suffix(like)`` and return that path (float32 TIFF for rasters, otherwise
    the same format and geometry as :func:`write_mask`)."""
    data = np.ascontiguousarray(score, dtype=np.float32)
    return _write(data, like, out_stem, score_suffix(like), "score")

"""The types every reader returns (:class:`Geometry`, :class:`Image`), file-name suffix helpers and
the geometry conversions shared by readers and writers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii",
                                   ".nii.gz", ".nrrd", ".nhdr", ".dcm", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def full_suffix(path: str | Path) -> str:
    """Lower-case suffix of ``path``, treating ``.nii.gz`` as one suffix ("" if none)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | Path) -> str:
    """File name of ``path`` without :func:`full_suffix` (``a.nii.gz`` -> ``a``)."""
    name, suffix = Path(path).name, full_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


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

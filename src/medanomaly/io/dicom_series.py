"""DICOM series folders read as one volume: one series, one slice geometry (orientation, pixel
spacing, size), slices ordered along their normal, gaps reported, the size checked before any
slice is decoded."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom

from medanomaly.core.errors import MedanomalyError
from medanomaly.io.dicom import (
    _dicom_geometry,
    _dicom_plane,
    _numbers,
    _shown,
    series_files,
)
from medanomaly.io.dicom_values import _dicom_shape, dicom_values, fill_padding
from medanomaly.io.image import Geometry
from medanomaly.io.safety import _check_size

#: the package's logger, shared by its modules: records keep the name "medanomaly.io"
logger = logging.getLogger("medanomaly.io")

#: slices share a geometry when their direction cosines agree within this (about 0.06 degrees)...
_COSINE_TOL = 1e-3
#: ...and their pixel spacings within this fraction
_SPACING_RTOL = 1e-3
_GROUPS_SHOWN = 4
#: bytes of files above which a series' pixel data is read only after the size check
_DEFER_ABOVE = 2**28

# One slice's geometry: ((frames, rows, columns, samples), 3x3 direction (row, column, normal), (dx, dy) mm)
_SliceGeometry = tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]


def _same(a: _SliceGeometry, b: _SliceGeometry) -> bool:
    return (a[0] == b[0] and np.allclose(a[1][:, :2], b[1][:, :2], rtol=0, atol=_COSINE_TOL)
            and np.allclose(a[2], b[2], rtol=_SPACING_RTOL, atol=0))


def _groups(geometries: list[_SliceGeometry]) -> list[list[int]]:
    """Indices of the slices of each geometry, the largest group first (ties: first seen first)."""
    groups: list[list[int]] = []
    for i, g in enumerate(geometries):
        home = next((grp for grp in groups if _same(geometries[grp[0]], g)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return sorted(groups, key=len, reverse=True)


def _plane(direction: np.ndarray) -> str:
    """'axial', 'coronal', 'sagittal' (normal within ~25 degrees of an LPS axis) or 'oblique', with
    the row and column direction cosines."""
    normal = np.abs(direction[:, 2])
    k = int(np.argmax(normal))
    name = ("sagittal", "coronal", "axial")[k] if normal[k] > 0.9 else "oblique"
    row, col = ([f"{v:g}" for v in np.round(direction[:, j], 3) + 0.0] for j in (0, 1))
    return f"{name} (row [{','.join(row)}], column [{','.join(col)}])"


def _differences(a: _SliceGeometry, b: _SliceGeometry, names: tuple[str, str]) -> str:
    """What differs between slice ``names[0]`` (geometry a) and slice ``names[1]`` (geometry b)."""
    (fa, ra, ca, sa), (fb, rb, cb, sb) = a[0], b[0]
    said = []
    if (ra, ca) != (rb, cb):
        said.append(f"slice {names[0]} is {ra}x{ca} but {names[1]} is {rb}x{cb}")
    if (fa, sa) != (fb, sb):
        said.append(f"slice {names[0]} has {fa} frame(s) of {sa} sample(s) per pixel but {names[1]} has {fb} of {sb}")
    if not np.allclose(a[1][:, :2], b[1][:, :2], rtol=0, atol=_COSINE_TOL):
        said.append(f"slice {names[0]} is {_plane(a[1])} but {names[1]} is {_plane(b[1])}")
    if not np.allclose(a[2], b[2], rtol=_SPACING_RTOL, atol=0):
        said.append(f"slice {names[0]} has {a[2][0]:g}x{a[2][1]:g} mm pixels but {names[1]} has "
                    f"{b[2][0]:g}x{b[2][1]:g} mm")
    return "; ".join(said)


def _group_text(group: list[int], g: _SliceGeometry, names: list[str]) -> str:
    frames, rows, cols, samples = g[0]
    shown = [names[i] for i in group]
    shown = shown if len(shown) <= 3 else [shown[0], shown[1], "...", shown[-1]]
    extra = (f", {frames} frames" if frames > 1 else "") + (f", {samples} samples per pixel" if samples > 1 else "")
    return (f"{len(group)} slice{'s' if len(group) > 1 else ''} {rows}x{cols}{extra}, {g[2][0]:g}x{g[2][1]:g} mm "
            f"pixels, {_plane(g[1])}: {' '.join(shown)}")


def _check_one_geometry(folder: Path, names: list[str], geometries: list[_SliceGeometry]) -> None:
    """Refuse slices of several geometries (orientation, pixel spacing, size, frames or samples):
    stacked, they would all be read with the first slice's geometry."""
    groups = _groups(geometries)
    if len(groups) == 1:
        return
    ref, odd = groups[0][0], min(i for grp in groups[1:] for i in grp)
    listed = [_group_text(grp, geometries[grp[0]], names) for grp in groups[:_GROUPS_SHOWN]]
    more = f"; and {len(groups) - _GROUPS_SHOWN} more" if len(groups) > _GROUPS_SHOWN else ""
    raise MedanomalyError(
        f"{folder} holds slices of {len(groups)} different geometries, which cannot be stacked into one volume: "
        f"{_differences(geometries[odd], geometries[ref], (names[odd], names[ref]))}. The groups: "
        f"{'; '.join(listed)}{more}. Put each group in its own folder (each is then read as one volume), or "
        "remove the slices that do not belong")


def _check_one_series(folder: Path, datasets: list[tuple[Path, pydicom.Dataset]]) -> None:
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(uids) > 1:
        raise MedanomalyError(f"{folder} holds {len(uids)} DICOM series; give each its own folder")
    for f, ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise MedanomalyError(f"{f} lacks ImagePositionPatient/ImageOrientationPatient, so the "
                                  f"slices of {folder} cannot be ordered; convert it with dcm2niix")
    frames = next((f for f, ds in datasets if _dicom_shape(ds)[0] > 1), None)
    if frames is not None:
        raise MedanomalyError(f"{folder}: {frames.name} is multi-frame; keep one single-frame series per "
                              "folder (or read multi-frame files alone)")


def _positions(folder: Path, datasets: list[tuple[Path, pydicom.Dataset]], normal: np.ndarray) -> np.ndarray:
    """Each slice's position along the slice normal (mm); duplicates refused."""
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
    return pos


def _report_gaps(folder: Path, names: list[str], order: np.ndarray, steps: np.ndarray, dz: float) -> None:
    """Warn, naming the slices around each, about steps that differ from the usual ``dz``: a missing
    slice (a gap) or uneven spacing, which the stacked volume does not represent."""
    if not len(steps) or np.ptp(steps) <= 0.01 * dz:
        return
    odd = np.flatnonzero(np.abs(steps - dz) > 0.01 * dz)
    where = ", ".join(f"{steps[k]:.3f} mm between {names[order[k]]} and {names[order[k + 1]]}" for k in odd[:3])
    more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
    logger.warning("%s: uneven slice spacing (%.3f-%.3f mm): %s%s, where the others are %.3f mm apart (a missing "
                   "slice?); the volume is stacked %.3f mm apart, so the slices past a gap are placed off their "
                   "position: add the missing slices or convert the series with dcm2niix", folder, steps.min(),
                   steps.max(), where, more, dz, dz)


def _stack(datasets: list[tuple[Path, pydicom.Dataset]], order: np.ndarray, folder: Path) -> np.ndarray:
    """The slices' values in ``order``, (C, Z, Y, X) float32, decoded one at a time into one array;
    padding pixels filled over the whole volume."""
    arr = pad = None
    for z, i in enumerate(order):
        f, ds = datasets[i]
        values, slice_pad = dicom_values(ds, f)
        if arr is None:
            arr = np.empty((values.shape[0], len(order), *values.shape[1:]), np.float32)
        if values.shape != arr.shape[:1] + arr.shape[2:]:
            raise MedanomalyError(f"{folder}: slice {f.name} gives {values.shape[0]} channel(s) but the others "
                                  f"{arr.shape[0]} (a colour slice in a grey series?); keep one series per folder")
        arr[:, z] = values
        if slice_pad is not None:
            pad = np.zeros(arr.shape[1:], bool) if pad is None else pad
            pad[z] = slice_pad
    return fill_padding(arr, pad, folder)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    """A series folder as (C, Z, Y, X) values and the geometry of its lowest slice."""
    files = series_files(folder)
    # a large series: headers only, its pixel data read slice by slice once the series is checked
    # (deferring costs ~2 ms a file, reopened, so small series are read at once)
    defer = "64 KB" if sum(f.stat().st_size for f in files) > _DEFER_ABOVE else None
    datasets = [(f, pydicom.dcmread(f, defer_size=defer)) for f in files]
    _check_one_series(folder, datasets)
    names = [f.name for f, _ in datasets]
    planes = [_dicom_plane(ds, f, strict=len(datasets) > 1, quiet=True) for f, ds in datasets]
    _check_one_geometry(folder, names, [(_dicom_shape(ds), d, dxdy) for (_, ds), (d, dxdy, _) in
                                        zip(datasets, planes)])
    pos = _positions(folder, datasets, planes[0][0][:, 2])
    order = np.argsort(pos, kind="stable")
    steps = np.diff(pos[order])
    _check_size(folder, (len(datasets), *_dicom_shape(datasets[0][1])), "DICOM series")
    dz = float(np.median(steps)) if len(steps) else 1.0
    _report_gaps(folder, names, order, steps, dz)
    arr = _stack(datasets, order, folder)
    first = datasets[order[0]][1]
    return arr, _dicom_geometry(first, arr.shape[1:], dz, _numbers(first.ImagePositionPatient, 3), folder)

"""The readers' entry points: :func:`read_image` picks the reader for a path and checks what it
returns; :func:`read_channels` reads the channel files of one image (one file per channel) as one
image; :func:`read_mask` reads a mask and checks its values."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.errors import InvalidDicomError

from medanomaly.core.errors import MedanomalyError
from medanomaly.io.dicom import _has_dicm, _read_dicom_file, is_dicom_series_dir
from medanomaly.io.dicom_series import _read_dicom_series
from medanomaly.io.image import IMAGE_SUFFIXES, Geometry, Image, full_suffix
from medanomaly.io.raster import _read_pillow, _read_tiff
from medanomaly.io.safety import _permission_error, library_notes
from medanomaly.io.volume import _read_itk, _read_nifti

#: the package's logger, shared by its modules: records keep the name "medanomaly.io"
logger = logging.getLogger("medanomaly.io")

_MAX_LABEL = 10


_READERS: dict[str, Callable[[Path], tuple[np.ndarray, Geometry]]] = {
    ".png": _read_pillow, ".jpg": _read_pillow, ".jpeg": _read_pillow, ".bmp": _read_pillow,
    ".tif": _read_tiff, ".tiff": _read_tiff, ".nii": _read_nifti, ".nii.gz": _read_nifti,
    ".nrrd": _read_itk, ".nhdr": _read_itk, ".mha": _read_itk, ".mhd": _read_itk,
    ".dcm": _read_dicom_file}


_DICOM_READERS = (_read_dicom_file, _read_dicom_series)


def _library_detail(exc: Exception, dicom: bool) -> str:
    """The library's error for a message: its type and text, cut to 300 characters. For DICOM only
    structural errors keep their text; any other may quote a header value (a patient identifier)."""
    if dicom and not isinstance(exc, (InvalidDicomError, EOFError)):
        return f"{type(exc).__name__}; its message is not shown: it may quote header values"
    detail = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {detail if len(detail) <= 300 else detail[:297] + '...'}"


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


def _to_float32(raw: np.ndarray, p: Path) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype.kind not in "biuf":
        kind = "complex" if raw.dtype.kind == "c" else f"'{raw.dtype}'"
        raise MedanomalyError(f"{p} holds {kind} pixel values, which medanomaly does not read; save "
                              "the magnitude (or a grey/RGB image) as real numbers instead")
    return np.ascontiguousarray(raw, dtype=np.float32)


def read_image(path: str | Path) -> Image:
    """Read a 2D/3D image file or a DICOM series folder as a float32 channels-first Image.

    Shapes: rasters (C, H, W) with C in {1, 3}; volumes and DICOM series (C, Z, Y, X).
    DICOM values are in modality units (e.g. HU), high = bright (MONOCHROME1 inverted), padding
    pixels set to the darkest other value; other values are kept as stored.
    Raises :class:`MedanomalyError` (and nothing else) for any file it cannot read, including
    images above the size limit (:func:`~medanomaly.io.safety.pixel_limit`: MAX_PIXELS and the
    available memory; refused from the header) and unreadable files.
    """
    p = Path(path)
    notes: list[str] = []
    reader = None
    try:
        with library_notes(notes):
            reader = _pick_reader(p)
            raw, geometry = reader(p)
            arr = _to_float32(raw, p)
    except MedanomalyError:
        raise
    except PermissionError as exc:
        raise _permission_error(p, exc) from exc
    except Exception as exc:  # noqa: BLE001 - library errors become one user-facing error
        msg = f"cannot read {p} ({_library_detail(exc, reader in _DICOM_READERS)}); the file is damaged, truncated"
        raise MedanomalyError(msg + " or not the image type its name says; re-export it") from exc
    for note in dict.fromkeys(notes):  # once each, naming the file
        if note.startswith("Invalid value for VR "):  # pydicom quotes the header value: it may identify
            note = note.partition(":")[0] + " (value not shown)"
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


def read_channels(paths: Sequence[str | Path], names: Sequence[str] = ()) -> Image:
    """Read the channel files of one image (e.g. ``case_0000.nii.gz``, ``case_0001.nii.gz``) as one
    float32 Image, their channels concatenated in the given order: (sum of C, *S). One file is
    :func:`read_image` itself. The files must agree in spatial shape and geometry (spacing, origin,
    direction to 1e-3 mm or 1e-3): else a MedanomalyError naming both. ``names`` (one per file's
    channel, or ()) are kept in ``geometry.meta["channel_names"]``; the path is the first file's."""
    images = [read_image(p) for p in paths]
    first = images[0]
    for im in images[1:]:
        _check_same_grid(first, im)
    meta = dict(first.geometry.meta)
    if names:
        meta["channel_names"] = tuple(names)
    if len({im.geometry.meta.get("dtype") for im in images}) > 1:
        meta["dtype"] = None  # mixed stored types: no 8-bit shortcut in normalisation
    if len(images) == 1:
        return first if not names else replace(first, geometry=replace(first.geometry, meta=meta))
    array = np.concatenate([im.array for im in images], axis=0)
    return Image(array, replace(first.geometry, meta=meta), first.path)


def _check_same_grid(a: Image, b: Image) -> None:
    """The channel files ``a`` and ``b`` of one image must share spatial shape and geometry."""
    ga, gb = a.geometry, b.geometry
    if a.spatial_shape != b.spatial_shape:
        what = f"{'x'.join(map(str, b.spatial_shape))} but {a.path} is {'x'.join(map(str, a.spatial_shape))}"
    elif not (np.allclose(ga.spacing, gb.spacing, atol=1e-3) and np.allclose(ga.origin, gb.origin, atol=1e-3)
              and np.allclose(ga.direction, gb.direction, atol=1e-3)):
        what = (f"placed differently from {a.path} (spacing {tuple(gb.spacing)} vs {tuple(ga.spacing)} mm, origin "
                f"{tuple(gb.origin)} vs {tuple(ga.origin)} mm, or direction)")
    else:
        return
    raise MedanomalyError(f"{b.path} is {what}; the channel files of one image must be co-registered on one voxel "
                          "grid: resample them onto the first channel's grid (e.g. with SimpleITK or nnU-Net's "
                          "preprocessing) or move the odd file out of the data folder")


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
    return read_label_map(path, like) != 0


def read_label_map(path: str | Path, like: Image | None = None) -> np.ndarray:
    """As :func:`read_mask`, the values kept: a float32 array of the mask's integer values (labels;
    0/255 masks hold 255), checked as :func:`read_mask` checks them."""
    img = read_image(path)
    arr = img.array
    agree = all(np.array_equal(arr[0], arr[i]) for i in range(1, arr.shape[0]))
    mask = arr[0] if agree else arr.max(axis=0)
    if like is not None and mask.shape != like.spatial_shape:
        sizes = ["x".join(map(str, shape)) for shape in (mask.shape, like.spatial_shape)]
        raise MedanomalyError(f"mask {sizes[0]} does not match image {sizes[1]}: {img.path} vs "
                              f"{like.path}; resample the mask or fix the pairing")
    _check_mask_values(np.unique(mask), img.path)
    return mask

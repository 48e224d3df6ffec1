"""Volume reading: NIfTI (nibabel), and NRRD and MetaImage (SimpleITK) with the header checks
that keep ITK from blocking on or crashing over a crafted header."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medanomaly.core.errors import MedanomalyError
from medanomaly.io.image import Geometry, _reversed_geometry, full_suffix
from medanomaly.io.safety import _capture_fd2, _check_size, _itk_reason

#: the package's logger, shared by its modules: records keep the name "medanomaly.io"
logger = logging.getLogger("medanomaly.io")


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

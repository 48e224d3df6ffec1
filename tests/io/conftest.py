"""The bad-image corpus: broken, odd and hostile image files generated in tmp_path from the real
files of ../shared/data (nothing binary is committed). ``bad_images[kind](empty folder) -> the input
path``; tests/io/test_bad_images.py reads them directly, tests/io/test_predict_bad_images.py feeds them
to ``medanomaly predict``."""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image as PILImage

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
DICOM = DATA / "dicom"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
IXI = DATA / "volumes" / "ixi-t1-healthy" / "IXI012-HH-1211-T1_ds.nii.gz"
NRRD = DATA / "volumes" / "brain1_image.nrrd"


# --- files with a crafted header ------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _huge_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid-looking PNG (correct CRCs) whose IHDR claims width x height grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _png_chunk(b"IEND", b""))
    return path


def _small_nifti(array: np.ndarray, path: Path) -> Path:
    """Save an array with the real IXI affine (so the header is a real one)."""
    nib.save(nib.Nifti1Image(array.astype(np.float32), nib.load(str(IXI)).affine), str(path))
    return path


@functools.lru_cache(maxsize=1)
def _ixi_crop() -> np.ndarray:
    return np.asarray(nib.load(str(IXI)).dataobj[44:76, 44:76, 40:48], dtype=np.float32)


def _huge_nifti(path: Path) -> Path:
    """A real NIfTI header (gzip-compressed) whose dim[] claims 30000^3 voxels."""
    _small_nifti(_ixi_crop(), path.with_name("tmp.nii"))
    raw = bytearray(path.with_name("tmp.nii").read_bytes())
    path.with_name("tmp.nii").unlink()
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _huge_nrrd(path: Path) -> Path:
    """A real NRRD header (brain1's) whose sizes claim 100000 x 100000 x 100000 voxels."""
    header = NRRD.read_bytes().split(b"\n\n", 1)[0].decode("latin-1").splitlines()
    header = [ln if not ln.startswith("sizes:") else "sizes: 100000 100000 100000" for ln in header]
    header = [ln for ln in header if not ln.startswith(("encoding:", "data file:"))] + ["encoding: raw"]
    path.write_bytes("\n".join(header).encode("latin-1") + b"\n\n" + b"\0" * 1024)
    return path


def _huge_tiff(path: Path, flair: Path) -> Path:
    """A real LGG slice as TIFF whose ImageWidth/ImageLength tags are patched to 65535 x 65535."""
    tifffile.imwrite(path, np.asarray(PILImage.open(flair)))
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        for name in ("ImageWidth", "ImageLength"):
            tag = tags[name]
            fmt = {3: "<H", 4: "<I"}[int(tag.dtype)]
            struct.pack_into(fmt, raw, tag.valueoffset, 65535)
    path.write_bytes(bytes(raw))
    return path


def _huge_dicom(path: Path) -> Path:
    ds = pydicom.dcmread(DICOM / "MR_small.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    ds.save_as(path)
    return path


def _mhd_header(raw_name: str) -> str:
    """A MetaImage header for brain1's first slice (real geometry), its data detached."""
    img = sitk.ReadImage(str(NRRD))
    return ("ObjectType = Image\nNDims = 2\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"ElementSpacing = {img.GetSpacing()[0]} {img.GetSpacing()[1]}\n"
            f"DimSize = {img.GetSize()[0]} {img.GetSize()[1]}\nElementType = MET_SHORT\n"
            f"ElementDataFile = {raw_name}\n")


def _fieldmap_copy(d: Path) -> Path:
    series = d / "series"
    shutil.copytree(FIELDMAP, series)
    return series


def _by_position(series: Path) -> list[Path]:
    files = sorted(series.glob("*.dcm"))
    return sorted(files, key=lambda f: float(np.dot(np.cross(*np.reshape(pydicom.dcmread(f).ImageOrientationPatient,
                                                                          (2, 3))), pydicom.dcmread(f).ImagePositionPatient)))


# --- the corpus: kind -> builder(empty folder) -> the input path -----------------------------------

def _b_dicom_truncated(d: Path) -> Path:
    (d / "ct.dcm").write_bytes((DICOM / "CT_small.dcm").read_bytes()[:600])
    return d / "ct.dcm"


def _b_dicom_no_pixels(d: Path) -> Path:
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    del ds.PixelData
    ds.save_as(d / "nopixels.dcm")
    return d / "nopixels.dcm"


def _b_dicom_j2k(d: Path) -> Path:
    return Path(shutil.copy(DICOM / "JPEG2000.dcm", d / "j2k.dcm"))


def _b_dicom_invalid_uid(d: Path) -> Path:
    raw = (DICOM / "MR_small.dcm").read_bytes()
    uid = str(pydicom.dcmread(DICOM / "MR_small.dcm").SeriesInstanceUID).encode()
    (d / "baduid.dcm").write_bytes(raw.replace(uid, uid[:3] + b'"' + uid[4:], 1))  # same length, invalid UI
    return d / "baduid.dcm"


def _b_mha_truncated(d: Path) -> Path:
    sitk.WriteImage(sitk.ReadImage(str(NRRD)), str(d / "brain.mha"))
    raw = (d / "brain.mha").read_bytes()
    (d / "brain.mha").write_bytes(raw[: len(raw) // 2])
    return d / "brain.mha"


def _b_mhd_fifo(d: Path) -> Path:
    os.mkfifo(d / "slice.raw")  # reading it would block forever: no writer will come
    (d / "slice.mhd").write_text(_mhd_header("slice.raw"))
    return d / "slice.mhd"


def _b_nhdr_missing(d: Path) -> Path:
    header = NRRD.read_bytes().split(b"\n\n", 1)[0].decode("latin-1").splitlines()
    header = [ln for ln in header if not ln.startswith(("encoding:", "data file:"))]
    (d / "brain.nhdr").write_text("\n".join(header + ["encoding: raw", "data file: brain.raw"]) + "\n\n")
    return d / "brain.nhdr"


def _b_nifti_nan_pixdim(d: Path) -> Path:
    path = _small_nifti(_ixi_crop(), d / "nanzoom.nii")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<f", raw, 80, float("nan"))  # pixdim[1]: the x voxel size
    path.write_bytes(bytes(raw))
    return path


def _b_dicom_bad_geometry(d: Path) -> Path:
    ds = pydicom.dcmread(DICOM / "MR_small.dcm")
    ds.PixelSpacing = [0, 0]
    ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
    ds.save_as(d / "flat.dcm")
    return d / "flat.dcm"


def _b_series_bad_orientation(d: Path) -> Path:
    series = _fieldmap_copy(d)
    for f in series.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]  # parallel row and column: no slice normal
        ds.save_as(f)
    return series


def _b_mha_bad_ndims(d: Path) -> Path:
    """brain1 as MetaImage with NDims = -1: ITK's MetaIO crashes the process (segfault) on it."""
    sitk.WriteImage(sitk.ReadImage(str(NRRD)), str(d / "brain.mha"))
    raw = (d / "brain.mha").read_bytes()
    (d / "brain.mha").write_bytes(raw.replace(b"NDims = 3\n", b"NDims = -1\n", 1))
    return d / "brain.mha"


def _b_series_duplicate(d: Path) -> Path:
    series = _fieldmap_copy(d)
    ds = pydicom.dcmread(series / "00005.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series / "00005_copy.dcm")
    return series


def _b_series_missing(d: Path) -> Path:
    series = _fieldmap_copy(d)
    _by_position(series)[10].unlink()  # a slice in the middle
    return series


def _b_series_mixed(d: Path) -> Path:
    series = _fieldmap_copy(d)
    ds = pydicom.dcmread(series / "00007.dcm")
    small = np.ascontiguousarray(ds.pixel_array[:32, :32])
    ds.Rows, ds.Columns, ds.PixelData = 32, 32, small.tobytes()
    ds.save_as(series / "00007.dcm")
    return series


def _b_series_readme(d: Path) -> Path:
    series = _fieldmap_copy(d)
    (series / "README.txt").write_text("Field map of the volunteer, exported for testing.\n")
    (series / "series.json").write_text('{"note": "sidecar"}\n')
    return series


def _b_nifti_nan(d: Path) -> Path:
    a = _ixi_crop().copy()
    a[5, 6, 3] = np.nan
    return _small_nifti(a, d / "nan.nii.gz")


def _b_nifti_inf(d: Path) -> Path:
    a = _ixi_crop().copy()
    a[5, 6, 3] = np.inf
    return _small_nifti(a, d / "inf.nii.gz")


def _b_nifti_4d(d: Path) -> Path:
    return _small_nifti(np.stack([_ixi_crop()] * 3, axis=-1), d / "fourd.nii.gz")


def _b_zero_byte(d: Path) -> Path:
    (d / "empty.png").write_bytes(b"")
    return d / "empty.png"


def _b_text_png(d: Path) -> Path:
    (d / "notes.png").write_text("Patient list, not an image\n")
    return d / "notes.png"


def _b_empty_folder(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


# --- kinds made from a real LGG FLAIR slice (``flair``) or masks ------------------------------------

def _b_png_truncated(d: Path, flair: Path) -> Path:
    (d / "cut.png").write_bytes(flair.read_bytes()[:2000])
    return d / "cut.png"


def _b_png_rgba(d: Path, flair: Path) -> Path:
    PILImage.open(flair).convert("RGBA").save(d / "rgba.png")
    return d / "rgba.png"


def _b_png_16bit(d: Path, flair: Path) -> Path:
    a = np.asarray(PILImage.open(flair)).astype(np.uint16) * 257
    PILImage.fromarray(a).save(d / "deep.png")
    return d / "deep.png"


def _b_png_1x1(d: Path, flair: Path) -> Path:
    PILImage.open(flair).crop((128, 128, 129, 129)).save(d / "dot.png")
    return d / "dot.png"


def _b_png_upper(d: Path, flair: Path) -> Path:
    return Path(shutil.copy(flair, d / "SLICE.PNG"))


def _b_non_ascii(d: Path, flair: Path) -> Path:
    (d / "données patient").mkdir()
    shutil.copy(flair, d / "données patient" / "é 1.png")
    return d


def _b_symlink_loop(d: Path, flair: Path) -> Path:
    shutil.copy(flair, d / "a.png")
    os.symlink(d, d / "loop")  # a folder link back to its parent
    os.symlink("self.png", d / "self.png")  # a link to itself
    return d


def _b_permission(d: Path, flair: Path) -> Path:
    return Path(shutil.copy(flair, d / "locked.png"))


def _b_only_masks(d: Path, masks: list[Path]) -> Path:
    for m in masks:
        shutil.copy(m, d / m.name)
    return d


_FROM_FILES: dict[str, Callable[[Path], Path]] = {
    "dicom-truncated": _b_dicom_truncated, "dicom-no-pixels": _b_dicom_no_pixels,
    "dicom-j2k-no-decoder": _b_dicom_j2k, "dicom-huge-header": lambda d: _huge_dicom(d / "huge.dcm"),
    "dicom-invalid-uid": _b_dicom_invalid_uid, "nifti-nan-voxel-size": _b_nifti_nan_pixdim,
    "dicom-invalid-geometry": _b_dicom_bad_geometry, "series-invalid-orientation": _b_series_bad_orientation,
    "mha-bad-ndims": _b_mha_bad_ndims, "mhd-data-file-is-a-pipe": _b_mhd_fifo,
    "nhdr-data-file-missing": _b_nhdr_missing, "mha-truncated": _b_mha_truncated,
    "series-duplicate-slice": _b_series_duplicate, "series-missing-slice": _b_series_missing,
    "series-mixed-sizes": _b_series_mixed, "series-with-readme": _b_series_readme,
    "nifti-nan": _b_nifti_nan, "nifti-inf": _b_nifti_inf, "nifti-huge-header": lambda d: _huge_nifti(d / "huge.nii.gz"),
    "nifti-4d": _b_nifti_4d, "nrrd-huge-header": lambda d: _huge_nrrd(d / "huge.nrrd"),
    "zero-byte": _b_zero_byte, "text-as-png": _b_text_png, "png-huge-header": lambda d: _huge_png(d / "huge.png"),
    "empty-folder": _b_empty_folder,
}
_FROM_FLAIR: dict[str, Callable[[Path, Path], Path]] = {
    "tiff-huge-header": lambda d, flair: _huge_tiff(d / "huge.tif", flair), "png-truncated": _b_png_truncated,
    "png-rgba": _b_png_rgba, "png-16bit": _b_png_16bit, "png-1x1": _b_png_1x1, "png-uppercase-suffix": _b_png_upper,
    "non-ascii-path": _b_non_ascii, "symlink-loop": _b_symlink_loop, "permission-denied": _b_permission,
}


@pytest.fixture(scope="session")
def bad_images(real_lgg) -> dict[str, Callable[[Path], Path]]:
    """kind -> builder(empty folder) -> the input path: the predict corpus (README, "Bad input"),
    plus "empty-folder" and "only-masks" (3 LGG masks, no image)."""
    built = dict(_FROM_FILES)
    built.update({kind: functools.partial(make, flair=real_lgg.flair) for kind, make in _FROM_FLAIR.items()})
    masks = [m for _, m in real_lgg.slices(real_lgg.patients[0], True)[:3]]
    built["only-masks"] = functools.partial(_b_only_masks, masks=masks)
    return built


@pytest.fixture(scope="session")
def mhd_header() -> Callable[[str], str]:
    """``mhd_header(raw_name) -> text``: a MetaImage header for brain1's first slice, data in raw_name."""
    return _mhd_header


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Turn a hang (e.g. a read blocked on a pipe) into a test failure instead of a stuck run."""
    def _alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a crafted input made medanomaly hang")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def time_limit():
    """``with time_limit(seconds):`` a TimeoutError instead of a hang."""
    return _time_limit

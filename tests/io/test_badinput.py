"""Bad input, end to end: a corpus of broken, odd and hostile inputs generated in tmp_path from
the real files of ../shared/data (nothing binary is committed), fed to ``medanomaly train``,
``predict`` and ``evaluate`` (in-process through ``medanomaly.apps.cli.main``, plus one subprocess run
to prove no traceback reaches stderr).

The contract (README, "Bad input"): a user error ends with one paragraph on stderr naming the
file and the fix, exit code 2, no traceback and no partial output; ``predict`` keeps going past
a file it cannot read, reports it and exits with 1. :data:`OUTCOMES` lists every kind of input
tested here with its documented outcome (the rows of the README table).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import gzip
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
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
from PIL import ImageFile

import medanomaly.io as mio
from medanomaly.apps.cli import build_parser, main
from medanomaly.data.slices import discover
from medanomaly.core.errors import MedanomalyError
from medanomaly.io import read_image, read_mask

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LGG = DATA / "lgg-flair"
DICOM = DATA / "dicom"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
IXI = DATA / "volumes" / "ixi-t1-healthy" / "IXI012-HH-1211-T1_ds.nii.gz"
NRRD = DATA / "volumes" / "brain1_image.nrrd"
KAGGLE_TIF = DATA / "lgg-kaggle3m-sample" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10.tif"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA} (../shared/data); "
                                                          "the bad-input corpus is generated from it")

PATIENTS = ["TCGA_CS_4941_19960909", "TCGA_CS_4943_20000902", "TCGA_CS_4944_20010208"]
TINY = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "2", "--device", "cpu"]

#: kind id -> documented outcome (the README "Bad input" table is made from these rows).
OUTCOMES: dict[str, str] = {
    "dicom-truncated": "predict: `failed: <file>: ... has no DICOM pixel data: it is truncated ...`, exit 1, no output for it",
    "dicom-no-pixels": "predict: same message (truncated or a non-image object), exit 1",
    "dicom-j2k-no-decoder": "predict: error naming the transfer syntax and `pip install pylibjpeg pylibjpeg-openjpeg`, exit 1",
    "dicom-huge-header": "Rows x Columns x frames above `MAX_PIXELS`: refused from the header before decoding, exit 1",
    "dicom-invalid-uid": "handled: read normally; library complaints, if any, become one warning line naming the file, exit 0",
    "nifti-nan-voxel-size": "NaN/inf in pixdim, srow or quatern: `... gives a non-finite affine or voxel size ...`, exit 1",
    "dicom-invalid-geometry": "handled: PixelSpacing 0 or NaN -> spacing unknown; degenerate ImageOrientationPatient -> identity; a warning each, exit 0",
    "series-invalid-orientation": "a series whose ImageOrientationPatient has no slice normal: `... is not two perpendicular unit vectors, so the slices cannot be ordered`, exit 1",
    "mha-bad-ndims": "MetaImage NDims < 1 or large (crashes ITK's MetaIO: segfault) or DimSize not matching it: refused before ITK parses it, exit 1",
    "mhd-data-file-is-a-pipe": "header whose data file is a FIFO/device (`/dev/stdin`): refused before reading (it would block forever), exit 1",
    "nhdr-data-file-missing": "`<header>: the data file <raw> named in its header does not exist; put it beside the header ...`, exit 1",
    "mha-truncated": "`cannot read <file> (RuntimeError: ... data not read completely ...)` on one line (ITK's own stderr chatter captured), exit 1",
    "series-duplicate-slice": "predict: `... has several slices at the same position (<a>.dcm and <b>.dcm ...)`, exit 1",
    "series-missing-slice": "read with a warning `uneven slice spacing (3.600-7.200 mm)`; predicted, exit 0",
    "series-mixed-sizes": "predict: `slice <file> is 32x32 but <file> is 64x64 ...`, exit 1",
    "series-with-readme": "handled: notes/sidecars (README.txt, *.json...) are ignored; one volume predicted, exit 0",
    "nifti-nan": "predict: `... contains 1 NaN/inf voxels; ... numpy.nan_to_num`, exit 1; train: exit 2",
    "nifti-inf": "predict: same as NaN, exit 1",
    "nifti-huge-header": "dims above `MAX_PIXELS` (2**28 values): refused from the header in milliseconds, exit 1",
    "nifti-4d": "the 4th axis is read as channels: a 1-channel model says `has 3 channels but the model was trained on 1`, exit 1",
    "nrrd-huge-header": "sizes above `MAX_PIXELS`: refused from the header (SimpleITK ReadImageInformation), exit 1",
    "tiff-huge-header": "ImageWidth x ImageLength above `MAX_PIXELS`: refused from the header, exit 1",
    "zero-byte": "predict: `... is empty (0 bytes); re-copy or re-export the file`, exit 1",
    "text-as-png": "predict: `cannot read <file> (UnidentifiedImageError ...)`, exit 1",
    "png-truncated": "predict: `cannot read <file> (OSError: image file is truncated)`, exit 1",
    "png-rgba": "handled: alpha dropped, read as RGB (3 channels); a 1-channel model refuses it naming both counts, exit 1",
    "png-16bit": "handled: values kept (percentile normalisation), predicted, exit 0",
    "png-1x1": "handled: predicted (upsampled to the model size and back), a 1x1 mask, exit 0",
    "png-huge-header": "IHDR above `MAX_PIXELS`: refused from the header before decoding (no memory used), exit 1",
    "png-uppercase-suffix": "handled: `.PNG` is read as PNG, exit 0",
    "non-ascii-path": "handled: `données patient/é 1.png` is predicted to the mirrored path, exit 0",
    "symlink-loop": "handled: discovery does not follow a link back into the tree (nor a self-link), exit 0",
    "permission-denied": "`permission denied: <file>; make it readable ...`: predict exit 1, train/evaluate exit 2",
    "empty-folder": "train/evaluate: `no images found in <dir>; supported files: ...`, exit 2 (predict: 0 images, exit 0 until predict.py raises too)",
    "nonexistent-path": "train/evaluate: `data folder <dir> does not exist`; predict: `input <path> does not exist`, exit 2",
    "mask-size-mismatch": "train/evaluate: `mask 240x240 does not match image 256x256: <mask> vs <image>`, exit 2",
    "mask-values-0-128-255": "train/evaluate: `mask <file> has values {0,128,255}; expected {0,1} or {0,255} ...`, exit 2",
    "all-masks-empty": "train: `every training mask in <dir> is empty; ... use --task anomaly`, exit 2",
    "only-masks": "train/evaluate: `found N mask file(s) in <dir> (e.g. ...) but no image ...`, exit 2 (predict: 0 images, exit 0 until predict.py raises too)",
    "image-without-mask": "supervised train: the image is left out (also inside a case whose other slices have masks), exit 0",
    "channel-mismatch": "train: `<file> has 3 channels but <file> has 1; ... same channels`, exit 2",
    "corrupt-image-in-train": "train: `cannot read <file> ...`, exit 2 (one bad file stops training)",
    "nan-in-train": "train: `<file> contains 1 NaN/inf voxels ...`, exit 2",
}


# --- helpers ------------------------------------------------------------------------------------

def _cli(capsys: pytest.CaptureFixture, *argv) -> tuple[int, str]:
    """Run ``medanomaly -q ARGV`` in-process; (exit code, stderr)."""
    rc = main(["-q", *map(str, argv)])
    return rc, capsys.readouterr().err


def _flat(text: str) -> tuple[str, str]:
    """stderr with the CLI's line wrapping undone, both ways (broken at a space or a hyphen)."""
    return text.replace("\n  ", " "), text.replace("\n  ", "")


def _names(err: str, path: Path) -> bool:
    return any(str(path) in t for t in _flat(err))


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")] if folder.exists() else []


def _outputs_of(out: Path, stem: str) -> list[Path]:
    return [p for p in out.rglob(f"{stem}_*")] if out.exists() else []


@functools.lru_cache(maxsize=None)
def _lgg_slices(patient: str, lesion: bool) -> tuple[tuple[Path, Path], ...]:
    """(flair, mask) pairs of a real LGG patient, with or without tumour."""
    out = []
    for m in sorted((LGG / patient).glob("*_mask.png")):
        if bool(np.asarray(PILImage.open(m)).any()) == lesion:
            out.append((m.with_name(m.name.replace("_mask.png", "_flair.png")), m))
    return tuple(out)


def _lgg_flair() -> Path:
    return _lgg_slices(PATIENTS[0], True)[0][0]


def _train_set(d: Path, per: int = 1, lesion: bool = True) -> dict[str, list[tuple[Path, Path]]]:
    """Real LGG pairs copied to d/<patient>/; splits.json: 2 patients train, 1 val. Returns the copies."""
    copies = {}
    for p in PATIENTS:
        (d / p).mkdir(parents=True)
        pairs = _lgg_slices(p, lesion)
        picked = pairs[len(pairs) // 2: len(pairs) // 2 + per]
        copies[p] = [(Path(shutil.copy(img, d / p / img.name)), Path(shutil.copy(m, d / p / m.name)))
                     for img, m in picked]
    (d / "splits.json").write_text(json.dumps({"train": PATIENTS[:2], "val": PATIENTS[2:], "test": []}))
    return copies


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


def _huge_tiff(path: Path) -> Path:
    """A real LGG slice as TIFF whose ImageWidth/ImageLength tags are patched to 65535 x 65535."""
    tifffile.imwrite(path, np.asarray(PILImage.open(_lgg_flair())))
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


def _fieldmap_copy(d: Path) -> Path:
    series = d / "series"
    shutil.copytree(FIELDMAP, series)
    return series


def _by_position(series: Path) -> list[Path]:
    files = sorted(series.glob("*.dcm"))
    return sorted(files, key=lambda f: float(np.dot(np.cross(*np.reshape(pydicom.dcmread(f).ImageOrientationPatient,
                                                                          (2, 3))), pydicom.dcmread(f).ImagePositionPatient)))


# --- the predict corpus: kind -> builder(empty folder) -> the input path -------------------------

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


def _mhd_header(raw_name: str) -> str:
    """A MetaImage header for brain1's first slice (real geometry), its data detached."""
    img = sitk.ReadImage(str(NRRD))
    return ("ObjectType = Image\nNDims = 2\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"ElementSpacing = {img.GetSpacing()[0]} {img.GetSpacing()[1]}\n"
            f"DimSize = {img.GetSize()[0]} {img.GetSize()[1]}\nElementType = MET_SHORT\n"
            f"ElementDataFile = {raw_name}\n")


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


def _b_png_truncated(d: Path) -> Path:
    (d / "cut.png").write_bytes(_lgg_flair().read_bytes()[:2000])
    return d / "cut.png"


def _b_png_rgba(d: Path) -> Path:
    PILImage.open(_lgg_flair()).convert("RGBA").save(d / "rgba.png")
    return d / "rgba.png"


def _b_png_16bit(d: Path) -> Path:
    a = np.asarray(PILImage.open(_lgg_flair())).astype(np.uint16) * 257
    PILImage.fromarray(a).save(d / "deep.png")
    return d / "deep.png"


def _b_png_1x1(d: Path) -> Path:
    PILImage.open(_lgg_flair()).crop((128, 128, 129, 129)).save(d / "dot.png")
    return d / "dot.png"


def _b_png_upper(d: Path) -> Path:
    return Path(shutil.copy(_lgg_flair(), d / "SLICE.PNG"))


def _b_non_ascii(d: Path) -> Path:
    (d / "données patient").mkdir()
    shutil.copy(_lgg_flair(), d / "données patient" / "é 1.png")
    return d


def _b_symlink_loop(d: Path) -> Path:
    shutil.copy(_lgg_flair(), d / "a.png")
    os.symlink(d, d / "loop")  # a folder link back to its parent
    os.symlink("self.png", d / "self.png")  # a link to itself
    return d


def _b_permission(d: Path) -> Path:
    return Path(shutil.copy(_lgg_flair(), d / "locked.png"))


def _b_empty_folder(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _b_only_masks(d: Path) -> Path:
    for _, m in _lgg_slices(PATIENTS[0], True)[:3]:
        shutil.copy(m, d / m.name)
    return d



#: kind -> (builder, exit code, regex the stderr must match (None for exit 0), files expected for exit 0)
PREDICT_CASES: dict[str, tuple[Callable[[Path], Path], int, str | None, tuple[str, ...]]] = {
    "dicom-truncated": (_b_dicom_truncated, 1, r"no DICOM pixel data.*truncated", ()),
    "dicom-no-pixels": (_b_dicom_no_pixels, 1, r"no DICOM pixel data", ()),
    "dicom-j2k-no-decoder": (_b_dicom_j2k, 1, r"transfer syntax.*JPEG 2000.*pylibjpeg-openjpeg", ()),
    "dicom-huge-header": (lambda d: _huge_dicom(d / "huge.dcm"), 1, r"65535x65535.*MAX_PIXELS", ()),
    "dicom-invalid-uid": (_b_dicom_invalid_uid, 0, None, ("baduid_pred.nii.gz", "baduid_score.nii.gz")),
    "nifti-nan-voxel-size": (_b_nifti_nan_pixdim, 1, r"non-finite affine or voxel size", ()),
    "dicom-invalid-geometry": (_b_dicom_bad_geometry, 0, None, ("flat_pred.nii.gz", "flat_score.nii.gz")),
    "series-invalid-orientation": (_b_series_bad_orientation, 1,
                                   r"ImageOrientationPatient \[.*\] is not two perpendicular unit vectors", ()),
    "mha-bad-ndims": (_b_mha_bad_ndims, 1, r"MetaImage header has NDims = -1; only 2D and 3D", ()),
    "mhd-data-file-is-a-pipe": (_b_mhd_fifo, 1, r"the data file \S*slice\.raw named in its header is not a "
                                                 r"regular file", ()),
    "nhdr-data-file-missing": (_b_nhdr_missing, 1, r"the data file \S*brain\.raw named in its header does not exist",
                               ()),
    "mha-truncated": (_b_mha_truncated, 1, r"cannot read .*brain\.mha \(RuntimeError: .*data not read completely", ()),
    "series-duplicate-slice": (_b_series_duplicate, 1, r"same position \(00005(_copy)?\.dcm and 00005(_copy)?\.dcm", ()),
    "series-missing-slice": (_b_series_missing, 0, None, ("series_pred.nii.gz", "series_score.nii.gz")),
    "series-mixed-sizes": (_b_series_mixed, 1, r"slice 00007\.dcm is 32x32 but \S+ is 64x64", ()),
    "series-with-readme": (_b_series_readme, 0, None, ("series_pred.nii.gz", "series_score.nii.gz",
                                                      "series_overlay.png")),
    "nifti-nan": (_b_nifti_nan, 1, r"contains 1 NaN/inf voxels.*nan_to_num", ()),
    "nifti-inf": (_b_nifti_inf, 1, r"contains 1 NaN/inf voxels", ()),
    "nifti-huge-header": (lambda d: _huge_nifti(d / "huge.nii.gz"), 1, r"30000x30000x30000.*MAX_PIXELS", ()),
    "nifti-4d": (_b_nifti_4d, 1, r"has 3 channels but the model was trained on 1-channel", ()),
    "nrrd-huge-header": (lambda d: _huge_nrrd(d / "huge.nrrd"), 1, r"100000x100000x100000.*MAX_PIXELS", ()),
    "tiff-huge-header": (lambda d: _huge_tiff(d / "huge.tif"), 1, r"65535x65535.*MAX_PIXELS", ()),
    "zero-byte": (_b_zero_byte, 1, r"is empty \(0 bytes\)", ()),
    "text-as-png": (_b_text_png, 1, r"cannot read .*not the image type its name says", ()),
    "png-truncated": (_b_png_truncated, 1, r"cannot read .*truncated", ()),
    "png-rgba": (_b_png_rgba, 1, r"has 3 channels but the model was trained on 1-channel", ()),
    "png-16bit": (_b_png_16bit, 0, None, ("deep_pred.png", "deep_score.tif", "deep_overlay.png")),
    "png-1x1": (_b_png_1x1, 0, None, ("dot_pred.png", "dot_score.tif", "dot_overlay.png")),
    "png-huge-header": (lambda d: _huge_png(d / "huge.png"), 1, r"100000x100000.*MAX_PIXELS", ()),
    "png-uppercase-suffix": (_b_png_upper, 0, None, ("SLICE_pred.png", "SLICE_score.tif")),
    "non-ascii-path": (_b_non_ascii, 0, None, ("données patient/é 1_pred.png", "données patient/é 1_score.tif")),
    "symlink-loop": (_b_symlink_loop, 0, None, ("a_pred.png", "a_score.tif")),
    "permission-denied": (_b_permission, 1, r"permission denied: \S*locked\.png", ()),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny U-Net trained for one epoch on 6 real LGG slices of 3 patients (seconds on a CPU)."""
    data = tmp_path_factory.mktemp("tiny data")
    for p in PATIENTS:
        (data / p).mkdir()
        pairs = _lgg_slices(p, True)
        for img, m in pairs[len(pairs) // 2: len(pairs) // 2 + 2]:
            shutil.copy(img, data / p / img.name)
            shutil.copy(m, data / p / m.name)
    (data / "splits.json").write_text(json.dumps({"train": PATIENTS[:1], "val": PATIENTS[1:2], "test": PATIENTS[2:]}))
    model = tmp_path_factory.mktemp("tiny model") / "model"
    assert main(["-q", "train", str(data), "--out", str(model), *TINY]) == 0
    return model


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


def _predict_options() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {o for a in sub.choices["predict"]._actions for o in a.option_strings}


#: predict's flag that leaves the DICOM SEG out (where predict has a SEG output at all)
NO_SEG = ["--no-dicom-seg"] if "--no-dicom-seg" in _predict_options() else []


def _no_j2k_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without any JPEG 2000 plugin (as tests/test_io.py does)."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(pydicom.dcmread(DICOM / "JPEG2000.dcm").file_meta.TransferSyntaxUID)
    monkeypatch.setattr(decoder, "_available", {})


def _deny(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """open() of ``target`` raises PermissionError inside medanomaly.io, as for a chmod 000 file
    read by a normal user (root reads those, so a real chmod would test nothing here)."""
    def fake_open(file, *args, **kwargs):
        if Path(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    for name, module in list(sys.modules.items()):  # medanomaly.io and its modules: open() is called in several
        if name == "medanomaly.io" or name.startswith("medanomaly.io."):
            monkeypatch.setattr(module, "open", fake_open, raising=False)


@pytest.mark.parametrize("kind", list(PREDICT_CASES))
def test_predict_bad_input(kind: str, tiny_model: Path, tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    build, rc_expected, pattern, expected = PREDICT_CASES[kind]
    src = tmp_path / "in"
    src.mkdir()
    given = build(src)
    if kind == "dicom-j2k-no-decoder":
        _no_j2k_decoder(monkeypatch)
    if kind == "permission-denied":
        _deny(monkeypatch, given)
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING)
    t0 = time.perf_counter()
    with _time_limit(120):
        rc, err = _cli(capsys, "predict", tiny_model, given, "--out", out)
    assert time.perf_counter() - t0 < 20, "a crafted input must not make predict slow"
    assert "Traceback" not in err
    assert rc == rc_expected, err
    assert not _tmp_files(out)
    regions = json.loads((out / "regions.json").read_text())
    if rc_expected == 0:
        assert not regions["failed"] and regions["images"]
        for name in expected:
            assert (out / name).is_file(), (name, sorted(p.relative_to(out).as_posix() for p in out.rglob("*")))
        return
    assert _names(err, given) and any(re.search(pattern, t, re.S) for t in _flat(err)), err
    assert [f["input"] for f in regions["failed"]] == [str(given)]
    assert not regions["images"] and not _outputs_of(out, mio.stem_of(given))


def test_predict_nonexistent_input(tiny_model: Path, tmp_path: Path, capsys) -> None:
    rc, err = _cli(capsys, "predict", tiny_model, tmp_path / "in" / "nope.png", "--out", tmp_path / "out")
    assert rc == 2 and "Traceback" not in err and "does not exist" in err and _names(err, tmp_path / "in" / "nope.png")
    assert not (tmp_path / "out").exists()


def test_predict_nonexistent_input_is_reported_before_the_output_check(tiny_model: Path, tmp_path: Path,
                                                                        capsys) -> None:
    rc, err = _cli(capsys, "predict", tiny_model, tmp_path / "nope.png", "--out", tmp_path / "out")
    assert rc == 2 and "does not exist" in err


@pytest.mark.parametrize("kind", ["empty-folder", "only-masks"])
def test_predict_input_without_images_is_an_error(kind: str, tiny_model: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    given = {"empty-folder": _b_empty_folder, "only-masks": _b_only_masks}[kind](src)
    rc, err = _cli(capsys, "predict", tiny_model, given, "--out", tmp_path / "out")
    assert rc == 2 and _names(err, given) and "Traceback" not in err
    assert not (tmp_path / "out" / "regions.json").exists()


def _loose_lines(err: str) -> list[str]:
    """stderr lines that are neither a 'failed: ' report nor a log line."""
    return [ln for ln in err.splitlines() if not re.match(r"(failed: |\d\d:\d\d:\d\d (WARNING|ERROR) )", ln)]


@pytest.mark.skipif(not NO_SEG, reason="this predict has no DICOM SEG output")
def test_dicom_seg_keeps_stderr_clean(tiny_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "series").mkdir(parents=True)
    _b_dicom_invalid_uid(src / "series")  # one DICOM file in a folder: a 1-slice series
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medanomaly", "-q", "predict", str(tiny_model), str(src),
                           "--out", str(tmp_path / "out"), "--dicom-seg"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not _loose_lines(proc.stderr), proc.stderr


def test_missing_slice_is_read_with_a_warning(tmp_path: Path, caplog) -> None:
    series = _b_series_missing(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medanomaly.io"):
        img = read_image(series)
    assert img.spatial_shape == (35, 64, 64)
    assert "uneven slice spacing (3.600-7.200 mm)" in caplog.text


def test_series_readme_is_ignored_and_read_as_one_volume(tmp_path: Path) -> None:
    series = _b_series_readme(tmp_path)
    assert mio.is_dicom_series_dir(series)
    np.testing.assert_array_equal(read_image(series).array, read_image(FIELDMAP).array)
    assert [s.image for s in discover(tmp_path)] == [series]  # one sample, not 36 slices


def test_library_complaints_become_one_warning_naming_the_file(tmp_path: Path, caplog) -> None:
    path = _b_dicom_invalid_uid(tmp_path)
    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        read_image(path)
    assert not escaped, [str(w.message) for w in escaped]
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    ours = [r.getMessage() for r in caplog.records if r.name == "medanomaly.io"]
    assert len(ours) == 1 and ours[0].startswith(f"{path}: ") and "Invalid value for VR UI" in ours[0], ours


def test_detached_header_with_a_regular_data_file_still_reads(tmp_path: Path) -> None:
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(NRRD)))[0].astype("<i2")
    (tmp_path / "slice.raw").write_bytes(a.tobytes())
    (tmp_path / "slice.mhd").write_text(_mhd_header("slice.raw"))
    np.testing.assert_array_equal(read_image(tmp_path / "slice.mhd").array[0], a)


def test_invalid_dicom_geometry_falls_back_with_warnings(tmp_path: Path, caplog) -> None:
    path = _b_dicom_bad_geometry(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medanomaly.io"):
        img = read_image(path)
    assert not img.geometry.spacing_known and img.geometry.spacing == (1.0, 1.0)
    assert np.isfinite(mio.affine_from_geometry(img.geometry)).all()
    assert "invalid PixelSpacing" in caplog.text and "invalid ImageOrientationPatient" in caplog.text


def test_rgba_and_4d_are_read_as_channels(tmp_path: Path) -> None:
    assert read_image(_b_png_rgba(tmp_path)).channels == 3
    img = read_image(_b_nifti_4d(tmp_path))
    assert img.array.shape == (3, 8, 32, 32)


def test_predict_folder_keeps_going_past_every_bad_file(tiny_model: Path, tmp_path: Path) -> None:
    """The whole predict corpus in one folder, through a real ``python -m medanomaly`` process:
    every bad file is reported, every good one predicted, exit 1, and no traceback on stderr."""
    src = tmp_path / "corpus"
    src.mkdir()
    given = {}
    for kind, (build, rc, _, _) in PREDICT_CASES.items():
        if kind in ("dicom-j2k-no-decoder", "permission-denied"):  # need an in-process monkeypatch
            continue
        (src / kind).mkdir()
        given[kind] = (build(src / kind), rc)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medanomaly", "-q", "predict", str(tiny_model), str(src),
                           "--out", str(tmp_path / "out"), *NO_SEG], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    loose = _loose_lines(proc.stderr)
    assert not loose, f"lines on stderr that are neither a report nor a log line: {loose}"
    regions = json.loads((tmp_path / "out" / "regions.json").read_text())
    failed = {f["input"] for f in regions["failed"]}
    for kind, (path, rc) in given.items():
        if mio.is_dicom_series_dir(path.parent):  # a folder holding one DICOM file is a 1-slice series
            path = path.parent
        assert (str(path) in failed) == (rc == 1), kind
        if rc == 1:
            assert f"failed: {path}: " in proc.stderr, kind
    assert len(failed) == sum(rc == 1 for _, rc in given.values())
    assert len(regions["images"]) == 4 + 5  # 2 series, 2 DICOM (bad UID, bad geometry); 16-bit, 1x1, .PNG, non-ASCII, link
    assert not _tmp_files(tmp_path / "out")


# --- train / evaluate: data folders with one problem each ----------------------------------------

def _d_mask_size(d: Path) -> Path:
    img, m = _train_set(d)[PATIENTS[0]][0]
    PILImage.open(m).resize((240, 240), PILImage.NEAREST).save(m)
    return m


def _d_mask_values(d: Path) -> Path:
    _, m = _train_set(d)[PATIENTS[0]][0]
    a = np.asarray(PILImage.open(m).convert("L")).copy()  # LGG masks are 1-bit PNGs
    ys, xs = np.nonzero(a)
    a[ys[: len(ys) // 2], xs[: len(xs) // 2]] = 128  # soft edge: {0, 128, 255}
    PILImage.fromarray(a).save(m)
    return m


def _d_all_empty(d: Path) -> Path:
    _train_set(d, lesion=False)
    return d


def _d_only_masks(d: Path) -> Path:
    for pairs in _train_set(d).values():
        for img, _ in pairs:
            img.unlink()
    return d


def _d_empty(d: Path) -> Path:
    return d


def _d_nonexistent(d: Path) -> Path:
    return d / "no such folder"


def _d_channels(d: Path) -> Path:
    img, _ = _train_set(d)[PATIENTS[1]][0]
    PILImage.open(img).convert("RGB").save(img)
    return img


def _d_corrupt(d: Path) -> Path:
    img, _ = _train_set(d)[PATIENTS[0]][0]
    img.write_bytes(img.read_bytes()[:3000])
    return img


def _d_nan(d: Path) -> Path:
    img, _ = _train_set(d)[PATIENTS[0]][0]
    a = np.asarray(PILImage.open(img)).astype(np.float32)
    a[100, 100] = np.nan
    tif = img.with_suffix(".tif")
    tifffile.imwrite(tif, a)
    img.unlink()
    return tif


def _d_permission(d: Path) -> Path:
    return _train_set(d)[PATIENTS[0]][0][1]


#: kind -> (data builder returning the file/folder the message must name, regex)
TRAIN_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "mask-size-mismatch": (_d_mask_size, r"mask 240x240 does not match image 256x256"),
    "mask-values-0-128-255": (_d_mask_values, r"has values \{0,128,255\}; expected \{0,1\} or \{0,255\}"),
    "all-masks-empty": (_d_all_empty, r"every training mask in \S.* is empty.*--task anomaly"),
    "only-masks": (_d_only_masks, r"found 3 mask file\(s\) in .* but no image"),
    "empty-folder": (_d_empty, r"no images found in"),
    "nonexistent-path": (_d_nonexistent, r"does not exist"),
    "channel-mismatch": (_d_channels, r"has 3 channels but .* has 1"),
    "corrupt-image-in-train": (_d_corrupt, r"cannot read .*truncated"),
    "nan-in-train": (_d_nan, r"contains 1 NaN/inf voxels"),
    "permission-denied": (_d_permission, r"permission denied: "),
}


def _check_clean_exit_2(rc: int, err: str, named: Path, pattern: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("error:") == 1, err
    assert _names(err, named), (named, err)
    assert any(re.search(pattern, t, re.S) for t in _flat(err)), err


def _bad_data(kind: str, tmp_path: Path, monkeypatch) -> tuple[Path, Path, str]:
    """(data folder, the file or folder the message must name, the message pattern) for a kind."""
    data = tmp_path / "data"
    data.mkdir()
    build, pattern = TRAIN_CASES[kind]
    named = build(data)
    if kind == "permission-denied":
        _deny(monkeypatch, named)
    return data, named, pattern


@pytest.mark.parametrize("kind", list(TRAIN_CASES))
def test_train_bad_data(kind: str, tmp_path: Path, capsys, monkeypatch) -> None:
    data, named, pattern = _bad_data(kind, tmp_path, monkeypatch)
    out = tmp_path / "model"
    rc, err = _cli(capsys, "train", data if kind != "nonexistent-path" else named, "--out", out, *TINY)
    _check_clean_exit_2(rc, err, named, pattern)
    for name in ("model.pt", "model.json", "checkpoint.pt", "metrics.csv"):
        assert not (out / name).exists(), name  # nothing written before the data is known to be good
    assert not _tmp_files(out)


EVALUATE_CASES = ["mask-size-mismatch", "mask-values-0-128-255", "only-masks", "empty-folder", "nonexistent-path",
                  "permission-denied"]


@pytest.mark.parametrize("kind", EVALUATE_CASES)
def test_evaluate_bad_data(kind: str, tiny_model: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    data, named, pattern = _bad_data(kind, tmp_path, monkeypatch)
    out = tmp_path / "eval"
    rc, err = _cli(capsys, "evaluate", "--model", tiny_model, "--data", data if kind != "nonexistent-path" else named,
                   "--split", "all", "--out", out)
    _check_clean_exit_2(rc, err, named, pattern)
    for name in ("summary.json", "cases.csv", "report.html"):
        assert not (out / name).exists(), name
    assert not _tmp_files(out)


def test_evaluate_writes_nothing_for_a_sample_whose_mask_is_bad(tiny_model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mask = _d_mask_size(data)
    rc, _ = _cli(capsys, "evaluate", "--model", tiny_model, "--data", data, "--split", "all", "--out", tmp_path / "e")
    assert rc == 2
    assert not _outputs_of(tmp_path / "e", mio.stem_of(mask).replace("_mask", "_flair"))


def test_image_without_mask_is_left_out_of_supervised_training(tmp_path: Path, capsys, caplog) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _train_set(data)
    extra = _lgg_slices(PATIENTS[0], True)[0][0]
    shutil.copy(extra, data / PATIENTS[0] / extra.name)  # an image without its mask, in a training case
    (data / "TCGA_EXTRA").mkdir()
    shutil.copy(extra, data / "TCGA_EXTRA" / "TCGA_EXTRA_1_flair.png")  # a case without any mask
    caplog.set_level(logging.INFO, logger="medanomaly.train.loop")
    rc, err = _cli(capsys, "train", data, "--out", tmp_path / "model", *TINY)
    assert rc == 0, err
    assert "training on 2 slices (1 val)" in caplog.text  # one labelled slice per training patient
    assert "TCGA_EXTRA" not in (tmp_path / "model" / "splits.json").read_text()


# --- readers: size limit, permissions, loops ------------------------------------------------------

HUGE = {"png": lambda d: _huge_png(d / "huge.png"), "nifti": lambda d: _huge_nifti(d / "huge.nii.gz"),
        "nrrd": lambda d: _huge_nrrd(d / "huge.nrrd"), "tiff": lambda d: _huge_tiff(d / "huge.tif"),
        "dicom": lambda d: _huge_dicom(d / "huge.dcm")}


@pytest.mark.parametrize("fmt", list(HUGE))
def test_crafted_huge_header_is_refused_fast_and_without_memory(fmt: str, tmp_path: Path) -> None:
    path = HUGE[fmt](tmp_path)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MedanomalyError, match=r"MAX_PIXELS") as exc:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a header"
    assert str(path) in str(exc.value)


def _boom(*args, **kwargs):
    raise AssertionError("pixels decoded before the size check")


def _spy(monkeypatch, obj, name: str) -> None:
    monkeypatch.setattr(obj, name, _boom)


def _spy_property(monkeypatch, cls, name: str) -> None:
    monkeypatch.setattr(cls, name, property(_boom))


def _as_mha(src: Path, dst: Path) -> Path:
    sitk.WriteImage(sitk.ReadImage(str(src)), str(dst))
    return dst


SIZE_CHECKED = {  # format -> (real file, the decoding call that must not be reached)
    "png": (lambda d: _lgg_flair(), lambda mp: _spy(mp, ImageFile.ImageFile, "load")),
    "tiff": (lambda d: KAGGLE_TIF, lambda mp: _spy(mp, tifffile.TiffPageSeries, "asarray")),
    "nifti": (lambda d: IXI, lambda mp: _spy(mp, nib.Nifti1Image, "get_fdata")),
    "nrrd": (lambda d: NRRD, lambda mp: _spy(mp, sitk.ImageFileReader, "Execute")),
    "mha": (lambda d: _as_mha(NRRD, d / "brain1.mha"), lambda mp: _spy(mp, sitk.ImageFileReader, "Execute")),
    "dicom": (lambda d: DICOM / "MR_small.dcm", lambda mp: _spy_property(mp, pydicom.Dataset, "pixel_array")),
    "dicom-series": (lambda d: FIELDMAP, lambda mp: _spy_property(mp, pydicom.Dataset, "pixel_array")),
}


@pytest.mark.parametrize("fmt", list(SIZE_CHECKED))
def test_max_pixels_is_checked_from_the_header_before_decoding(fmt: str, tmp_path: Path, monkeypatch) -> None:
    make, spy = SIZE_CHECKED[fmt]
    path = make(tmp_path)
    assert read_image(path).array.size > 1000
    monkeypatch.setattr(mio, "MAX_PIXELS", 1000)
    spy(monkeypatch)
    with pytest.raises(MedanomalyError, match=r"above the limit of 1,000 \(medanomaly\.io\.MAX_PIXELS\)"):
        read_image(path)


def test_permission_denied_names_the_file(tmp_path: Path, monkeypatch) -> None:
    path = _b_permission(tmp_path)
    _deny(monkeypatch, path)
    with pytest.raises(MedanomalyError, match=r"permission denied: .*locked\.png; make it readable"):
        read_image(path)


def test_real_chmod_000_file_and_folder(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: root ignores file permissions, so chmod 000 cannot be tested for real "
                    "(test_permission_denied_names_the_file simulates it)")
    path = _b_permission(tmp_path)
    series = _fieldmap_copy(tmp_path)
    path.chmod(0)
    series.chmod(0)
    try:
        for p in (path, series):
            with pytest.raises(MedanomalyError, match="permission denied"):
                read_image(p)
    finally:
        path.chmod(0o644)
        series.chmod(0o755)


def test_a_pipe_named_like_an_image_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "scan.png")
    with _time_limit(30), pytest.raises(MedanomalyError, match=r"scan\.png is not a regular file"):
        read_image(tmp_path / "scan.png")
    with _time_limit(30):
        assert not mio.is_dicom_series_dir(tmp_path)


def test_symlink_loops_do_not_hang_discovery(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _train_set(data)
    os.symlink(data, data / PATIENTS[0] / "loop")
    os.symlink("self.png", data / "self.png")
    t0 = time.perf_counter()
    samples = discover(data)
    assert time.perf_counter() - t0 < 5
    assert len(samples) == 3 and all(s.mask is not None for s in samples)
    with pytest.raises(MedanomalyError, match="broken symbolic link"):
        read_image(data / "self.png")


def test_mask_reader_outcomes(tmp_path: Path) -> None:
    """The mask kinds at the reader level (train/evaluate see the same messages)."""
    m = _d_mask_values(tmp_path / "a")
    with pytest.raises(MedanomalyError, match=r"\{0,128,255\}"):
        read_mask(m)
    m = _d_mask_size(tmp_path / "b")
    img = read_image(m.with_name(m.name.replace("_mask", "_flair")))
    with pytest.raises(MedanomalyError, match=r"mask 240x240 does not match image 256x256"):
        read_mask(m, like=img)


def test_error_message_keeps_paths_whole(tmp_path: Path, capsys) -> None:
    deep = tmp_path / ("patient-data-" * 4) / ("series-export-" * 6) / "scan"
    deep.mkdir(parents=True)
    rc, err = _cli(capsys, "train", deep, "--out", tmp_path / "m")
    assert rc == 2 and str(deep) in err


def test_outcomes_table_covers_every_case() -> None:
    used = set(PREDICT_CASES) | set(TRAIN_CASES) | {"image-without-mask", "empty-folder", "only-masks"}
    assert used == set(OUTCOMES)
    assert len(OUTCOMES) >= 25

"""Fuzzing of the readers: ``medanomaly.io.read_image`` and ``read_mask`` may raise
:class:`MedanomalyError` on any input, and nothing else (any other exception is a bug), and must
neither hang nor exhaust memory.

(a) random bytes under every supported suffix, bare or behind the format's magic bytes (so the
    parsers get past the first check); (b) mutations of real small files: bytes flipped (mostly
    in the header) and truncation at random offsets, of a DICOM file, an LGG PNG, a JPEG, a
    TIFF, a NIfTI (.nii and .nii.gz), an NRRD, a MetaImage and a DICOM series folder;
    (c) header fields of real files set to hostile values, format-aware (DICOM attributes of a
    file and of one slice of a series, NIfTI header fields, the PNG IHDR with a valid CRC, NRRD
    and MetaImage header lines), where a successful read must also give a finite geometry.

The number of examples per test is small by default (the file runs in seconds in CI); set
``MEDANOMALY_FUZZ_EXAMPLES`` (e.g. 5000) for a longer run.
"""

from __future__ import annotations

import functools
import gzip
import io as _io
import os
import shutil
import signal
import struct
import tempfile
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

import medanomaly.io as mio
from medanomaly.core.errors import MedanomalyError
from medanomaly.io import read_image, read_mask, safety

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()  # the mutation fuzzing starts from real files
EXAMPLES = int(os.environ.get("MEDANOMALY_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: one read of a file of a few kB must never take this long (a hang, or a huge allocation)
SLOW_S = 20.0
#: the fuzzed files are small; a lower size limit keeps a mutated header that claims a large
#: (but allowed) image from allocating hundreds of MB per example. The check itself is the same.
FUZZ_MAX_PIXELS = 2**22

SUFFIXES = (".png", ".jpg", ".tif", ".nii", ".nii.gz", ".nrrd", ".dcm", ".mha")
_NIFTI_HDR = struct.pack("<i", 348) + b"\0" * 36 + struct.pack("<8h", 3, 4, 4, 4, 1, 1, 1, 1)
MAGIC: dict[str, tuple[bytes, ...]] = {
    ".png": (b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
    ".jpg": (b"\xff\xd8\xff\xe0\0\x10JFIF\0", b"\xff\xd8\xff"),
    ".tif": (b"II*\0\x08\0\0\0", b"MM\0*\0\0\0\x08", b"II+\0\x08\0\0\0"),
    ".nii": (_NIFTI_HDR,),
    ".nii.gz": (gzip.compress(_NIFTI_HDR)[:20], b"\x1f\x8b\x08\0"),
    ".nrrd": (b"NRRD0004\ntype: short\ndimension: 2\nsizes: 4 4\nencoding: raw\n\n", b"NRRD0005\n"),
    ".dcm": (b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM\x02\0\x10\0UI"),
    ".mha": (b"ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n",
             b"ObjectType = Image\n"),
}


class _Reads:
    """A scratch folder for the fuzzed files, and the size limit lowered while reading."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="medanomaly-fuzz-"))
        self.n = 0

    def path(self, suffix: str) -> Path:
        """A fresh path; the previous example's files are removed first (thousands of examples)."""
        for old in self.dir.iterdir():
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        self.n += 1
        return self.dir / f"f{self.n}{suffix}"


@pytest.fixture(scope="module")
def scratch():
    s = _Reads()
    yield s
    shutil.rmtree(s.dir, ignore_errors=True)


def _hang(signum, frame):
    raise TimeoutError(f"a read still running after {2 * SLOW_S:.0f} s: a hang")


def _only_medanomaly_errors(path: Path, mask: bool):
    """Read ``path``; the only exception allowed out is MedanomalyError (naming the file), and a
    successful read gives finite values and a finite geometry. Returns the Image (or None)."""
    saved = safety.MAX_PIXELS  # read at call time by the size check, in io.safety
    safety.MAX_PIXELS = FUZZ_MAX_PIXELS
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(int(2 * SLOW_S))
    t0 = time.perf_counter()
    result = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = read_image(path)
            if mask:
                read_mask(path, like=result)
    except MedanomalyError as exc:
        assert str(path) in str(exc) or str(path.parent) in str(exc), f"the message does not name the file: {exc}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        safety.MAX_PIXELS = saved
    assert time.perf_counter() - t0 < SLOW_S, f"reading {path.name} took {time.perf_counter() - t0:.1f} s"
    if result is not None:
        g = result.geometry
        assert result.array.dtype == np.float32 and np.isfinite(result.array).all()
        assert all(np.isfinite(v) for v in (*g.spacing, *g.origin, *g.direction)), (g.spacing, g.origin, g.direction)
        assert all(v > 0 for v in g.spacing), g.spacing
        assert np.isfinite(mio.affine_from_geometry(g)).all()
    return result


# --- (a) random bytes under each suffix ----------------------------------------------------------

@st.composite
def _random_file(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(SUFFIXES))
    prefix = draw(st.one_of(st.just(b""), st.sampled_from(MAGIC[suffix])))
    return suffix, prefix + draw(st.binary(min_size=0, max_size=2048))


@FUZZ
@given(case=_random_file(), mask=st.booleans())
def test_random_bytes_raise_only_medanomaly_errors(scratch, case: tuple[str, bytes], mask: bool) -> None:
    suffix, content = case
    path = scratch.path(suffix)
    path.write_bytes(content)
    _only_medanomaly_errors(path, mask)


# --- (b) mutations of real small files -----------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _seeds() -> dict[str, tuple[str, bytes]]:
    """name -> (suffix, bytes) of small real files (a few made here from real data)."""
    lgg = sorted((DATA / "lgg-flair" / "TCGA_CS_4941_19960909").glob("*_flair.png"))[10]
    grey = np.asarray(PILImage.open(lgg))
    crop = np.asarray(nib.load(str(DATA / "volumes" / "ixi-t1-healthy" / "IXI012-HH-1211-T1_ds.nii.gz")).dataobj[
        50:66, 50:66, 40:44], dtype=np.int16)
    seeds = {"dicom": (".dcm", (DATA / "dicom" / "MR_small.dcm").read_bytes()),
             "dicom-rle": (".dcm", (DATA / "dicom" / "MR_small_RLE.dcm").read_bytes()),
             "png": (".png", lgg.read_bytes()),
             "mask-png": (".png", lgg.with_name(lgg.name.replace("_flair", "_mask")).read_bytes())}
    buf = _io.BytesIO()
    PILImage.fromarray(grey[96:160, 96:160]).save(buf, format="JPEG", quality=90)
    seeds["jpeg"] = (".jpg", buf.getvalue())
    buf = _io.BytesIO()
    tifffile.imwrite(buf, np.stack([grey[96:128, 96:128]] * 3, axis=-1), photometric="rgb")
    seeds["tiff"] = (".tif", buf.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        img = nib.Nifti1Image(crop, np.diag([2.0, 2.0, 2.0, 1.0]))
        for name, suffix in (("nifti", ".nii"), ("nifti-gz", ".nii.gz")):
            nib.save(img, f"{tmp}/v{suffix}")
            seeds[name] = (suffix, Path(f"{tmp}/v{suffix}").read_bytes())
        itk = sitk.GetImageFromArray(np.ascontiguousarray(crop.transpose(2, 1, 0)))
        itk.SetSpacing((2.0, 2.0, 2.0))
        for name, suffix in (("nrrd", ".nrrd"), ("mha", ".mha")):
            sitk.WriteImage(itk, f"{tmp}/v{suffix}", False)
            seeds[name] = (suffix, Path(f"{tmp}/v{suffix}").read_bytes())
    return seeds


@st.composite
def _mutation(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(_seeds()) + ["series"]))
    if name == "series":  # a slice of the real field-map series
        suffix, blob = "series", (DATA / "dicom-series" / "mr-gre-fieldmap-axial" / "00012.dcm").read_bytes()
    else:
        suffix, blob = _seeds()[name]
    data = bytearray(blob)
    head = min(len(data), 1024)  # headers are where parsers go wrong: most flips land there
    offsets = st.one_of(st.integers(0, head - 1), st.integers(0, len(data) - 1))
    for offset, value in draw(st.lists(st.tuples(offsets, st.integers(0, 255)), max_size=12)):
        data[offset] = value
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return suffix, bytes(data)


@needs_data
@FUZZ
@given(case=_mutation(), mask=st.booleans())
def test_mutated_real_files_raise_only_medanomaly_errors(scratch, case: tuple[str, bytes], mask: bool) -> None:
    suffix, content = case
    if suffix != "series":
        path = scratch.path(suffix)
        path.write_bytes(content)
        _only_medanomaly_errors(path, mask)
        return
    # a 3-slice series folder of the real field map with one mutated slice
    folder = scratch.path("")
    folder.mkdir()
    series = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
    for name in ("00010.dcm", "00011.dcm"):
        shutil.copy(series / name, folder / name)
    (folder / "00012.dcm").write_bytes(content if len(content) else b"\0")
    if mio.is_dicom_series_dir(folder):
        _only_medanomaly_errors(folder, mask)
    else:
        _only_medanomaly_errors(folder / "00012.dcm", mask)


# --- (c) hostile values in the header fields of real files --------------------------------------

_INTS = st.one_of(st.integers(-3, 70_000), st.sampled_from([0, 1, 2, 3, 7, 8, 12, 16, 32, 64, 255, 65535]))
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, -0.0, 1e-30, 1e30, -1.0, float("nan"), float("inf")]))
_WORDS = st.one_of(st.text(st.characters(codec="latin-1"), max_size=12),
                   st.sampled_from(["", "0", "-1", "nan", "inf", "1e400", "abc", "1\\2", "\\\\"]))

#: DICOM attribute -> strategy of values (kept to the attribute's VR so pydicom writes them)
_DICOM_FIELDS = {
    "Rows": st.integers(0, 65535), "Columns": st.integers(0, 65535), "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 65), "HighBit": st.integers(0, 65), "PixelRepresentation": st.integers(0, 3),
    "SamplesPerPixel": st.integers(0, 5), "PlanarConfiguration": st.integers(0, 2),
    "NumberOfFrames": st.integers(-2, 70_000).map(str),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                                                  "PALETTE COLOR", "ARGB", "", "XYZ"]),
    "RescaleSlope": _FLOATS.map(repr), "RescaleIntercept": _FLOATS.map(repr),
    "PixelSpacing": st.lists(_FLOATS.map(repr), min_size=0, max_size=3),
    "SliceThickness": _FLOATS.map(repr), "SpacingBetweenSlices": _FLOATS.map(repr),
    "ImagePositionPatient": st.lists(_FLOATS.map(repr), min_size=0, max_size=4),
    "ImageOrientationPatient": st.lists(st.one_of(_FLOATS, st.sampled_from([0.0, 1.0, -1.0])).map(repr),
                                        min_size=0, max_size=7),
    "SeriesInstanceUID": st.sampled_from(["1.2.3", "", "1.2.840.10008.1.2"]),
}


@contextmanager
def _lenient_pydicom():
    """Let pydicom write the hostile values (its writing validation raises by default)."""
    settings_ = pydicom.config.settings
    saved = settings_.writing_validation_mode, settings_.reading_validation_mode
    settings_.writing_validation_mode = settings_.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings_.writing_validation_mode, settings_.reading_validation_mode = saved


def _dicom_with(src: Path, changes: list[tuple[str, object]], dst: Path) -> bool:
    with _lenient_pydicom(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(src)
        for keyword, value in changes:
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        try:
            ds.save_as(dst, enforce_file_format=False)
        except Exception:  # noqa: BLE001 - a value pydicom cannot write at all: not a file to test
            return False
    return True


_NIFTI_FIELDS = {  # name -> (offset, struct format of one value, count)
    "dim": (40, "h", 8), "intent_code": (68, "h", 1), "datatype": (70, "h", 1), "bitpix": (72, "h", 1),
    "pixdim": (76, "f", 8), "vox_offset": (108, "f", 1), "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1),
    "qform_code": (252, "h", 1), "sform_code": (254, "h", 1), "quatern": (256, "f", 6), "srow": (280, "f", 12),
}
_NIFTI_DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 7, 9999]

_TEXT_FIELDS = {  # header key -> hostile values (NRRD "key: value", MetaImage "Key = Value")
    "type": ["uchar", "short", "float", "double", "int64", "block", "garbage", ""],
    "dimension": ["0", "1", "2", "3", "4", "17", "-1", "x"],
    "sizes": ["4 4 4", "0 16 4", "-1 16 4", "16 16", "16 16 4 2", "99999 99999 99999", "nan 1 1", "16 16 4"],
    "encoding": ["raw", "gzip", "ascii", "hex", "bzip2", "txt", "nope"],
    "endian": ["little", "big", "middle"],
    "space directions": ["(2,0,0) (0,2,0) (0,0,2)", "(nan,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,0,0) (0,0,0)", "none"],
    "space origin": ["(0,0,0)", "(nan,inf,0)", "(1,2)"],
    "data file": ["LOCAL", "missing.raw", "/dev/null", "%03d.raw 1 3 1", "LIST"],
    "NDims": ["0", "1", "2", "3", "4", "-2", "x"],
    "DimSize": ["16 16 4", "0 16 4", "-1 16 4", "99999 99999 99999", "16 16", "16"],
    "ElementType": ["MET_UCHAR", "MET_SHORT", "MET_FLOAT", "MET_DOUBLE", "MET_LONG_LONG", "MET_STRING", "MET_NONE"],
    "ElementSpacing": ["2 2 2", "0 0 0", "nan 1 1", "-1 1 1", "1e400 1 1"],
    "Offset": ["0 0 0", "nan 0 0", "inf 1 2"],
    "TransformMatrix": ["1 0 0 0 1 0 0 0 1", "0 0 0 0 0 0 0 0 0", "nan 0 0 0 1 0 0 0 1"],
    "CompressedData": ["True", "False", "Maybe"],
    "ElementNumberOfChannels": ["1", "3", "0", "-1", "1000"],
    "HeaderSize": ["0", "-1", "100000", "1"],
    "ElementDataFile": ["LOCAL", "missing.raw", "/dev/null", "LIST", "%03d.raw 1 3 1"],
}


def _set_text_field(header: bytes, key: str, value: str, nrrd: bool) -> bytes:
    text = header.decode("latin-1")
    sep = ": " if nrrd else " = "
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.split(":" if nrrd else "=", 1)[0].strip() == key:
            lines[i] = key + sep + value
            return "\n".join(lines).encode("latin-1")
    insert = 1 if nrrd else max(0, len(lines) - 2)  # before the data file line of a MetaImage
    return "\n".join(lines[:insert] + [key + sep + value] + lines[insert:]).encode("latin-1")


@st.composite
def _hostile_header(draw) -> tuple[str, object]:
    fmt = draw(st.sampled_from(["dicom", "dicom-series", "nifti", "png", "nrrd", "mha"]))
    if fmt.startswith("dicom"):
        keys = draw(st.lists(st.sampled_from(sorted(_DICOM_FIELDS)), min_size=1, max_size=4, unique=True))
        return fmt, [(k, draw(st.one_of(st.none(), _DICOM_FIELDS[k]) if draw(st.booleans()) else _DICOM_FIELDS[k]))
                     for k in keys]
    if fmt == "nifti":
        data = bytearray(_seeds()["nifti"][1])
        for name in draw(st.lists(st.sampled_from(sorted(_NIFTI_FIELDS)), min_size=1, max_size=3, unique=True)):
            offset, code, count = _NIFTI_FIELDS[name]
            values = draw(st.lists(st.sampled_from(_NIFTI_DATATYPES) if name == "datatype" else
                                   (st.integers(-32768, 32767) | st.integers(-2, 70)) if code == "h" else _FLOATS,
                                   min_size=count, max_size=count))
            struct.pack_into(f"<{count}{code}", data, offset, *values)
        return fmt, bytes(data)
    if fmt == "png":
        raw = _seeds()["png"][1]
        n = struct.unpack(">I", raw[8:12])[0]
        fields = draw(st.tuples(st.integers(0, 4096) | st.integers(0, 2**32 - 1), st.integers(0, 4096),
                                st.sampled_from([1, 2, 4, 8, 16, 3, 0]), st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
                                st.sampled_from([0]), st.sampled_from([0]), st.sampled_from([0, 1, 2])))
        ihdr = struct.pack(">IIBBBBB", *fields)
        chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
        return fmt, raw[:8] + chunk + raw[8 + 12 + n:]
    suffix = "." + fmt
    raw = _seeds()[fmt][1]
    nrrd = fmt == "nrrd"
    head, sep, body = raw.partition(b"\n\n" if nrrd else b"ElementDataFile = LOCAL\n")
    if not nrrd:
        head, body = head + sep, body
        sep = b""
    keys = [k for k in _TEXT_FIELDS if (k[0].islower()) == nrrd]
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        value = draw(st.sampled_from(_TEXT_FIELDS[key]) | _WORDS.filter(lambda w: "\n" not in w and "\r" not in w))
        head = _set_text_field(head, key, value, nrrd)
    return suffix, head + sep + body


@needs_data
@FUZZ
@given(case=_hostile_header(), mask=st.booleans())
def test_hostile_header_fields_raise_only_medanomaly_errors(scratch, case: tuple[str, object], mask: bool) -> None:
    fmt, content = case
    if fmt == "dicom":
        path = scratch.path(".dcm")
        if _dicom_with(DATA / "dicom" / "MR_small.dcm", content, path):
            _only_medanomaly_errors(path, mask)
    elif fmt == "dicom-series":
        folder = scratch.path("")
        folder.mkdir()
        series = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
        for name in ("00010.dcm", "00011.dcm"):
            shutil.copy(series / name, folder / name)
        if _dicom_with(series / "00012.dcm", content, folder / "00012.dcm"):
            _only_medanomaly_errors(folder if mio.is_dicom_series_dir(folder) else folder / "00012.dcm", mask)
    else:
        path = scratch.path({"nifti": ".nii", "png": ".png"}.get(fmt, fmt))
        path.write_bytes(content)
        _only_medanomaly_errors(path, mask)


def test_fuzz_count_is_configurable() -> None:
    """MEDANOMALY_FUZZ_EXAMPLES raises the number of examples (the default keeps CI fast)."""
    assert FUZZ.max_examples == (EXAMPLES or 200) and FUZZ.deadline is None

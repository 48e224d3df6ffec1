"""The size limit that depends on memory: the smaller of ``medanomaly.io.safety.MAX_PIXELS`` and what
the available memory (MemAvailable, or the room under a cgroup limit) allows at SAFETY_FACTOR float32
copies per value, checked from the header of every reader's format before anything is decoded.
Files are the real ones of ../shared/data, or copies whose header is patched here."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image as PILImage
from PIL import ImageFile

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import dicom_series, read_image, safety

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
PH2 = DATA / "ph2" / "images" / "IMD002.jpg"
KAGGLE_TIF = DATA / "lgg-kaggle3m-sample" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10.tif"
IXI = DATA / "volumes" / "ixi-t1-healthy" / "IXI012-HH-1211-T1_ds.nii.gz"
NRRD = DATA / "volumes" / "brain1_image.nrrd"
DICOM = DATA / "dicom"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
GIB = 2**30


# --- the limit ----------------------------------------------------------------------------------------

def _memory_files(tmp_path: Path, monkeypatch, meminfo: str | None, v2: tuple[str, ...] | None = None,
                  v1: tuple[str, ...] | None = None) -> None:
    """/proc/meminfo and the cgroup files (limit, usage[, memory.stat]) replaced by files written here
    (None: absent)."""
    def put(name: str, text: str | None) -> Path:
        path = tmp_path / name
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        return path

    monkeypatch.setattr(safety, "_MEMINFO", put("meminfo", meminfo))
    monkeypatch.setattr(safety, "_CGROUP_FILES", (
        (put("memory.max", v2 and v2[0]), put("memory.current", v2 and v2[1]), put("v2.stat", v2[2] if v2 and len(v2) > 2 else None)),
        (put("limit_in_bytes", v1 and v1[0]), put("usage_in_bytes", v1 and v1[1]),
         put("v1.stat", v1[2] if v1 and len(v1) > 2 else None))))


MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8388608 kB\n"  # 8 GiB


def test_available_memory_is_the_smaller_of_memavailable_and_the_cgroup_room(tmp_path: Path, monkeypatch) -> None:
    _memory_files(tmp_path, monkeypatch, MEMINFO)
    assert safety.available_memory() == 8 * GIB
    _memory_files(tmp_path, monkeypatch, MEMINFO, v2=(str(3 * GIB), str(GIB)))  # a 3 GiB container, 1 GiB used
    assert safety.available_memory() == 2 * GIB
    _memory_files(tmp_path, monkeypatch, MEMINFO, v2=("max\n", str(GIB)))  # cgroup v2 without a limit
    assert safety.available_memory() == 8 * GIB
    _memory_files(tmp_path, monkeypatch, MEMINFO, v1=(str(2**63 - 4096), "123"))  # cgroup v1 "no limit"
    assert safety.available_memory() == 8 * GIB
    _memory_files(tmp_path, monkeypatch, None, v1=(str(4 * GIB), str(GIB)))
    assert safety.available_memory() == 3 * GIB
    # page cache counts in a cgroup's usage, but its inactive part is reclaimed before the limit bites
    _memory_files(tmp_path, monkeypatch, MEMINFO, v2=(str(3 * GIB), str(3 * GIB), f"anon 1\ninactive_file {GIB}\n"))
    assert safety.available_memory() == GIB
    _memory_files(tmp_path, monkeypatch, None, v1=(str(4 * GIB), str(4 * GIB), f"cache 5\ntotal_inactive_file {GIB}\n"))
    assert safety.available_memory() == GIB
    _memory_files(tmp_path, monkeypatch, None)  # not Linux: unknown
    assert safety.available_memory() is None


def test_pixel_limit_is_the_smaller_of_max_pixels_and_memory(monkeypatch) -> None:
    per_value = 4 * safety.SAFETY_FACTOR
    monkeypatch.setattr(safety, "available_memory", lambda: 4 * GIB)
    assert safety.pixel_limit() == (4 * GIB // per_value, 4 * GIB)
    monkeypatch.setattr(safety, "available_memory", lambda: 1024 * GIB)
    assert safety.pixel_limit()[0] == safety.MAX_PIXELS
    monkeypatch.setattr(safety, "MAX_PIXELS", 1000)  # still the user's knob
    assert safety.pixel_limit()[0] == 1000
    monkeypatch.setattr(safety, "available_memory", lambda: None)
    assert safety.pixel_limit() == (1000, None)


def test_messages_say_which_limit_binds(monkeypatch) -> None:
    monkeypatch.setattr(safety, "available_memory", lambda: 4 * GIB)
    with pytest.raises(MedanomalyError, match=r"scan\.png: the header gives the image size 1x10000x10000 = "
                                              r"100,000,000 values, above the limit of 26,843,545 values that the "
                                              r"available memory allows \(4\.0 GiB / 160 bytes per value read; "
                                              r"medanomaly\.io\.safety\.MAX_PIXELS = 268,435,456 caps it\)"):
        safety._check_size(Path("scan.png"), (1, 10000, 10000))
    monkeypatch.setattr(safety, "available_memory", lambda: 1024 * GIB)
    safety._check_size(Path("scan.png"), (1, 10000, 10000))  # 16 GB needed, 1 TiB free: read
    with pytest.raises(MedanomalyError, match=r"above the limit of 268,435,456 \(medanomaly\.io\.safety\.MAX_PIXELS\)"):
        safety._check_size(Path("scan.png"), (1, 20000, 20000))


# --- every reader checks it from the header -----------------------------------------------------------

def _spy(monkeypatch, obj, name: str, prop: bool = False) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("pixels decoded before the size check")
    monkeypatch.setattr(obj, name, property(boom) if prop else boom)


#: format -> (the real file, the decoding call that must not be reached)
READERS = {
    "png": (lambda flair: flair, lambda mp: _spy(mp, ImageFile.ImageFile, "load")),
    "jpeg": (lambda flair: PH2, lambda mp: _spy(mp, ImageFile.ImageFile, "load")),
    "tiff": (lambda flair: KAGGLE_TIF, lambda mp: _spy(mp, tifffile.TiffPageSeries, "asarray")),
    "nifti": (lambda flair: IXI, lambda mp: _spy(mp, nib.Nifti1Image, "get_fdata")),
    "nrrd": (lambda flair: NRRD, lambda mp: _spy(mp, sitk.ImageFileReader, "Execute")),
    "dicom": (lambda flair: DICOM / "MR_small.dcm", lambda mp: _spy(mp, pydicom.Dataset, "pixel_array", prop=True)),
    "dicom-series": (lambda flair: FIELDMAP, lambda mp: _spy(mp, pydicom.Dataset, "pixel_array", prop=True)),
}


@pytest.mark.shared_data()
@pytest.mark.parametrize("fmt", list(READERS))
def test_every_reader_checks_the_memory_limit_before_decoding(fmt: str, monkeypatch, real_lgg) -> None:
    real, spy = READERS[fmt]
    path = real(real_lgg.flair)
    assert read_image(path).array.size > 4000
    monkeypatch.setattr(safety, "available_memory", lambda: 4000 * 4 * safety.SAFETY_FACTOR)  # room for 4000 values
    spy(monkeypatch)
    with pytest.raises(MedanomalyError, match=r"above the limit of 4,000 values that the available memory allows") as exc:
        read_image(path)
    assert str(path) in str(exc.value)


# --- through train: a crafted header is refused in a moment, before anything is written ----------------

def _patched_png(flair: Path, path: Path, width: int, height: int) -> Path:
    """A real FLAIR PNG whose IHDR (CRC fixed) claims width x height."""
    raw = bytearray(flair.read_bytes())
    assert raw[12:16] == b"IHDR"
    struct.pack_into(">II", raw, 16, width, height)
    struct.pack_into(">I", raw, 29, zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    return path


def _patched_jpeg(flair: Path, path: Path, side: int) -> Path:
    """A real FLAIR slice saved as JPEG whose SOF0 header claims side x side."""
    buf = io.BytesIO()
    PILImage.open(flair).save(buf, "JPEG", quality=95)
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    struct.pack_into(">HH", raw, sof + 5, side, side)
    path.write_bytes(bytes(raw))
    return path


def _train_refuses(cli, tmp_path: Path, real_lgg, make, says: str, flags: list[str]) -> Path:
    data = tmp_path / "data"
    img, _ = real_lgg.train_set(data)[real_lgg.patients[0]][0]
    bad = make(img)
    if bad != img:
        img.unlink()
    out = tmp_path / "model"
    t0 = time.perf_counter()
    err = cli.refuses("train", data, "--out", out, *flags, says=says, untouched=(data, out))
    assert time.perf_counter() - t0 < 30 and cli.names(err, bad), err
    return bad


@pytest.mark.shared_data("lgg-flair")
def test_bad_png_declaring_10000x10000_with_4_gib_free(tmp_path: Path, cli, real_lgg, monkeypatch,
                                                     tiny_train_flags) -> None:
    """The issue's example: a small PNG whose header declares 10 000 x 10 000 pixels (13 GB in predict)."""
    monkeypatch.setattr(safety, "available_memory", lambda: 4 * GIB)
    bad = _train_refuses(cli, tmp_path, real_lgg, lambda img: _patched_png(img, img, 10000, 10000),
                         r"1x10000x10000 = 100,000,000 values, above the limit of 26,843,545 values that the "
                         r"available memory allows \(4\.0 GiB", tiny_train_flags)
    assert bad.stat().st_size < 138_000


@pytest.mark.shared_data("lgg-flair")
def test_bad_jpeg_huge_header(tmp_path: Path, cli, real_lgg, tiny_train_flags) -> None:
    _train_refuses(cli, tmp_path, real_lgg, lambda img: _patched_jpeg(img, img.with_suffix(".jpg"), 65535),
                   r"65535x65535 = 4,294,836,225 values, above the limit of [\d,]+ .*MAX_PIXELS", tiny_train_flags)


@pytest.mark.shared_data("dicom-series")
def test_a_large_series_is_checked_before_its_pixel_data_is_loaded(monkeypatch) -> None:
    """Above _DEFER_ABOVE bytes of files, a series' headers are read first (pixel data deferred), so
    the size check runs before any pixel byte is in memory; the values read are the same."""
    expected = read_image(FIELDMAP).array
    calls = []
    real_dcmread = pydicom.dcmread
    monkeypatch.setattr(dicom_series.pydicom, "dcmread", lambda f, **kw: calls.append(kw) or real_dcmread(f, **kw))
    monkeypatch.setattr(dicom_series, "_DEFER_ABOVE", 0)
    np.testing.assert_array_equal(read_image(FIELDMAP).array, expected)
    assert [kw.get("defer_size") for kw in calls[-36:]] == ["64 KB"] * 36  # (the first call: the series probe)

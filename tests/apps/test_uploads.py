"""The upload checks of ``medanomaly serve`` (medanomaly.apps.uploads) on hand-made bytes: a file's
kind from its first bytes, the name/content agreement, the image size a header declares (read
without decoding), the safe extraction of zipped DICOM series (paths, links, encryption, entry count
and size limits), finding the one series inside, and the server's private folders (locked while
their run lives; those of killed runs removed by the next)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from medanomaly.apps.uploads import (
    ROOT_PREFIX,
    SUFFIX_KINDS,
    ApiError,
    _member_path,
    check_type,
    declared_shape,
    extract_zip,
    find_series,
    make_private_root,
    remove_stale_roots,
    sniff,
)
from medanomaly.core.errors import MedanomalyError

DICOM_HEAD = bytes(128) + b"DICM"


def _png_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _nifti_gz_head() -> bytes:
    return gzip.compress(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_bytes())[:2000]


def _nifti1_header(byteorder: str = "<") -> bytes:
    """The 348 bytes of a NIfTI-1 header as far as sniff looks: sizeof_hdr and the magic."""
    head = bytearray(348)
    struct.pack_into(f"{byteorder}i", head, 0, 348)
    head[344:348] = b"n+1\x00"
    return bytes(head)


# --- types --------------------------------------------------------------------------------------

def test_type_checks():
    assert sniff(_png_bytes()[:64]) == "png"
    assert sniff(b"\xff\xd8\xff\xe0") == "jpeg" and sniff(b"II*\x00....") == "tiff"
    assert sniff(bytes(128) + b"DICM") == "dicom" and sniff(b"PK\x03\x04") == "zip"
    assert check_type("IM0001", bytes(128) + b"DICM") == ".dcm"  # no suffix: typed by content
    assert check_type("A.NII.GZ", _nifti_gz_head()) == ".nii.gz"


@pytest.mark.parametrize("head, kind", [
    (b"MM\x00*rest", "tiff"), (b"II+\x00rest", "tiff"),  # big-endian TIFF, BigTIFF
    (b"PK\x05\x06" + bytes(18), "zip"),  # an empty archive
    (gzip.compress(b"just some text"), "gzip"),  # gzip, but not a NIfTI inside
    (_nifti1_header("<"), "nifti"), (_nifti1_header(">"), "nifti"),
    (struct.pack("<i", 540) + b"n+2\x00\r\n\x1a\n", "nifti"),  # NIfTI-2
    (b"Patient list, not an image\n", None), (b"", None),
])
def test_sniff_reads_the_kind_from_the_first_bytes(head: bytes, kind: str | None) -> None:
    assert sniff(head) == kind


def test_dicom_file_with_a_tiff_preamble_is_dicom_unless_named_tif() -> None:
    """Dual-personality files (the shared MR_small.dcm is one): a TIFF header in the DICOM preamble."""
    dual = b"II*\x00" + bytes(124) + b"DICM"
    assert sniff(dual) == "dicom" and check_type("IM0001", dual) == ".dcm" and check_type("a.dcm", dual) == ".dcm"
    assert check_type("a.tif", dual) == ".tif"


def test_nifti_magic_with_a_wrong_header_size_is_not_nifti() -> None:
    head = bytearray(_nifti1_header())
    struct.pack_into("<i", head, 0, 349)
    assert sniff(bytes(head)) is None


@pytest.mark.parametrize("name, head, status, words", [
    ("notes.txt", b"hello", 415, "unsupported file type '.txt'"),
    ("README", b"hello", 415, "unsupported file type 'no suffix'"),
    ("scan.png", b"\xff\xd8\xff\xe0", 422, "scan.png is not a PNG file (its content is JPEG)"),
    ("scan.png", b"this is text", 422, "its content is not an image format medanomaly reads"),
    ("vol.nii.gz", gzip.compress(b"text"), 422, "is not a gzip-compressed NIfTI file (its content is gzip)"),
])
def test_check_type_refuses_what_the_viewer_cannot_take(name: str, head: bytes, status: int, words: str) -> None:
    with pytest.raises(ApiError) as exc:
        check_type(name, head)
    assert exc.value.status == status and words in exc.value.message


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["a.png", "b.JPG", "c.tif", "d.nii", "e.nii.gz", "f.dcm", "g.zip", "h", "i.txt"]),
       head=st.binary(max_size=600) | st.sampled_from([_png_bytes()[:64], DICOM_HEAD, b"PK\x03\x04"]))
def test_check_type_either_agrees_or_refuses_with_415_or_422(name: str, head: bytes) -> None:
    """Any name and content: a supported suffix whose kind is the content's, or an ApiError."""
    try:
        suffix = check_type(name, head)
    except ApiError as exc:
        assert exc.status in (415, 422) and exc.message.startswith(name)
        return
    assert suffix in SUFFIX_KINDS and sniff(head) == SUFFIX_KINDS[suffix]


# --- zip ----------------------------------------------------------------------------------------

def test_extract_zip_counts_real_bytes(tmp_path, make_zip):
    """A header that understates a member's size cannot get past the cap: the bytes are counted."""
    z = tmp_path / "a.zip"
    z.write_bytes(make_zip({"a/b.dcm": bytes(5000)}))
    extract_zip(z, tmp_path / "ok", max_bytes=5000)
    assert (tmp_path / "ok" / "a" / "b.dcm").stat().st_size == 5000
    with pytest.raises(MedanomalyError, match="more than"):
        extract_zip(z, tmp_path / "small", max_bytes=4999)


@pytest.mark.parametrize("bad", ["../evil", "series/../../evil", "/etc/evil", "C:/evil", "\\evil", "a\\..\\evil"])
def test_unsafe_entries_are_refused_before_anything_is_written(bad: str, tmp_path: Path, make_zip) -> None:
    z = tmp_path / "s.zip"
    z.write_bytes(make_zip({"series/a.dcm": b"x", bad: b"owned"}))
    with pytest.raises(MedanomalyError, match="unsafe entry"):
        extract_zip(z, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("evil"))


def test_folders_hidden_files_and_macos_metadata_are_skipped(tmp_path: Path, make_zip) -> None:
    z = tmp_path / "s.zip"
    z.write_bytes(make_zip({"series/": b"", "series/a.dcm": b"1", "series/.DS_Store": b"2", "__MACOSX/series/._a.dcm": b"3",
                        "./series/./b.dcm": b"4"}))
    out = extract_zip(z, tmp_path / "out", max_bytes=1000)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["series/a.dcm",
                                                                                          "series/b.dcm"]


def test_entry_count_and_declared_size_are_limited(tmp_path: Path, make_zip) -> None:
    z = tmp_path / "s.zip"
    z.write_bytes(make_zip({f"s/{i}.dcm": b"x" for i in range(3)}))
    with pytest.raises(MedanomalyError, match="holds 3 entries, more than the 2 allowed"):
        extract_zip(z, tmp_path / "a", max_bytes=1000, max_members=2)
    assert extract_zip(z, tmp_path / "b", max_bytes=3, max_members=3) == tmp_path / "b"
    with pytest.raises(MedanomalyError, match="uncompressed, more than"):
        extract_zip(z, tmp_path / "c", max_bytes=2)
    assert not (tmp_path / "c").exists()


def test_links_encryption_duplicates_and_non_zips_are_refused(tmp_path: Path, make_zip) -> None:
    link = zipfile.ZipInfo("series/link.dcm")
    link.external_attr = 0o120777 << 16  # a symbolic link, as `zip --symlinks` stores it
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(buf.getvalue())
    with pytest.raises(MedanomalyError, match="symbolic link 'series/link.dcm'"):
        extract_zip(tmp_path / "link.zip", tmp_path / "a", max_bytes=1000)

    raw = bytearray(make_zip({"series/a.dcm": b"x"}))
    raw[raw.find(b"PK\x01\x02") + 8] |= 0x1  # the central directory's "encrypted" flag
    (tmp_path / "enc.zip").write_bytes(bytes(raw))
    with pytest.raises(MedanomalyError, match=r"is encrypted \(series/a.dcm\)"):
        extract_zip(tmp_path / "enc.zip", tmp_path / "b", max_bytes=1000)

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("series/a.dcm", b"1")
        zf.writestr("series/a.dcm", b"2")
    (tmp_path / "dup.zip").write_bytes(buf.getvalue())
    with pytest.raises(MedanomalyError, match="holds a.dcm twice"):
        extract_zip(tmp_path / "dup.zip", tmp_path / "c", max_bytes=1000)

    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 but nothing else")
    with pytest.raises(MedanomalyError, match="not.zip is not a readable zip archive"):
        extract_zip(tmp_path / "not.zip", tmp_path / "d", max_bytes=1000)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab./\\:C\x00_M"), max_size=12))
def test_member_paths_are_refused_skipped_or_safe_and_relative(name: str) -> None:
    """Whatever an archive calls an entry, it is refused, skipped, or a plain relative path that
    stays inside the extraction folder."""
    try:
        rel = _member_path(name)
    except MedanomalyError as exc:
        assert "unsafe entry" in str(exc)
        return
    if rel is None:
        return
    assert isinstance(rel, PurePosixPath) and not rel.is_absolute() and rel.parts
    assert all(p not in ("", ".", "..") and not p.startswith(".") and "\\" not in p for p in rel.parts)


# --- the series inside ----------------------------------------------------------------------------

def test_find_series_wants_exactly_one(tmp_path: Path, shared_data) -> None:
    dcm = shared_data("dicom/MR_small.dcm")
    (tmp_path / "z" / "a" / "s1").mkdir(parents=True)
    (tmp_path / "z" / "notes.txt").write_text("not a series\n")
    with pytest.raises(MedanomalyError, match="up.zip holds no DICOM series"):
        find_series(tmp_path / "z", "up.zip")
    shutil.copy(dcm, tmp_path / "z" / "a" / "s1" / "1.dcm")
    assert find_series(tmp_path / "z", "up.zip") == tmp_path / "z" / "a" / "s1"
    (tmp_path / "z" / "s2").mkdir()
    shutil.copy(dcm, tmp_path / "z" / "s2" / "1.dcm")
    with pytest.raises(MedanomalyError, match=r"up.zip holds 2 DICOM series \(a/s1/, s2/\)"):
        find_series(tmp_path / "z", "up.zip")



# --- the size a header declares -------------------------------------------------------------------

def _png_declaring(width: int, height: int, colour: int = 0) -> bytes:
    """A PNG whose header declares width x height (8-bit, colour type ``colour``) and whose pixel
    data stops after one row: only the header is read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))


def _saved(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def test_declared_shape_of_rasters(tmp_path: Path) -> None:
    assert declared_shape(_saved(tmp_path, "a.png", _png_bytes(64))) == (1, 64, 64)
    assert declared_shape(_saved(tmp_path, "big.png", _png_declaring(10_000, 10_000))) == (1, 10_000, 10_000)
    assert declared_shape(_saved(tmp_path, "rgb.png", _png_declaring(30, 20, colour=2))) == (3, 20, 30)
    buf = io.BytesIO()
    PILImage.new("RGB", (48, 32)).save(buf, "JPEG", progressive=True, exif=b"Exif\x00\x00" + bytes(3000))
    assert declared_shape(_saved(tmp_path, "a.jpg", buf.getvalue())) == (3, 32, 48)  # past APP1, progressive SOF2
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((3, 20, 30), np.uint16), photometric="minisblack")
    assert declared_shape(tmp_path / "a.tif") == (3, 20, 30)


def test_declared_shape_of_volumes_and_dicom(tmp_path: Path, shared_data) -> None:
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 3), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    assert declared_shape(tmp_path / "v.nii.gz") == (24, 20, 3)
    dcm = shared_data("dicom/MR_small.dcm")
    header = pydicom.dcmread(dcm, stop_before_pixels=True)
    rows, cols = int(header.Rows), int(header.Columns)
    assert declared_shape(Path(shutil.copy(dcm, tmp_path / "one.dcm"))) == (1, rows, cols, 1)
    (tmp_path / "series").mkdir()
    for k in range(3):
        shutil.copy(dcm, tmp_path / "series" / f"{k}.dcm")
    assert declared_shape(tmp_path / "series") == (3, rows, cols, 1)


@pytest.mark.parametrize("name, data", [("cut.png", b"\x89PNG\r\n\x1a\n"), ("x.jpg", b"\xff\xd8\xff"),
                                        ("x.nii", b"not nifti"), ("x.dcm", bytes(128) + b"DICM"),
                                        ("x.tif", b"II*\x00")])
def test_declared_shape_is_none_for_headers_that_do_not_parse(tmp_path: Path, name: str, data: bytes) -> None:
    assert declared_shape(_saved(tmp_path, name, data)) is None  # the reader will say what is wrong


@settings(max_examples=150, deadline=2000)
@given(name=st.sampled_from(["a.png", "a.jpg"]), body=st.binary(max_size=200))
def test_declared_shape_of_any_bytes_is_a_shape_or_none(tmp_path_factory, name: str, body: bytes) -> None:
    """Whatever follows the magic (crafted segment lengths included): a tuple of ints or None, at once."""
    magic = b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"\xff\xd8"
    shape = declared_shape(_saved(tmp_path_factory.mktemp("any"), name, magic + body))
    assert shape is None or all(isinstance(d, int) for d in shape)


# --- private folders ------------------------------------------------------------------------------

def _stale(base: Path, pid: int = 99_999_999, lock: bool = False) -> Path:
    """A folder as a dead run (a pid that cannot exist) leaves it, with a kept upload inside."""
    root = base / f"{ROOT_PREFIX}{pid}-abc"
    (root / "kept" / "sid").mkdir(parents=True)
    (root / "kept" / "sid" / "upload.png").write_bytes(b"patient image")
    if lock:
        (root / "owner.lock").write_bytes(b"")  # a lock file nobody holds
    return root


@pytest.mark.skipif(os.name != "posix", reason="stale folders are found with flock and pids (POSIX)")
def test_stale_roots_go_live_ones_stay(tmp_path: Path) -> None:
    live, fd = make_private_root(tmp_path)
    try:
        assert live.name.startswith(f"{ROOT_PREFIX}{os.getpid()}-") and (live / "owner.lock").is_file()
        assert live.stat().st_mode & 0o777 == 0o700
        dead, dead_locked = _stale(tmp_path), _stale(tmp_path, 99_999_998, lock=True)
        starting = tmp_path / f"{ROOT_PREFIX}{os.getpid()}-starting"  # a live pid, no lock file yet
        old = tmp_path / f"{ROOT_PREFIX}abcd1234"  # no pid in the name: not this code's to judge
        other = tmp_path / "not-medanomaly"
        for d in (starting, old, other):
            d.mkdir()
        os.symlink(other, tmp_path / f"{ROOT_PREFIX}1-link")  # links are never followed
        assert remove_stale_roots(tmp_path) == [dead_locked, dead]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live.name, starting.name, old.name, other.name, f"{ROOT_PREFIX}1-link"])
    finally:
        os.close(fd)


@pytest.mark.skipif(os.name != "posix", reason="stale folders are found with flock and pids (POSIX)")
def test_a_killed_run_leaves_its_folder_and_the_next_run_removes_it(tmp_path: Path) -> None:
    """A run killed with SIGKILL (no clean-up code runs): its folder stays while it lives, and is
    removed by the next run's start-up check once it is gone."""
    code = ("import sys; from pathlib import Path; from medanomaly.apps.uploads import make_private_root; "
            "root, fd = make_private_root(Path(sys.argv[1])); (root / 'kept').mkdir(); "
            "(root / 'kept' / 'upload.png').write_bytes(b'x'); print(root, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        root = Path(proc.stdout.readline().strip())
        assert (root / "kept" / "upload.png").is_file()
        assert remove_stale_roots(tmp_path) == [] and root.exists()  # its run is alive
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdin.close()
        proc.stdout.close()
    assert root.exists()  # a crash leaves it behind...
    assert remove_stale_roots(tmp_path) == [root] and not root.exists()  # ...until the next start-up

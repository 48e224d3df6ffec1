"""The upload checks of ``medanomaly serve`` (medanomaly.apps.uploads) on hand-made bytes: a file's
kind from its first bytes, the name/content agreement, the safe extraction of zipped DICOM series
(paths, links, encryption, entry count and size limits) and finding the one series inside."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import zipfile
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from medanomaly.apps.uploads import SUFFIX_KINDS, ApiError, _member_path, check_type, extract_zip, find_series, sniff
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

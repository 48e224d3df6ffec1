"""Uploads for ``medanomaly serve``: type checks by name and content, safe extraction of zipped
DICOM series, and the errors the API answers with. No web framework here: pure functions on bytes
and paths, testable on their own."""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import full_suffix, is_dicom_series_dir

MAX_ZIP_MEMBERS = 5000  #: entries a zipped DICOM series may hold
ZIP_EXPANSION = 4  #: a zip may hold at most this many times the upload limit, uncompressed
MAX_REGIONS_LISTED = 200  #: regions returned by /api/regions (all are counted)
_HEAD = 64 * 1024  # bytes read to check a file's type (a .nii.gz header is decompressed from them)

#: upload suffix -> content kind; the content must match (checked from its first bytes)
SUFFIX_KINDS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff",
                ".nii": "nifti", ".nii.gz": "nifti-gz", ".dcm": "dicom", ".zip": "zip"}
_KIND_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "nifti": "NIfTI", "nifti-gz": "gzip-compressed NIfTI",
               "dicom": "DICOM", "zip": "zip", "gzip": "gzip"}
_KIND_SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "nifti": ".nii", "dicom": ".dcm", "zip": ".zip"}
SUPPORTED = "PNG, JPEG, TIFF, NIfTI (.nii, .nii.gz), a DICOM file (.dcm) or a zipped DICOM series (.zip)"


class ApiError(Exception):
    """An error answered as JSON ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------------------------- types


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348
    if len(head) >= 12 and head[4:12] == b"n+2\x00\r\n\x1a\n":
        return struct.unpack("<i", head[:4])[0] == 540 or struct.unpack(">i", head[:4])[0] == 540
    return False


def _gunzip_head(head: bytes, n: int = 544) -> bytes:
    """The first ``n`` decompressed bytes of a gzip stream starting with ``head`` (b"" if not gzip)."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, n)
    except zlib.error:
        return b""


def sniff(head: bytes) -> str | None:
    """The kind of a file from its first bytes: png, jpeg, tiff, nifti, nifti-gz, gzip, zip, dicom or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz" if _is_nifti_header(_gunzip_head(head)) else "gzip"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[128:132] == b"DICM":
        return "dicom"
    if _is_nifti_header(head):
        return "nifti"
    return None


def check_type(name: str, head: bytes) -> str:
    """The suffix to store an upload under, after checking its name and first bytes agree.

    ApiError 415 for a type the viewer does not take, 422 for content that is not what the name says.
    A name without a suffix (DICOM files often have none) is typed by its content alone."""
    suffix = full_suffix(name)
    found = sniff(head)
    if suffix == "" and found in _KIND_SUFFIX:
        return _KIND_SUFFIX[found]
    expected = SUFFIX_KINDS.get(suffix)
    if expected is None:
        raise ApiError(415, f"{name}: unsupported file type '{suffix or 'no suffix'}'; upload {SUPPORTED}")
    if found != expected:
        what = f"its content is {_KIND_NAMES[found]}" if found else "its content is not an image format medanomaly reads"
        raise ApiError(422, f"{name} is not a {_KIND_NAMES[expected]} file ({what}); the file is damaged or not "
                            "the image type its name says: re-export it or give it the right suffix")
    return suffix


# ---------------------------------------------------------------------------------------------- zip


def _member_path(name: str) -> PurePosixPath | None:
    """The safe relative path of a zip member, None for entries to skip (folders, macOS metadata,
    hidden files); MedanomalyError for absolute paths, drive letters and '..'."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and re.match(r"^[A-Za-z]:", parts[0])) or ".." in parts \
            or "\x00" in name:
        raise MedanomalyError(f"the zip holds an unsafe entry {name!r} (an absolute path or '..'); "
                              "zip the DICOM series folder itself, with relative paths")
    parts = tuple(p for p in parts if p not in ("", "."))
    if not parts or name.endswith(("/", "\\")) or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None
    return PurePosixPath(*parts)


def _members(zf: zipfile.ZipFile, label: str, max_bytes: int,
             max_members: int) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The (entry, safe relative path) pairs to extract, every entry checked before anything is
    written: no unsafe paths, symbolic links or encryption; at most ``max_members`` entries and
    ``max_bytes`` uncompressed by the sizes the archive declares."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise MedanomalyError(f"{label} holds {len(infos)} entries, more than the {max_members} allowed; "
                              "zip one DICOM series")
    todo, declared = [], 0
    for info in infos:
        rel = _member_path(info.filename)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise MedanomalyError(f"{label} holds a symbolic link {info.filename!r}; zip the files themselves")
        if rel is None or info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise MedanomalyError(f"{label} is encrypted ({info.filename}); upload an unencrypted zip")
        declared += info.file_size
        todo.append((info, rel))
    if declared > max_bytes:
        raise MedanomalyError(f"{label} holds {declared / 2**20:.0f} MB uncompressed, more than the "
                              f"{max_bytes / 2**20:.0f} MB allowed; upload a smaller series")
    return todo


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, total: int, max_bytes: int,
                 label: str) -> int:
    """Decompress one entry into the new file ``target``; returns ``total`` plus its bytes, counted
    as they come out (a header that lies about the size cannot get past ``max_bytes``)."""
    with zf.open(info) as src, open(target, "xb") as dst:
        while chunk := src.read(1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise MedanomalyError(f"{label} expands to more than {max_bytes / 2**20:.0f} MB; "
                                      "upload a smaller series")
            dst.write(chunk)
    return total


def extract_zip(path: Path, dest: Path, max_bytes: int, max_members: int = MAX_ZIP_MEMBERS,
                label: str | None = None) -> Path:
    """Extract a zip safely into ``dest`` (created) and return ``dest``.

    Every entry is checked before anything is written: no absolute paths, drive letters, '..' or
    symbolic links; at most ``max_members`` entries and ``max_bytes`` uncompressed (the sizes the
    archive declares, and the bytes actually decompressed, so a lying header cannot get past)."""
    label = label or path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MedanomalyError(f"{label} is not a readable zip archive ({exc}); re-create it") from exc
    with zf:
        todo = _members(zf, label, max_bytes, max_members)
        dest.mkdir(parents=True, exist_ok=True)
        root, total = dest.resolve(), 0
        try:
            for info, rel in todo:
                target = dest.joinpath(*rel.parts)
                if root not in target.resolve().parents:  # belt and braces after _member_path
                    raise MedanomalyError(f"{label} holds an unsafe entry {info.filename!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                total = _copy_member(zf, info, target, total, max_bytes, label)
        except FileExistsError as exc:
            raise MedanomalyError(f"{label} holds {Path(exc.filename).name} twice; zip one DICOM series") from exc
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
            raise MedanomalyError(f"cannot extract {label} ({type(exc).__name__}: {exc}); the zip is damaged or "
                                  "uses an unsupported compression: re-create it with plain deflate") from exc
    return dest


def find_series(folder: Path, label: str) -> Path:
    """The one DICOM series folder at or below ``folder`` (MedanomalyError for none or several)."""
    dirs = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
    series = [d for d in dirs if is_dicom_series_dir(d)]
    if len(series) == 1:
        return series[0]
    if not series:
        raise MedanomalyError(f"{label} holds no DICOM series (a folder whose files are all DICOM images of one "
                              "series); zip the series folder, or upload an image file instead")
    names = ", ".join(str(s.relative_to(folder)) + "/" for s in series[:5])
    raise MedanomalyError(f"{label} holds {len(series)} DICOM series ({names}); zip one series per upload")


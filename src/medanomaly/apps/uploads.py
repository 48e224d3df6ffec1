"""Uploads for ``medanomaly serve``: type checks by name and content, the image size an upload's
header declares (read before any pixel is decoded), safe extraction of zipped DICOM series, the
server's private folders (one per run, locked while it runs, so that the next run removes those a
crash left behind) and the errors the API answers with. No web framework here: pure functions on
bytes and paths, testable on their own."""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import nibabel as nib
import pydicom
import tifffile

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import full_suffix, is_dicom_series_dir
from medanomaly.io.dicom import series_files
from medanomaly.io.safety import library_notes

try:  # POSIX: a run's folder is locked while it runs (the kernel releases the lock when it dies)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no stale-folder clean-up
    fcntl = None  # type: ignore[assignment]

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


ROOT_PREFIX = "medanomaly-serve-"  #: a run's private folder: ROOT_PREFIX + its pid + "-" + random
_LOCK = "owner.lock"  # in a run's folder: flock-ed by the run for its whole life
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # little/big-endian TIFF and BigTIFF
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> channels (a palette decodes to RGB)


class ApiError(Exception):
    """An error answered as JSON ``{"error": message}`` with an HTTP status (and extra headers,
    e.g. ``Retry-After`` for a 503)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


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
    if head[128:132] == b"DICM":  # before TIFF: a DICOM file's preamble may be a TIFF header (dual files)
        return "dicom"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz" if _is_nifti_header(_gunzip_head(head)) else "gzip"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
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
    if expected == "tiff" and head[:4] in _TIFF_MAGIC:
        found = "tiff"  # a DICOM-TIFF dual file named .tif is a TIFF
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



# ---------------------------------------------------------------------------------------------- declared size


def _png_shape(f: BinaryIO) -> tuple[int, ...] | None:
    head = f.read(26)
    if len(head) < 26 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return _PNG_CHANNELS.get(head[25], 4), height, width


def _jpeg_shape(f: BinaryIO) -> tuple[int, ...] | None:
    """(components, height, width) from the first start-of-frame segment, skipping the others."""
    if f.read(2) != b"\xff\xd8":
        return None
    while True:
        marker = f.read(2)
        while len(marker) == 2 and marker == b"\xff\xff":  # fill bytes
            marker = marker[1:] + f.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0x01 or 0xD0 <= kind <= 0xD8:  # markers without a length
            continue
        (length,) = struct.unpack(">H", f.read(2))
        if length < 2:  # a segment's length counts its own two bytes: never move backwards
            return None
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15 but DHT, JPG, DAC
            _, height, width, components = struct.unpack(">BHHB", f.read(6))
            return components, height, width
        f.seek(length - 2, os.SEEK_CUR)


def _dicom_values(path: Path) -> tuple[int, ...]:
    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel"])
    return (int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1))


def _series_shape(folder: Path) -> tuple[int, ...]:
    """(frames, rows, columns, samples) of a series: every file's frames, at the largest sizes."""
    shapes = [_dicom_values(f) for f in series_files(folder)]
    return sum(s[0] for s in shapes), *(max(s[k] for s in shapes) for k in (1, 2, 3))


def declared_shape(path: Path) -> tuple[int, ...] | None:
    """The size of the image at ``path`` (a stored upload, or an extracted DICOM series folder) as
    its header declares it, every axis with channels included (their product: the values a reader
    will decode), read without decoding a pixel; None when the header cannot be parsed (the
    reader will then say what is wrong)."""
    suffix = full_suffix(path.name)
    try:
        with library_notes([]):  # a probe: the reader reports the file's problems
            if path.is_dir():
                return _series_shape(path)
            if suffix == ".dcm":
                return _dicom_values(path)
            if suffix in (".nii", ".nii.gz"):
                return tuple(int(d) for d in nib.load(path).header.get_data_shape())
            if suffix in (".tif", ".tiff"):
                with tifffile.TiffFile(path) as tf:
                    return tuple(int(d) for d in tf.series[0].shape) if tf.series else None
            with open(path, "rb") as f:
                return _png_shape(f) if suffix == ".png" else _jpeg_shape(f) if suffix in (".jpg", ".jpeg") else None
    except Exception:  # noqa: BLE001 - a header that does not parse is the reader's to report
        return None


# ---------------------------------------------------------------------------------------------- private folders


def make_private_root(base: Path | None = None) -> tuple[Path, int | None]:
    """A new private (0700) folder for one server run in ``base`` (default: the system's temporary
    folder), named :data:`ROOT_PREFIX` + pid, and locked: an exclusive ``flock`` on its lock file,
    held until the process ends (the kernel releases it when the process dies, even by SIGKILL), so
    that :func:`remove_stale_roots` tells a live run's folder from a crashed one's. Returns the
    folder and the lock's file descriptor (close it after deleting the folder; None without flock)."""
    root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=base))
    if fcntl is None:
        return root, None
    fresh = root / (_LOCK + ".new")
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(fresh, root / _LOCK)  # the lock file appears already locked
    return root, fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # POSIX only (on Windows signal 0 would end the process): see remove_stale_roots
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _owner_alive(root: Path) -> bool:
    """Whether the run that made ``root`` may still be running: its lock is held, or (no lock file
    yet: it is starting) the pid in its name is alive. Folders without a pid are not judged."""
    lock = root / _LOCK
    if fcntl is not None and lock.is_file():
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True  # held: its run is alive
        finally:
            os.close(fd)  # (releases the lock this probe took)
        return False
    found = re.match(rf"{re.escape(ROOT_PREFIX)}(\d+)-", root.name)
    return found is None or _pid_alive(int(found.group(1)))


def remove_stale_roots(base: Path | None = None) -> list[Path]:
    """Delete the private folders that earlier server runs left in ``base`` (default: the system's
    temporary folder) when they crashed or were killed, kept uploads included: this user's folders
    named :data:`ROOT_PREFIX` + pid whose owner is gone (:func:`_owner_alive`). Returns them.
    Nothing is done off POSIX (no flock, and no safe way to probe a pid)."""
    if os.name != "posix":
        return []
    removed = []
    for root in sorted(Path(base or tempfile.gettempdir()).glob(ROOT_PREFIX + "*")):
        try:
            st = root.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or _owner_alive(root):
            continue
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists():
            removed.append(root)
    return removed

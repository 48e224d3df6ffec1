"""CSV listings: a data set given as a table of image (and mask) paths instead of a folder layout,
accepted wherever a data folder is (``train``, ``plan``, ``evaluate --data``, ``predict`` inputs).

Columns (names case-insensitive, other columns ignored with one warning):

* ``image`` (required): an image file or DICOM series folder; or, for a multi-channel image, one
  column per channel file, ``image_<channel>`` in channel order (``image_0000``, ``image_0001``...:
  channels without names; ``image_flair``, ``image_t1``...: named FLAIR, T1...);
* ``mask`` (optional): its mask; an empty cell is an image without a mask;
* ``case`` (optional): the patient id that splits group by; empty or absent: the image's key
  (its stem without a modality token, as folder discovery names it);
* ``split`` (optional): ``train``, ``val`` or ``test`` for every row; the split of the data
  (``--splits FILE`` still overrides it).

Relative paths are relative to the CSV file's folder. Rows are numbered as a spreadsheet shows
them: the header is row 1, the first listed image row 2.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import IMAGE_SUFFIXES, full_suffix, is_dicom_series_dir

log = logging.getLogger(__name__)
LISTING_SUFFIXES = (".csv",)
COLUMNS = ("image", "mask", "case", "split")
SPLITS = ("train", "val", "test")
#: a channel's image column: image_0000 (unnamed), image_flair (named FLAIR)...
CHANNEL_COLUMN = re.compile(r"image_(\w+)")
#: the largest listing read (bytes): a table of paths, never anything near this
MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ListedRow:
    """One row of a listing: paths resolved against the CSV's folder; ``case``/``split`` None when not
    given; ``channels``: the files of a multi-channel image in channel order (``image`` the first), else ()."""

    image: Path
    mask: Path | None
    case: str | None
    split: str | None
    row: int
    channels: tuple[Path, ...] = ()


def is_listing(path: str | Path) -> bool:
    """``path`` is a file whose suffix names a listing (``.csv``)."""
    path = Path(path)
    return path.suffix.lower() in LISTING_SUFFIXES and path.is_file()


def _table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(lower-cased header, [(spreadsheet row, {column: stripped cell})]) of the CSV file."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise MedanomalyError(f"CSV listing {path} is larger than {MAX_BYTES // 2**20} MB; a listing holds one "
                                  "row of paths per image: check that this is the right file")
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            # short rows padded: a missing trailing cell reads as an empty one
            rows = [(reader.line_num, dict(zip(header, [c.strip() for c in cells] + [""] * len(header))))
                    for cells in reader if any(c.strip() for c in cells)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedanomalyError(f"cannot read CSV listing {path} ({type(exc).__name__}: {exc}); it must be a UTF-8 "
                              "CSV file with a header row naming the columns image, mask, case, split") from exc
    return header, rows


def image_columns(header: list[str]) -> list[str]:
    """The image column(s) of a header: ``image``, or the ``image_<channel>`` columns in channel order."""
    return ["image"] if "image" in header else [h for h in header if CHANNEL_COLUMN.fullmatch(h)]


def channel_names(header: list[str]) -> tuple[str, ...]:
    """The channel names that ``image_<name>`` columns give (upper case, as modality tokens are
    named); () for one image column or numbered channels (``image_0000``)."""
    cols = image_columns(header)
    names = tuple(CHANNEL_COLUMN.fullmatch(c).group(1).upper() for c in cols if c != "image")
    return () if len(names) < 2 or any(n.isdigit() for n in names) else names


def _check_header(path: Path, header: list[str]) -> None:
    channels = [h for h in header if CHANNEL_COLUMN.fullmatch(h)]
    if "image" in header and channels:
        raise MedanomalyError(f"CSV listing {path} has an 'image' column and the channel column(s) "
                              f"{', '.join(channels)}; use 'image' for one file per image, or image_<channel> "
                              "columns (image_0000, image_0001...) for the channel files of each image")
    if not image_columns(header):
        raise MedanomalyError(f"CSV listing {path} has no 'image' column (its header: {', '.join(header) or 'empty'});"
                              " the first row must name the columns: image (required), mask, case, split")
    if len(set(header)) != len(header):
        twice = sorted({h for h in header if header.count(h) > 1})
        raise MedanomalyError(f"CSV listing {path} names the column(s) {', '.join(twice)} more than once; "
                              "keep one column of each name")
    unused = [h for h in header if h not in COLUMNS and not CHANNEL_COLUMN.fullmatch(h)]
    if unused:
        log.warning("CSV listing %s: column(s) %s are not used (used: %s)", path, ", ".join(unused), ", ".join(COLUMNS))


def _path(path: Path, row: int, column: str, text: str) -> Path:
    """The listed ``text`` as a path below the CSV's folder (absolute paths as given); must exist."""
    if not text:
        raise MedanomalyError(f"row {row} of {path} has no path in the '{column}' column; every image row needs one")
    found = Path(os.path.abspath(text if os.path.isabs(text) else path.parent / text))
    if not found.exists():
        raise MedanomalyError(f"row {row} of {path}: the {column} {found} does not exist; fix the path (relative "
                              "paths are relative to the CSV file's folder) or remove the row")
    if column.startswith("image") and not ((found.is_file() and full_suffix(found) in IMAGE_SUFFIXES)
                                  or (found.is_dir() and is_dicom_series_dir(found))):
        raise MedanomalyError(f"row {row} of {path}: the image {found} is no image file ({', '.join(IMAGE_SUFFIXES)})"
                              " nor a DICOM series folder; list image files only")
    return found


def _row(path: Path, row: int, cells: dict[str, str], columns: list[str]) -> ListedRow:
    files = tuple(_path(path, row, c, cells[c]) for c in columns)
    split = cells.get("split") or None
    if "split" in cells and split not in SPLITS:
        raise MedanomalyError(f"row {row} of {path}: split {split or '(empty)'!r} is none of {', '.join(SPLITS)}; "
                              "give every row one of them, or drop the split column for a seeded split by case")
    mask = _path(path, row, "mask", cells["mask"]) if cells.get("mask") else None
    return ListedRow(files[0], mask, cells.get("case") or None, split, row, files if len(files) > 1 else ())


def read_listing(path: str | Path) -> list[ListedRow]:
    """The rows of the CSV listing ``path``, checked: an ``image`` column, every listed file present,
    no image listed twice, valid split names. Raises MedanomalyError naming the row."""
    path = Path(path)
    header, table = _table(path)
    _check_header(path, header)
    rows = [_row(path, row, cells, image_columns(header)) for row, cells in table]
    if not rows:
        raise MedanomalyError(f"CSV listing {path} lists no image; add one row per image below the header")
    first: dict[str, int] = {}
    for r in rows:
        for image in r.channels or (r.image,):
            real = os.path.realpath(image)
            if real in first:
                raise MedanomalyError(f"rows {first[real]} and {r.row} of {path} both list the image {image}; an "
                                      "image is listed once: remove one of the rows")
            first[real] = r.row
    return rows


def listed_samples(path: str | Path, key_of: Callable[[Path], str]) -> list[dict]:
    """The fields of a :class:`medanomaly.data.discover.Sample` per listed image (``image``, ``mask``,
    ``case``, ``key``: the key by ``key_of``; the case column, else the key; ``channels`` and
    ``channel_names`` of a multi-channel image), sorted as discovery sorts (by case, then by the
    numbers in the path)."""
    names = channel_names(_table(Path(path))[0])
    fields = [{"image": r.image, "mask": r.mask, "case": r.case or key_of(r.image), "key": key_of(r.image),
               "channels": r.channels, "channel_names": names if r.channels else ()} for r in read_listing(path)]
    return sorted(fields, key=lambda f: (f["case"], natural_key(f["image"].as_posix())))


def listing_splits(path: str | Path, samples: Iterable[tuple[Path, str]]) -> dict[str, list[str]] | None:
    """The split that the listing's ``split`` column gives to the cases of ``samples`` ((image, case)
    pairs of the listed images, as discovery made them); None without a split column. A case whose
    rows are in two splits is an error naming the rows: splits are made by case (patient)."""
    path = Path(path)
    rows = {os.path.realpath(r.image): r for r in read_listing(path)}
    if any(r.split is None for r in rows.values()):  # read_listing: every row has one, or there is no column
        return None
    where: dict[str, ListedRow] = {}
    for image, case in samples:
        r = rows[os.path.realpath(image)]
        if case in where and where[case].split != r.split:
            raise MedanomalyError(f"rows {where[case].row} and {r.row} of {path} put case {case!r} in the splits "
                                  f"{where[case].split} and {r.split}; a case (patient) belongs to one split only")
        where.setdefault(case, r)
    return {name: sorted(c for c, r in where.items() if r.split == name) for name in SPLITS}


def listing_root(path: str | Path) -> Path:
    """The folder that holds every image and mask of the listing (their deepest common folder): what
    output names mirror, as they mirror the tree below a data folder."""
    rows = read_listing(path)
    files = [p for r in rows for p in (r.image, r.mask) if p is not None]
    return Path(os.path.commonpath([os.path.abspath(p.parent) for p in files]))


def data_root(data: str | Path) -> Path:
    """The folder below which a data set's images lie: ``data`` itself, or a listing's :func:`listing_root`."""
    return listing_root(data) if is_listing(data) else Path(data)


def natural_key(text: str) -> list:
    """Sort key that orders the numbers in ``text`` by value (``_10`` after ``_9``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]

"""One output policy for every command that writes (predict, evaluate, train, pretrain, export, plan,
synthesize, demo), checked before any work starts:

- :func:`check_out_path`: an output can be made there: not a file where a folder is wanted (or the
  reverse), nothing below a file, nothing in ``/proc``, ``/sys`` or ``/dev`` (``/dev/shm`` is a
  normal folder), and the nearest existing folder is writable;
- :func:`check_separate`: an output folder never lies inside an input tree, and no input lies inside it;
- :func:`existing_outputs` + :func:`refuse_existing`: nothing existing is replaced without ``--overwrite``;
- :func:`unique_stems`: one output name per input, never one name for two inputs.

Paths only: this module knows no image format (callers pass the function that strips a suffix).
The writes themselves stay atomic (:mod:`medanomaly.core.atomic`).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath

from medanomaly.core.errors import MedanomalyError

#: kernel and device trees: writing there fails deep inside a writer, or does something else entirely
SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
#: folders below SPECIAL_ROOTS that are ordinary writable folders (a RAM disk)
ORDINARY_SPECIAL = (Path("/dev/shm"),)
#: how many names an error message lists before "and N more"
SHOWN = 3


def _below(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or inside it (both already absolute and resolved)."""
    return path == root or root in path.parents


def _special(resolved: Path) -> bool:
    return any(_below(resolved, r) for r in SPECIAL_ROOTS) and not any(_below(resolved, r) for r in ORDINARY_SPECIAL)


def _resolve(path: Path, what: str) -> Path:
    """The absolute path with links followed; a link loop is a user error."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError on a loop of links
        raise MedanomalyError(f"{what} {path} cannot be followed to a real path ({type(exc).__name__}: {exc}); "
                              "fix the symbolic link or choose another path") from exc


def _writable(folder: Path) -> bool:
    """This user may create files in ``folder`` (root may almost anywhere; a read-only mount refuses all)."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_out_path(path: str | Path, kind: str = "folder", what: str = "--out") -> None:
    """Refuse an output ``path`` that cannot be a ``kind`` ("folder" or "file") written by us.

    Checked without creating anything: a file where a folder is wanted (or a folder or device where
    a file is wanted), an existing non-folder among its parents, a path in /proc, /sys or /dev, and
    a nearest existing folder without write permission. Raises MedanomalyError naming ``what``.
    """
    path = Path(path)
    resolved = _resolve(path, what)
    if _special(resolved):
        raise MedanomalyError(f"{what} {path} is in a tree of the system's special files (/proc, /sys, /dev), "
                              "where outputs cannot be written; choose a folder on disk")
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise MedanomalyError(f"{what} {path} is a file, not a folder; give a folder (new or empty) for the "
                                  "outputs")
        if kind == "file" and not path.is_file():
            raise MedanomalyError(f"{what} {path} is {'a folder' if path.is_dir() else 'a special file'}, not a "
                                  "regular file; give the path of a file to write")
        folder = resolved if resolved.is_dir() else resolved.parent
    else:
        folder = next(p for p in resolved.parents if p.exists())
        if not folder.is_dir():
            raise MedanomalyError(f"{what} {path} lies below {folder}, which is a file, not a folder; choose a "
                                  "path whose parents are folders")
    if not _writable(folder):
        raise MedanomalyError(f"{what} {path} cannot be written: the folder {folder} is not writable for this "
                              "user; check its permissions or choose another path")


def check_separate(out: str | Path, inputs: Iterable[str | Path], what: str = "--out") -> None:
    """Refuse an output folder ``out`` that is inside an input's tree (a folder input, or the folder
    of a file input) or that holds an input: inputs are never mixed with results, and a later run
    over the inputs never finds earlier outputs in them. Symbolic links are followed; inputs that do
    not exist are left to their reader's error."""
    out_r = _resolve(Path(out), what)
    for given in map(Path, inputs):
        if not given.exists():  # reported by the reader as missing, which says more
            continue
        given_r = _resolve(given, "the input")
        tree = given_r if given.is_dir() else given_r.parent
        if _below(out_r, tree):
            raise MedanomalyError(f"{what} {out} is inside the input {given}; choose an {what} outside it so "
                                  "inputs are never mixed with results")
        if _below(given_r, out_r):
            raise MedanomalyError(f"the input {given} is inside {what} {out}; choose an {what} that holds none of "
                                  "the inputs, so no result can replace an input")


def existing_outputs(stems: Iterable[Path], exact: Sequence[str] = (), any_suffix: Sequence[str] = ()) -> list[Path]:
    """The existing entries named ``stem + e`` (``e`` in ``exact``) or ``stem + t + '.*'`` (``t`` in
    ``any_suffix``: the writer chooses the suffix from the image format), for every stem; names are
    compared ignoring case (as some file systems store them) and each folder is listed once. A
    parent of a stem that exists but is no folder, or lies below a file, is refused as
    :func:`check_out_path` does."""
    by_folder: dict[Path, list[str]] = {}
    for stem in map(Path, stems):
        by_folder.setdefault(stem.parent, []).append(stem.name)
    found: list[Path] = []
    for folder, names in sorted(by_folder.items()):
        if not folder.is_dir():
            if folder.exists() or any(p.exists() and not p.is_dir() for p in folder.parents):
                check_out_path(folder, "folder", "the output folder")
            continue
        present = sorted(os.listdir(folder))
        keys = [_key(p) for p in present]
        for name in names:
            wanted = {_key(f"{name}{e}") for e in exact}
            prefixes = tuple(_key(f"{name}{t}.") for t in any_suffix)
            found += [folder / p for p, k in zip(present, keys) if k in wanted or (prefixes and k.startswith(prefixes))]
    return found


def refuse_existing(found: Sequence[Path], overwrite: bool, where: str | Path,
                    hint: str = "pass --overwrite to replace them or choose another --out") -> None:
    """Refuse to replace the ``found`` outputs unless ``overwrite``; a folder where a file goes is
    refused either way (it cannot be replaced by a file)."""
    folders = [p for p in found if p.is_dir() and not p.is_symlink()]
    if folders:
        raise MedanomalyError(f"{where} holds the folder {folders[0]} where an output file goes; move or rename it")
    if found and not overwrite:
        names = ", ".join(str(p) for p in found[:SHOWN]) + (f" and {len(found) - SHOWN} more" if len(found) > SHOWN
                                                           else "")
        raise MedanomalyError(f"{where} already holds {len(found)} file(s) this command would replace ({names}); "
                              f"{hint}")


def _key(name: PurePath | str) -> str:
    """Names that one file system may store as one file: case and Unicode normalisation ignored."""
    return unicodedata.normalize("NFC", str(name)).casefold()


def _common_root(roots: Sequence[Path]) -> Path:
    absolute = [os.path.abspath(r) for r in roots]
    return Path(os.path.commonpath(absolute)) if absolute else Path(os.sep)


def _name(level: int, index: int, root: Path, path: Path, common: Path, stem: Callable[[Path], str]) -> PurePath:
    """Level 0: ``rel/stem`` below the input's own root (the usual name); 1: below the common root
    of all inputs; 2: the full file name there (suffix kept); 3 and up: that plus ``level - 2``
    tildes and ``index + 1`` (what follows the last tilde tells the entry, so these never clash)."""
    if level == 0:
        rel = PurePath(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
        return rel.parent / stem(path)
    rel = PurePath(os.path.relpath(os.path.abspath(path), common))
    if level == 1:
        return rel.parent / stem(path)
    return rel if level == 2 else rel.with_name(f"{rel.name}{'~' * (level - 2)}{index + 1}")


def unique_stems(entries: Sequence[tuple[Path, Path]], stem: Callable[[Path], str]) -> list[PurePath]:
    """One relative output stem per ``(root, path)`` entry (distinct inputs), unique even where a
    file system ignores case.

    An entry keeps its usual name, its path below its own root without suffix (``rel/stem``), unless
    another entry's usual name is the same: then both are named by their paths below the common
    root of all the inputs (``predict M dirA/T1.png dirB/T1.png`` -> ``dirA/T1`` and ``dirB/T1``),
    with their suffixes if those are still shared (``a.png`` and ``a.tif`` of one folder -> ``a.png``,
    ``a.tif``), and with their positions in ``entries`` if even those are (names differing only in
    case). Where such a new name is another entry's, the entry with the simpler name keeps it, so a
    usual name that no other input has is never changed. Deterministic.
    """
    entries = [(Path(r), Path(p)) for r, p in entries]
    common = _common_root([r for r, _ in entries])
    levels = [0] * len(entries)
    names = [_name(0, i, r, p, common, stem) for i, (r, p) in enumerate(entries)]
    while True:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(_key(name), []).append(i)
        moving = []
        for members in (g for g in groups.values() if len(g) > 1):
            simplest = [i for i in members if levels[i] == min(levels[j] for j in members)]
            moving += [i for i in members if len(simplest) > 1 or i != simplest[0]]
        if not moving:  # ends: names from level 3 on differ from all others once their tildes outnumber theirs
            return names
        for i in moving:
            levels[i] += 1
            names[i] = _name(levels[i], i, *entries[i], common, stem)


def check_new_file(path: str | Path, overwrite: bool, what: str = "--out") -> None:
    """An output file: :func:`check_out_path` as a file, and an existing one replaced only with ``overwrite``."""
    path = Path(path)
    check_out_path(path, "file", what)
    if path.exists() and not overwrite:
        raise MedanomalyError(f"{what} {path} exists already; pass --overwrite to replace it or choose another path")

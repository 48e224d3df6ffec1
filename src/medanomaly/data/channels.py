"""Several input channels per case: which image files are the channels of one image, in which order,
and with which names.

Two namings group files into one multi-channel sample (:func:`group_channels`):

* **nnU-Net / Medical Segmentation Decathlon raw layouts**: ``<case>_0000.nii.gz``,
  ``<case>_0001.nii.gz``... (channel i is ``_%04d`` % i; PNG/TIFF the same for 2D data sets) in a
  folder named ``imagesTr``/``imagesTs`` or whose parent holds a ``dataset.json``. Channel names
  come from that ``dataset.json``: ``channel_names`` (nnU-Net v2) or ``modality`` (MSD, nnU-Net v1),
  ``{"0": "FLAIR", "1": "T1"}``; where it gives ``file_ending``, only files with that ending are
  channel files. Without a ``dataset.json`` the channels have no names (only their number is checked).
* **co-registered volumes or slices** (BraTS style) in any folder: ``<case>_flair``, ``<case>_t1``,
  ``<case>_t1ce`` (also ``_t1c``, ``_t1gd``), ``<case>_t2``, ``<case>_pd`` (case-insensitive,
  :data:`CHANNEL_TOKENS`) sharing ``<case>``: two or more such files form one sample, channels in this
  fixed order, named FLAIR, T1, T1CE (T1C, T1GD), T2, PD. A lone ``X_flair.png`` (LGG) stays a
  one-channel image without names, as before.

All cases of a data set must have the same channels (:func:`check_channel_sets`): a case missing
``_0001`` is an error naming it, never a silently unlabelled extra case.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import stem_of

#: modality tokens of co-registered files, in channel order (rank, token): t1ce/t1c/t1gd share a rank
CHANNEL_TOKENS: tuple[tuple[int, str], ...] = ((0, "_flair"), (1, "_t1"), (2, "_t1ce"), (2, "_t1c"), (2, "_t1gd"),
                                               (3, "_t2"), (4, "_pd"))
NNUNET_DIRS = ("imagesTr", "imagesTs")
_NNUNET_STEM = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class DatasetInfo:
    """What a ``dataset.json`` says about the images: channel names in channel order (() when it
    names none) and the file ending of every image (None: any)."""

    channel_names: tuple[str, ...] = ()
    file_ending: str | None = None


@dataclass(frozen=True)
class ChannelGroup:
    """The channel files of one image, in channel order, with its mask, key (file name key of the
    case) and ``names`` (() when unknown); ``ids`` say which channels these are (``0000`` or
    ``FLAIR``; () for a file of neither naming), for the check that all cases agree."""

    files: tuple[Path, ...]
    mask: Path | None
    key: str
    names: tuple[str, ...]
    ids: tuple[str, ...]


def read_dataset_json(folder: Path) -> DatasetInfo | None:
    """The :class:`DatasetInfo` of ``folder/dataset.json``; None where there is none."""
    path = folder / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedanomalyError(f"cannot read {path} ({exc}); it must be the JSON object nnU-Net describes "
                              "(channel_names, labels, file_ending): fix it or move it out of the data folder") from exc
    if not isinstance(data, dict):
        raise MedanomalyError(f"{path} is not a JSON object; it must be the object nnU-Net describes")
    channels = data.get("channel_names", data.get("modality", {}))
    if not isinstance(channels, dict) or not all(str(k).isdigit() for k in channels) or \
            sorted(int(k) for k in channels) != list(range(len(channels))):
        raise MedanomalyError(f"{path}: 'channel_names' must map channel numbers 0, 1, ... to names, e.g. "
                              f'{{"0": "FLAIR", "1": "T1"}}; found {channels!r}')
    names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    ending = data.get("file_ending")
    return DatasetInfo(names, ending if isinstance(ending, str) and ending else None)


def nnunet_info(folder: Path) -> DatasetInfo | None:
    """A :class:`DatasetInfo` where the files of ``folder`` follow the nnU-Net naming (``folder`` is
    imagesTr/imagesTs, or its parent holds a dataset.json), else None."""
    info = read_dataset_json(folder.parent)
    if info is None and folder.name in NNUNET_DIRS:
        return DatasetInfo()
    return info


def _channel_of(path: Path, info: DatasetInfo | None, tokens: bool) -> tuple[str, int, str] | None:
    """(key, rank, id) of a channel file; None for a file of neither naming."""
    stem = stem_of(path)
    if info is not None and (info.file_ending is None or path.name.endswith(info.file_ending)):
        if m := _NNUNET_STEM.match(stem):
            return m[1], int(m[2]), m[2]
    if tokens:
        low = stem.lower()
        for rank, tok in CHANNEL_TOKENS:
            if low.endswith(tok) and len(stem) > len(tok):
                return stem[: -len(tok)], rank, tok[1:].upper()
    return None


def group_channels(entries: list[tuple[Path, Path | None, str]], info: DatasetInfo | None,
                   tokens: bool = True) -> list[ChannelGroup]:
    """The (image, mask, key) entries of one folder as channel groups, in the order of their first
    files. ``info``: the folder's nnU-Net description (None: not an nnU-Net folder); ``tokens``:
    group co-registered modality files too. Raises MedanomalyError for two files of one channel
    or two different masks in one group."""
    found: dict[str, list[tuple[int, str, Path, Path | None]]] = {}
    order: list[tuple[str, tuple[Path, Path | None, str]]] = []
    for image, mask, key in entries:
        ch = _channel_of(image, info, tokens)
        if ch is None:
            order.append(("", (image, mask, key)))
            continue
        if ch[0] not in found:
            order.append((ch[0], (image, mask, key)))
        found.setdefault(ch[0], []).append((ch[1], ch[2], image, mask))
    return [_group(found[k], info, entry) if k else ChannelGroup((entry[0],), entry[1], entry[2], (), ())
            for k, entry in order]


def _group(members: list[tuple[int, str, Path, Path | None]], info: DatasetInfo | None,
           first: tuple[Path, Path | None, str]) -> ChannelGroup:
    members = sorted(members, key=lambda m: m[0])
    for a, b in zip(members, members[1:]):
        if a[0] == b[0]:  # X_t1ce and X_t1gd, or a _0000 in two file types
            raise MedanomalyError(f"{a[2]} and {b[2]} are the same channel of one case; keep one of them")
    masks = sorted({m[3] for m in members if m[3] is not None})
    if len(masks) > 1:
        raise MedanomalyError(f"the channels of {members[0][2]} have different masks: {' and '.join(map(str, masks))}; "
                              "keep the right one")
    ids = tuple(m[1] for m in members)
    if len(members) == 1 and not ids[0].isdigit():  # a lone X_flair.png: one unnamed channel, as before
        return ChannelGroup((first[0],), first[1], first[2], (), ids)
    key = _channel_of(members[0][2], info, True)[0]  # type: ignore[index]  # a channel file by construction
    return ChannelGroup(tuple(m[2] for m in members), masks[0] if masks else None, key, _names(ids, info), ids)


def _names(ids: tuple[str, ...], info: DatasetInfo | None) -> tuple[str, ...]:
    """Channel names: a dataset.json's for nnU-Net numbers (() without one), the tokens' otherwise."""
    if not ids[0].isdigit():
        return ids
    if info is None or not info.channel_names:
        return ()
    return tuple(info.channel_names[int(i)] if int(i) < len(info.channel_names) else i for i in ids)


def check_channel_sets(groups: list[tuple[str, ChannelGroup]], info_names: tuple[str, ...] = ()) -> None:
    """All (case, group) pairs of a data set must have the same channels where any has several
    (or where a dataset.json names ``info_names``); else a MedanomalyError naming the case."""
    if not any(len(g.files) > 1 for _, g in groups) and len(info_names) <= 1:
        return
    sets: dict[tuple[str, ...], list[str]] = {}
    for case, g in groups:
        sets.setdefault(g.ids, []).append(case)
    if info_names:
        expected = tuple(f"{i:04d}" for i in range(len(info_names)))
    else:
        expected = max((ids for ids in sets if len(ids) > 1), key=lambda ids: len(sets[ids]))
    odd = [(ids, cases) for ids, cases in sets.items() if ids != expected]
    if odd:
        ids, cases = odd[0]
        have = ", ".join(ids) if ids else "one file of neither naming"
        raise MedanomalyError(
            f"case {cases[0]} has channels {have} but the data set's cases have {', '.join(expected)}"
            f"{f' ({len(cases)} such cases)' if len(cases) > 1 else ''}; every case needs the same channel files "
            "(e.g. case_0000 and case_0001): add the missing file(s) or move the case out of the data folder")

"""Data discovery and patient-level splits: which images (and masks) a data folder holds, grouped by case.

Layouts found by :func:`discover` (first match wins, per folder):

* nnU-Net raw: ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz`` (and ``imagesTs``);
* ``images/`` + ``masks/`` (or ``labels/``, ``masks_png/``...) with matching file stems;
* siblings: ``X.png`` + ``X_mask.png``, ``X_flair.png`` + ``X_mask.png``, ``X_image.nrrd`` +
  ``X_label.nrrd``, ``X.tif`` + ``X_mask.tif`` (mask tokens: see :data:`MASK_TOKENS`);
* any image without a mask is kept with ``mask=None`` (used by the anomaly task and predict).

Several files can be the channels of one image (nnU-Net ``_0000``/``_0001``..., or co-registered
``<case>_flair``/``_t1``/``_t2``...): :mod:`medanomaly.data.channels` groups them into one
:class:`Sample` whose ``image`` is the first channel file and ``channels`` all of them, in order;
:func:`read_sample` reads any sample as one (C, ...) image.

The case (patient) id is the first sub-folder below the data root when images sit in
per-patient folders (``lgg-flair/<patient>/...``), otherwise the file's key (stem without
modality/mask tokens). Splits are made by case, never by slice.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from medanomaly.config.labels import Label, from_dataset_json, labels_text
from medanomaly.config.schema import TrainConfig
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.channels import ChannelGroup, DatasetInfo, check_channel_sets, group_channels, nnunet_info
from medanomaly.data.listing import is_listing, listed_samples, listing_splits, natural_key
from medanomaly.io import IMAGE_SUFFIXES, Image, full_suffix, is_dicom_series_dir, read_channels, stem_of

log = logging.getLogger(__name__)

MASK_TOKENS = ("_mask", "_masks", "_seg", "_segmentation", "_label", "_labels", "_gt", "_lesion")
IMAGE_TOKENS = ("_flair", "_image", "_img", "_t1", "_t2", "_ct", "_0000")
MASK_DIRS = ("masks", "mask", "masks_png", "labels", "label", "labelsTr", "labelsTs", "segmentations", "gt", "ground_truth")
IMAGE_DIRS = ("images", "image", "imagesTr", "imagesTs", "imgs")


@dataclass(frozen=True)
class Sample:
    """One image file (or DICOM series folder), its mask if any, and its case id. A multi-channel
    image of several files: ``image`` is the first, ``channels`` all of them in channel order, and
    ``channel_names`` their names where known (dataset.json, modality tokens; else ())."""

    image: Path
    mask: Path | None
    case: str
    key: str
    channels: tuple[Path, ...] = ()
    channel_names: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """The image files of the sample, in channel order (just ``image`` for a one-file image)."""
        return self.channels or (self.image,)


def channel_names_of(samples: list[Sample]) -> tuple[str, ...]:
    """The channel names the samples share (what the model file records); () where any lacks them."""
    names = {s.channel_names for s in samples}
    return names.pop() if len(names) == 1 else ()


def read_sample(sample: Sample) -> Image:
    """The sample's image, all its channel files as one float32 (C, ...) Image (see
    :func:`medanomaly.io.read_channels`); exactly :func:`medanomaly.io.read_image` for one file."""
    return read_channels(sample.files, sample.channel_names)


def strip_token(stem: str, tokens: tuple[str, ...]) -> tuple[str, bool]:
    """Remove a trailing token (case-insensitive) from a stem; say whether one was found."""
    low = stem.lower()
    for tok in tokens:
        if low.endswith(tok.lower()) and len(stem) > len(tok):
            return stem[: -len(tok)], True
    return stem, False


def is_mask_file(path: Path) -> bool:
    """A file that names itself a mask (``*_mask.png``) or sits in a mask folder."""
    return strip_token(stem_of(path), MASK_TOKENS)[1] or path.parent.name in MASK_DIRS


def _image_entries(folder: Path) -> list[Path]:
    """The image files and DICOM series folders in ``folder`` (not below it), sorted."""
    return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and (
        (p.is_file() and full_suffix(p) in IMAGE_SUFFIXES) or (p.is_dir() and is_dicom_series_dir(p)))]


def _mask_base(path: Path, token_needed: bool = True) -> str | None:
    """The stem a mask file names (``X_mask.png`` -> ``X``); None for a file that is no mask
    (no mask token, where ``token_needed``: masks in a masks/ folder need none)."""
    base, found = strip_token(stem_of(path), MASK_TOKENS)
    return base if found or not token_needed else None


def _mask_for(image: Path, masks: list[tuple[Path, str]]) -> Path | None:
    """The one mask of ``image`` among ``masks`` ((path, base) pairs): those naming its stem, else
    those naming its key (the stem without a modality token). Two or more is an error naming them:
    silently taking one of them could train on the wrong (e.g. an empty) mask."""
    stem = stem_of(image)
    key = strip_token(stem, IMAGE_TOKENS)[0]
    found = [m for m, base in masks if base == stem] or [m for m, base in masks if base == key]
    if len(found) > 1:
        raise MedanomalyError(f"{image} has {len(found)} candidate masks: {' and '.join(map(str, found))}; an image "
                              "needs exactly one: keep the right one and move the other(s) out of the data folder")
    return found[0] if found else None


def _pair(images: list[Path], masks: list[tuple[Path, str]]) -> tuple[list[tuple[Path, Path | None, str]], list[Path]]:
    """(pairs (image, mask, key), the masks no image took)."""
    pairs = [(p, _mask_for(p, masks), strip_token(stem_of(p), IMAGE_TOKENS)[0]) for p in images]
    used = {m for _, m, _ in pairs}
    return pairs, [m for m, _ in masks if m not in used]


def _pair_folder(folder: Path) -> tuple[list[tuple[Path, Path | None, str]], list[Path]]:
    """Pairs (image, mask, key) among the files of one folder (sibling naming), and the unmatched masks."""
    entries = _image_entries(folder)
    masks = [(p, base) for p in entries if (base := _mask_base(p)) is not None]
    return _pair([p for p in entries if _mask_base(p) is None], masks)


def _pair_dirs(img_dir: Path, mask_dir: Path) -> tuple[list[tuple[Path, Path | None, str]], list[Path]]:
    """Pairs between an images/ folder and a masks/ folder, matched by key (a ``X_mask.png`` beside
    the images is a candidate too), and the unmatched masks."""
    entries = _image_entries(img_dir)
    masks = [(m, _mask_base(m, token_needed=False)) for m in _image_entries(mask_dir)]
    masks += [(p, base) for p in entries if (base := _mask_base(p)) is not None]
    return _pair([p for p in entries if _mask_base(p) is None], masks)


@dataclass
class _Channels:
    """What discovery saw of channels: the nnU-Net descriptions of its folders and each sample's
    channel group (for :func:`medanomaly.data.channels.check_channel_sets`)."""

    infos: list[DatasetInfo] = field(default_factory=list)
    groups: list[tuple[str, ChannelGroup]] = field(default_factory=list)


def _walk(root: Path, folder: Path, out: list[Sample], seen: set[Path], orphans: list[Path],
          channels: _Channels) -> None:
    real = folder.resolve()
    if real in seen:  # symlink loops
        return
    seen.add(real)
    names = {p.name: p for p in folder.iterdir() if p.is_dir()}
    img_dirs = [names[d] for d in IMAGE_DIRS if d in names]
    used_mask_dirs = set()
    for img_dir in img_dirs:
        mask_dir = next((names[d] for d in _mask_dirs_for(img_dir.name) if d in names), None)
        pairs, unused = _pair_dirs(img_dir, mask_dir) if mask_dir else _pair_folder(img_dir)
        used_mask_dirs.add(mask_dir)
        out.extend(_samples(root, img_dir, pairs, channels))
        orphans.extend(unused)
    pairs, unused = _pair_folder(folder)
    out.extend(_samples(root, folder, pairs, channels))
    orphans.extend(unused)
    for d in MASK_DIRS:  # a masks/ folder without its images/ folder: its masks go unused
        if d in names and names[d] not in used_mask_dirs:
            orphans.extend(_image_entries(names[d]))
    for sub in sorted(names.values()):
        if sub in img_dirs or sub.name in MASK_DIRS or sub.name.startswith(".") or is_dicom_series_dir(sub):
            continue
        _walk(root, sub, out, seen, orphans, channels)


def _samples(root: Path, folder: Path, pairs: list[tuple[Path, Path | None, str]], found: _Channels) -> list[Sample]:
    """The samples of one folder's (image, mask, key) pairs, channel files grouped
    (:func:`medanomaly.data.channels.group_channels`), noted in ``found``."""
    info = nnunet_info(folder) if pairs else None
    if info is not None:
        found.infos.append(info)
    out = []
    for g in group_channels(pairs, info):
        out.append(_sample(root, g.files[0], g.mask, g.key, g.files if len(g.files) > 1 else (), g.names))
        found.groups.append((out[-1].case, g))
    return out


def _report_orphans(root: Path, orphans: list[Path]) -> None:
    """Warn (once per data folder and set of files) about masks that no image took (a renamed or missing image).
    Not an error: nothing is misread, and a data set may keep labels of images left out on purpose."""
    if not orphans or (root, tuple(orphans)) in _REPORTED:
        return
    _REPORTED.add((root, tuple(orphans)))
    shown = ", ".join(str(m) for m in orphans[:3]) + (f" and {len(orphans) - 3} more" if len(orphans) > 3 else "")
    log.warning("%d mask file(s) in %s have no image and are not used: %s; an image and its mask must sit side by "
                "side (X.png + X_mask.png) or in images/ + masks/ with the same name (see README, 'Data layouts')",
                len(orphans), root, shown)


#: (data folder, unmatched masks) already reported: discovery runs several times per command
_REPORTED: set[tuple[Path, tuple[Path, ...]]] = set()


def _mask_dirs_for(img_dir: str) -> tuple[str, ...]:
    if img_dir.startswith("images") and img_dir != "images":  # imagesTr -> labelsTr
        return ("labels" + img_dir[len("images"):],)
    return tuple(d for d in MASK_DIRS if not d.startswith("labels") or d == "labels")


def _sample(root: Path, image: Path, mask: Path | None, key: str, channels: tuple[Path, ...] = (),
            names: tuple[str, ...] = ()) -> Sample:
    rel = image.relative_to(root).parts
    # per-patient folders give the case id, unless the image sits in an images/ layout folder
    top = rel[0] if len(rel) > 1 and not any(part in IMAGE_DIRS for part in rel[:-1]) else None
    return Sample(image=image, mask=mask, case=top or key, key=key, channels=channels, channel_names=names)


def _key_of(image: Path) -> str:
    """An image's key: its stem without a modality token (``X_flair.png`` -> ``X``)."""
    return strip_token(stem_of(image), IMAGE_TOKENS)[0]


def discover(root: str | Path) -> list[Sample]:
    """All images below ``root`` with their masks (or None) and case ids, sorted by path.

    Slices of one case are ordered by the number in their name (``_10`` after ``_9``).
    """
    root = Path(root)
    if not root.exists():
        raise MedanomalyError(f"data folder {root} does not exist; pass the folder that holds your images")
    if is_listing(root):  # a CSV table of image (and mask) paths instead of a folder (medanomaly.data.listing)
        return [Sample(**fields) for fields in listed_samples(root, _key_of)]
    if root.is_file() or is_dicom_series_dir(root):
        return [Sample(image=root, mask=None, case=stem_of(root), key=stem_of(root))]
    out: list[Sample] = []
    orphans: list[Path] = []
    channels = _Channels()
    _walk(root, root, out, set(), orphans, channels)
    if not out:
        masks = _mask_files(root)
        if masks:
            raise MedanomalyError(
                f"found {len(masks)} mask file(s) in {root} (e.g. {masks[0]}) but no image: each image must sit "
                "beside its mask (X.png + X_mask.png) or in images/ next to masks/; add the images (see README, "
                "'Data layouts')"
            )
        raise MedanomalyError(
            f"no images found in {root}; supported files: {', '.join(IMAGE_SUFFIXES)} or DICOM series folders"
        )
    _report_orphans(root, orphans)
    check_channel_sets(channels.groups, next((i.channel_names for i in channels.infos if i.channel_names), ()))
    return sorted(out, key=lambda s: (s.case, natural_key(s.image.relative_to(root).as_posix())))


def dataset_labels(root: str | Path) -> tuple[Label, ...]:
    """The lesion labels ``root/dataset.json`` names (nnU-Net v2 or v1/MSD ``labels``, background left
    out; :func:`medanomaly.config.labels.from_dataset_json`); () where it has none."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return ()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedanomalyError(f"cannot read {path} ({exc}); it must be the JSON object nnU-Net describes "
                              "(channel_names, labels, file_ending): fix it or move it out of the data folder") from exc
    return from_dataset_json(data["labels"], str(path)) if isinstance(data, dict) and "labels" in data else ()


def with_labels(cfg: TrainConfig, root: str | Path) -> TrainConfig:
    """``cfg`` with the labels it trains: its own (``--labels``), else the two or more that
    ``root/dataset.json`` names (supervised 2D), else none (binary). Where several labels are not
    supported yet (3D, synthetic lesions, --unlabelled, --extra) dataset.json's are left out, as before, with
    an INFO line; given with ``--labels`` they are refused by the configuration itself."""
    if cfg.labels is not None or cfg.task != "supervised":
        return cfg
    found = dataset_labels(root)
    if len(found) < 2:
        return cfg
    text = labels_text(found)
    if cfg.model.dim == 3 or cfg.synthetic_lesions > 0 or cfg.unlabelled is not None or cfg.extra is not None:
        log.info("%s names %d labels (%s); several labels are not yet supported with --dim 3, --synthetic-lesions, "
                 "--unlabelled or --extra: trained as one lesion label (any value > 0)",
                 Path(root) / "dataset.json", len(found), text)
        return cfg
    log.info("labels from %s: %s", Path(root) / "dataset.json", text)
    return replace(cfg, labels=text)


def group_inputs(items: list[tuple[Path, Path]], channels: int) -> tuple[list[tuple[Path, Path]], dict[Path, Sample]]:
    """predict's inputs ((root, path) pairs) with the channel files of one image grouped as
    :func:`discover` groups them: in nnU-Net folders (imagesTs/, or beside a dataset.json) always; for
    a model of several ``channels`` anywhere (``_0000``, ``_0001``... or modality tokens, e.g. the
    channel files of one case given as files). Returns the (root, first file) item of each image and,
    keyed by that file, the :class:`Sample` to read (:func:`read_sample`). Order kept."""
    folders: dict[tuple[Path, Path], list[Path]] = {}
    for root, path in items:
        folders.setdefault((root, path.parent), []).append(path)
    firsts: dict[Path, Sample] = {}
    for (_, folder), paths in folders.items():
        info = nnunet_info(folder) or (DatasetInfo() if channels > 1 else None)
        for g in group_channels([(p, None, stem_of(p)) for p in paths], info, tokens=channels > 1):
            firsts[g.files[0]] = Sample(g.files[0], None, g.key, g.key, g.files if len(g.files) > 1 else (), g.names)
    return [(root, path) for root, path in items if path in firsts], firsts


def _mask_files(root: Path, limit: int = 1000) -> list[Path]:
    """Up to ``limit`` mask files below ``root`` (for the message when no image is found)."""
    found = []
    for p in sorted(root.rglob("*")):  # rglob does not follow symlinks to folders: no loops
        if len(found) >= limit:
            break
        if p.is_file() and full_suffix(p) in IMAGE_SUFFIXES and is_mask_file(p):
            found.append(p)
    return found




def load_splits(path: str | Path, cases: list[str]) -> dict[str, list[str]]:
    """Read a JSON split file with ``train``/``val``/``test`` lists of case ids; check the ids."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedanomalyError(f"cannot read split file {path}: {exc}; it must be JSON with train/val/test lists") from exc
    if not isinstance(splits, dict) or "train" not in splits:
        raise MedanomalyError(f"split file {path} must be a JSON object with 'train', 'val' and 'test' lists of case ids")
    known = set(cases)
    for name, ids in splits.items():
        missing = [c for c in ids if c not in known]
        if missing:
            raise MedanomalyError(
                f"split file {path}: {len(missing)} case ids of '{name}' are not in the data (e.g. {missing[:3]}); "
                f"case ids found are e.g. {sorted(known)[:3]}"
            )
    all_ids = [c for ids in splits.values() for c in ids]
    if len(all_ids) != len(set(all_ids)):
        raise MedanomalyError(f"split file {path} lists a case in more than one split; a case must be in one only")
    # train/val/test always; other named lists (e.g. "unlabelled", for train --unlabelled NAME) kept
    return {**{k: list(splits.get(k, [])) for k in ("train", "val", "test")},
            **{k: list(v) for k, v in splits.items() if k not in ("train", "val", "test")}}


def make_splits(cases: list[str], seed: int, val: float = 0.15, test: float = 0.15) -> dict[str, list[str]]:
    """A seeded split by case (never by slice): about 70/15/15, at least one val case when >= 2 cases."""
    ids = sorted(set(cases))
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_val = max(1, round(n * val)) if n >= 2 else 0
    n_test = max(1, round(n * test)) if n >= 3 else 0
    return {"val": sorted(ids[:n_val]), "test": sorted(ids[n_val:n_val + n_test]), "train": sorted(ids[n_val + n_test:])}


def resolve_splits(root: Path, samples: list[Sample], splits_file: str | Path | None, seed: int) -> dict[str, list[str]]:
    """``--splits FILE``, else ``root/splits.json``, else a seeded split by case."""
    cases = sorted({s.case for s in samples})
    listed = listing_splits(root, [(s.image, s.case) for s in samples]) if is_listing(root) else None
    if splits_file is None and listed is not None:  # a CSV listing's split column
        return listed
    if splits_file is None and Path(root, "splits.json").is_file():
        splits_file = Path(root, "splits.json")
    if splits_file is not None:
        return load_splits(splits_file, cases)
    return make_splits(cases, seed)

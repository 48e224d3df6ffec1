"""Data discovery, patient-level splits, intensity normalisation and in-memory 2D datasets.

Layouts found by :func:`discover` (first match wins, per folder):

* nnU-Net raw: ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz`` (and ``imagesTs``);
* ``images/`` + ``masks/`` (or ``labels/``, ``masks_png/``...) with matching file stems;
* siblings: ``X.png`` + ``X_mask.png``, ``X_flair.png`` + ``X_mask.png``, ``X_image.nrrd`` +
  ``X_label.nrrd``, ``X.tif`` + ``X_mask.tif`` (mask tokens: see :data:`MASK_TOKENS`);
* any image without a mask is kept with ``mask=None`` (used by the anomaly task and predict).

The case (patient) id is the first sub-folder below the data root when images sit in
per-patient folders (``lgg-flair/<patient>/...``), otherwise the file's key (stem without
modality/mask tokens). Splits are made by case, never by slice.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medanomaly.config.options import NORMALIZATIONS
from medanomaly.core.errors import MedanomalyError
from medanomaly.io import IMAGE_SUFFIXES, Image, full_suffix, is_dicom_series_dir, read_image, read_mask, stem_of

log = logging.getLogger(__name__)

MASK_TOKENS = ("_mask", "_masks", "_seg", "_segmentation", "_label", "_labels", "_gt", "_lesion")
IMAGE_TOKENS = ("_flair", "_image", "_img", "_t1", "_t2", "_ct", "_0000")
MASK_DIRS = ("masks", "mask", "masks_png", "labels", "label", "labelsTr", "labelsTs", "segmentations", "gt", "ground_truth")
IMAGE_DIRS = ("images", "image", "imagesTr", "imagesTs", "imgs")


@dataclass(frozen=True)
class Sample:
    """One image file (or DICOM series folder), its mask if any, and its case id."""

    image: Path
    mask: Path | None
    case: str
    key: str


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


def _walk(root: Path, folder: Path, out: list[Sample], seen: set[Path], orphans: list[Path]) -> None:
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
        out.extend(_sample(root, img, mask, key) for img, mask, key in pairs)
        orphans.extend(unused)
    pairs, unused = _pair_folder(folder)
    out.extend(_sample(root, img, mask, key) for img, mask, key in pairs)
    orphans.extend(unused)
    for d in MASK_DIRS:  # a masks/ folder without its images/ folder: its masks go unused
        if d in names and names[d] not in used_mask_dirs:
            orphans.extend(_image_entries(names[d]))
    for sub in sorted(names.values()):
        if sub in img_dirs or sub.name in MASK_DIRS or sub.name.startswith(".") or is_dicom_series_dir(sub):
            continue
        _walk(root, sub, out, seen, orphans)


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


def _sample(root: Path, image: Path, mask: Path | None, key: str) -> Sample:
    rel = image.relative_to(root).parts
    # per-patient folders give the case id, unless the image sits in an images/ layout folder
    top = rel[0] if len(rel) > 1 and not any(part in IMAGE_DIRS for part in rel[:-1]) else None
    return Sample(image=image, mask=mask, case=top or key, key=key)


def discover(root: str | Path) -> list[Sample]:
    """All images below ``root`` with their masks (or None) and case ids, sorted by path.

    Slices of one case are ordered by the number in their name (``_10`` after ``_9``).
    """
    root = Path(root)
    if not root.exists():
        raise MedanomalyError(f"data folder {root} does not exist; pass the folder that holds your images")
    if root.is_file() or is_dicom_series_dir(root):
        return [Sample(image=root, mask=None, case=stem_of(root), key=stem_of(root))]
    out: list[Sample] = []
    orphans: list[Path] = []
    _walk(root, root, out, set(), orphans)
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
    return sorted(out, key=lambda s: (s.case, _natural_key(s.image.relative_to(root).as_posix())))


def _mask_files(root: Path, limit: int = 1000) -> list[Path]:
    """Up to ``limit`` mask files below ``root`` (for the message when no image is found)."""
    found = []
    for p in sorted(root.rglob("*")):  # rglob does not follow symlinks to folders: no loops
        if len(found) >= limit:
            break
        if p.is_file() and full_suffix(p) in IMAGE_SUFFIXES and is_mask_file(p):
            found.append(p)
    return found


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


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
    if splits_file is None and Path(root, "splits.json").is_file():
        splits_file = Path(root, "splits.json")
    if splits_file is not None:
        return load_splits(splits_file, cases)
    return make_splits(cases, seed)


def normalize(array: np.ndarray, mode: str = "auto", kind: str = "raster", dtype: str | None = None) -> np.ndarray:
    """Intensities to about [0, 1], per channel. array (C, *S) float32 -> new float32 array.

    ``auto``: 8-bit rasters (``dtype`` "uint8", the stored type) / 255 (keeps the volume-level scaling of exported slices), CT
    (``kind`` dicom with negative values) as ``ct``, anything else ``percentile``.
    ``percentile``: 0.5th..99.5th percentile of the image (a whole volume for volumes) to 0..1.
    ``ct``: window -1000..1000 HU to 0..1. ``none``: unchanged.
    """
    if mode not in NORMALIZATIONS:
        raise MedanomalyError(f"unknown normalization {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
    a = array.astype(np.float32, copy=True)
    if mode == "auto":
        eight_bit = dtype == "uint8" if dtype else bool(a.min() >= 0 and a.max() <= 255 and np.all(a == np.round(a)))
        if kind == "raster" and eight_bit:
            return a / 255.0
        mode = "ct" if kind == "dicom" and a.min() < -500 else "percentile"
    if mode == "none":
        return a
    if mode == "ct":
        return np.clip((a + 1000.0) / 2000.0, 0.0, 1.0)
    for c in range(a.shape[0]):
        lo, hi = np.percentile(a[c], [0.5, 99.5])
        a[c] = np.clip((a[c] - lo) / (hi - lo), 0, 1) if hi > lo else 0.0
    return a


def to_slices(image: Image | np.ndarray) -> np.ndarray:
    """(C, H, W) -> (1, C, H, W); (C, Z, Y, X) -> (Z, C, Y, X): a stack of 2D slices (a view)."""
    a = image.array if isinstance(image, Image) else image
    return a[None] if a.ndim == 3 else np.moveaxis(a, 1, 0)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (N, C, H, W) to (N, C, *size); antialiased when shrinking images."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


@dataclass
class SliceSet:
    """2D training slices held in memory at the training size.

    images (N, C, S, S) float16 in about [0, 1]; masks (N, 1, S, S) uint8 or None; one case id
    and source path per slice; ``lesion`` (N,) bool: the slice's mask, at full resolution, is not
    empty (False where there is no mask); ``labelled`` (N,) bool: a mask was read for the slice.
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    cases: list[str]
    sources: list[Path]
    lesion: torch.Tensor
    labelled: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, keep: torch.Tensor) -> SliceSet:
        """The slices where ``keep`` (N,) bool is True."""
        idx = torch.nonzero(keep).flatten().tolist()
        return SliceSet(self.images[idx], None if self.masks is None else self.masks[idx],
                        [self.cases[i] for i in idx], [self.sources[i] for i in idx],
                        self.lesion[idx], self.labelled[idx])


def concat_slices(*sets: SliceSet) -> SliceSet:
    """One SliceSet with the slices of ``sets`` in order; all must have the same channels and size,
    and either all have masks or none has."""
    if len({tuple(s.images.shape[1:]) for s in sets}) != 1 or len({s.masks is None for s in sets}) != 1:
        raise ValueError("concat_slices: the sets differ in channels, size or in having masks")
    masks = None if sets[0].masks is None else torch.cat([s.masks for s in sets])
    return SliceSet(torch.cat([s.images for s in sets]), masks,
                    [c for s in sets for c in s.cases], [p for s in sets for p in s.sources],
                    torch.cat([s.lesion for s in sets]), torch.cat([s.labelled for s in sets]))


def load_slices(samples: list[Sample], size: int, normalization: str = "auto", with_masks: bool | None = True,
                progress: bool = False) -> SliceSet:
    """Read, normalise and resize every image (volumes sliced along axis 0) to size x size.

    ``with_masks``: True = every image needs a mask; None = masks read where present (an image
    without one gets an empty mask and ``labelled`` False); False = masks ignored.
    Raises MedanomalyError naming the file when channel counts differ, a required mask is
    missing, or a mask does not match its image.
    """
    if not samples:
        raise MedanomalyError("no images to load: the selected split is empty")
    images, masks, cases, sources, lesion, labelled = [], [], [], [], [], []
    channels = None
    for s in tqdm(samples, desc="loading", unit="img", disable=not progress):
        img = read_image(s.image)
        if channels is None:
            channels = img.channels
        elif img.channels != channels:
            raise MedanomalyError(
                f"{s.image} has {img.channels} channels but {samples[0].image} has {channels}; "
                "all images of a data set must have the same channels (convert them, or split the folder)"
            )
        x = torch.from_numpy(to_slices(_normalized(img, normalization)))
        images.append(resize(x, (size, size)).half())
        n = x.shape[0]
        if with_masks and s.mask is None:
            raise MedanomalyError(f"no mask found for {s.image}; name it like {stem_of(s.image)}_mask.png or "
                                  "put images and masks in images/ and masks/ folders")
        if with_masks is not False:
            mt = _mask_slices(s, img, n)
            lesion.append(mt.flatten(1).amax(1) > 0)
            labelled.append(torch.full((n,), s.mask is not None))
            masks.append((resize(mt, (size, size)) > 0.5).to(torch.uint8))
        cases += [s.case] * n
        sources += [s.image] * n
    n_all = sum(len(x) for x in images)
    return SliceSet(torch.cat(images), torch.cat(masks) if masks else None, cases, sources,
                    torch.cat(lesion) if lesion else torch.zeros(n_all, dtype=torch.bool),
                    torch.cat(labelled) if labelled else torch.zeros(n_all, dtype=torch.bool))


def _mask_slices(s: Sample, img: Image, n: int) -> torch.Tensor:
    """The sample's mask as (n, 1, H, W) float slices; zeros when it has none."""
    if s.mask is None:
        return torch.zeros((n, 1) + tuple(img.spatial_shape[-2:]))
    m = read_mask(s.mask, like=img)
    mt = torch.from_numpy(m[None].astype(np.float32))
    return mt[None] if m.ndim == 2 else mt.permute(1, 0, 2, 3)


def _normalized(img: Image, mode: str) -> Image:
    return replace(img, array=normalize(img.array, mode, img.geometry.kind, img.geometry.meta.get("dtype")))

"""Inputs and outputs of ``predict``: which files below the inputs are images, where each one's
outputs go, and writing one prediction back in its input's own geometry and format.

An input is an image file, a DICOM series folder, a folder (every image below it) or a CSV listing
(:mod:`medanomaly.data.listing`: its images, below the folder that holds them all).
For an input ``rel/stem.ext`` below an input root, :func:`write_prediction` writes
``rel/stem_pred.<ext>`` (binary mask), ``rel/stem_score.<tif|nii.gz|nrrd>`` (float32 score map),
``rel/stem_overlay.png`` and, for a DICOM series with ``dicom_seg``, ``rel/stem_seg.dcm``. With
``naming="nnunet"`` it writes, as nnU-Net does, only the label map ``rel/<case>.<ext>`` (``case``: the
stem without nnU-Net's channel suffix ``_0000``; values 0/1, PNG included) and the DICOM SEG. Where two
inputs would share ``rel/stem``, :func:`output_stems` names them by their paths below the inputs'
common root (:func:`medanomaly.core.outputs.unique_stems`); :func:`check_outputs` refuses, before
any work, an output folder that the policy of :mod:`medanomaly.core.outputs` does not allow.

A model of several labels writes the label map (the label values, 0 background; PNG for rasters,
else the input's format and geometry) as ``rel/stem_pred.<ext>`` (nnunet: ``rel/<case>.<ext>``), one
float32 probability map per label ``rel/stem_score_<name>.<tif|nii.gz|nrrd>``, an overlay outlining
each label in its own colour (:data:`LABEL_RGB`), its regions per label (``label_value``,
``label_name``) and, for a DICOM series, a SEG of one segment per label.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image as PILImage
from scipy import ndimage

from medanomaly.config.labels import file_part
from medanomaly.core.atomic import atomic_path
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import (
    check_out_path,
    check_separate,
    existing_outputs,
    refuse_existing,
    unique_stems,
)
from medanomaly.core.version import __version__
from medanomaly.data.discover import is_mask_file
from medanomaly.data.listing import is_listing, listing_root, read_listing
from medanomaly.infer.overlay import best_slice, overlay_rgb, save_png
from medanomaly.infer.predictor import Prediction
from medanomaly.io import (
    IMAGE_SUFFIXES,
    Image,
    full_suffix,
    is_dicom_series_dir,
    stem_of,
    write_labels,
    write_mask,
    write_score,
)
from medanomaly.io.dicomseg import write_dicom_seg
from medanomaly.io.dicomseg_labels import write_dicom_seg_labels
from medanomaly.postprocess.ops import region_table

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = ("_pred", "_score", "_overlay", "_seg")  # of the stems this module writes
#: what write_prediction adds to a stem: exact names, and names whose suffix the image format decides
EXACT_TAILS, FORMAT_TAILS = ("_overlay.png", "_seg.dcm"), ("_pred", "_score")
#: nnU-Net's channel suffix of an image file name (``case_0000.nii.gz``): not part of the case id
NNUNET_CHANNEL = re.compile(r"_\d{4}$")
#: the per-label score maps of a model of several labels (``stem_score_<name>``): outputs, never inputs
LABEL_SCORE = re.compile(r"_score_[A-Za-z0-9._-]+$")
#: the outline colour of each label in overlays, in label order (then again from the first)
LABEL_RGB = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
             (240, 50, 230), (210, 245, 60))


def iter_inputs(inputs: list[str | Path]) -> Iterator[tuple[Path, Path]]:
    """(root, path) for each image below the inputs; masks and our own outputs are skipped, and an
    image reached twice (given twice, or a file given with its folder) is predicted once."""
    seen: set[str] = set()
    for root, path in _candidates(inputs):
        if (real := os.path.abspath(path)) in seen:  # a link is another name, kept: its outputs are named after it
            log.info("%s is given more than once; predicted once", path)
            continue
        seen.add(real)
        yield root, path


def _candidates(inputs: list[str | Path]) -> Iterator[tuple[Path, Path]]:
    for given in map(Path, inputs):
        if not given.exists():
            raise MedanomalyError(f"input {given} does not exist")
        if is_listing(given):  # its images, named below the folder that holds them all
            root = listing_root(given)
            yield from ((root, row.image) for row in read_listing(given))
            continue
        if given.is_file() or is_dicom_series_dir(given):
            yield given.parent, given
            continue
        for path in sorted(given.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(given).parts):
                continue
            if path.is_dir() and is_dicom_series_dir(path):
                yield given, path
            elif path.is_file() and full_suffix(path) in IMAGE_SUFFIXES and not is_mask_file(path) \
                    and not stem_of(path).endswith(OUTPUT_SUFFIXES) and not LABEL_SCORE.search(stem_of(path)) \
                    and not is_dicom_series_dir(path.parent):
                yield given, path


def output_stem(out: Path, root: Path, path: Path) -> Path:
    """``out/rel/stem`` for the input ``root/rel/stem.ext``: the outputs add their suffixes to it."""
    rel = path.relative_to(root)
    return out / rel.parent / stem_of(path)


def nnunet_case(path: Path) -> str:
    """The case id nnU-Net names an image's prediction by: the stem without its channel suffix
    (``case_0000.nii.gz`` -> ``case``; a stem without one is kept)."""
    return NNUNET_CHANNEL.sub("", stem_of(path)) or stem_of(path)


def output_stems(out: Path, items: list[tuple[Path, Path]], naming: str = "medanomaly") -> dict[Path, Path]:
    """``out/name`` for each (root, path) item: :func:`output_stem`'s ``rel/stem`` (``rel/case``
    with ``naming="nnunet"``: :func:`nnunet_case`) where no other item has it, else a name from the
    path below the common root of the items (:func:`medanomaly.core.outputs.unique_stems`); keyed by path."""
    stem = nnunet_case if naming == "nnunet" else stem_of
    return {path: out / name for (_, path), name in zip(items, unique_stems(items, stem))}


def check_output_dir(out: Path, inputs: list[str | Path]) -> None:
    """predict/evaluate: ``out`` can be a folder, is not inside an input tree and holds no input (a
    CSV listing's tree is the folder that holds its images, not the folder of the CSV file)."""
    check_out_path(out, "folder")
    check_separate(out, [listing_root(p) if is_listing(p) else p for p in inputs])


def check_outputs(out: Path, stems: list[Path], overwrite: bool, extra: tuple[str, ...] = (),
                  naming: str = "medanomaly") -> None:
    """Refuse, unless ``overwrite``, when a file that :func:`write_prediction` would write for one of
    the ``stems`` (with ``naming``) exists already, or one of the ``extra`` names of ``out`` (e.g. regions.json)."""
    tails = (("_seg.dcm",), ("",)) if naming == "nnunet" else (EXACT_TAILS, FORMAT_TAILS)
    found = existing_outputs([out / name for name in extra], ("",)) + existing_outputs(stems, *tails)
    refuse_existing(found, overwrite, out)


def write_label_map(mask: np.ndarray, like: Image, stem: Path) -> Path:
    """``stem.<ext>``: the mask as nnU-Net writes label maps, uint8 0 (background) / 1 (lesion) in
    the format and geometry :func:`medanomaly.io.write_mask` uses; a PNG too holds 0/1 (not 0/255,
    which nnU-Net would read as label 255). A label map (not bool: several labels) keeps its values."""
    if np.asarray(mask).dtype != bool:
        return write_labels(mask, like, stem)
    if like.geometry.kind != "raster":
        return write_mask(mask, like, stem)
    final = Path(f"{stem}.png")
    with atomic_path(final) as tmp:
        PILImage.fromarray((np.asarray(mask) != 0).astype(np.uint8)).save(tmp, format="PNG")
    return final


def write_prediction(pred: Prediction, stem: Path, dicom_seg: bool = False, naming: str = "medanomaly") -> dict:
    """Write mask, score map and overlay for one prediction (``naming="nnunet"``: the label map
    ``stem.<ext>`` alone, :func:`write_label_map`); return its regions record.

    ``dicom_seg``: for a DICOM series folder, also ``stem_seg.dcm``, the mask as a DICOM SEG
    referencing the series (it carries the patient/study identifiers the standard requires).
    A prediction of several labels: :func:`write_label_prediction`."""
    if pred.labels:
        return write_label_prediction(pred, stem, dicom_seg, naming)
    if naming == "nnunet":
        write_label_map(pred.mask, pred.image, stem)
    else:
        write_mask(pred.mask, pred.image, Path(f"{stem}_pred"))
        write_score(pred.score, pred.image, Path(f"{stem}_score"))
    outputs = {}
    if dicom_seg and pred.image.geometry.kind == "dicom" and pred.image.path.is_dir():
        outputs["dicom_seg"] = write_dicom_seg(pred.mask, pred.image.path, Path(f"{stem}_seg.dcm"),
                                               version=__version__).name
    if naming != "nnunet":
        _write_overlay(pred, stem)
    g = pred.image.geometry
    return {"regions": region_table(pred.mask, pred.score, g.spacing if g.spacing_known else None), **outputs}


def write_label_prediction(pred: Prediction, stem: Path, dicom_seg: bool = False, naming: str = "medanomaly") -> dict:
    """:func:`write_prediction` for a model of several labels (see the module docstring); returns its
    regions record: every component of every label, with the label's value and name."""
    if naming == "nnunet":
        write_label_map(pred.mask, pred.image, stem)
    else:
        write_labels(pred.mask, pred.image, Path(f"{stem}_pred"))
        for k, label in enumerate(pred.labels):
            write_score(pred.score[k], pred.image, Path(f"{stem}_score_{file_part(label)}"))
        _write_label_overlay(pred, stem)
    outputs = {}
    if dicom_seg and pred.image.geometry.kind == "dicom" and pred.image.path.is_dir():  # one segment per label
        outputs["dicom_seg"] = write_dicom_seg_labels(pred.mask, pred.image.path, Path(f"{stem}_seg.dcm"),
                                                      pred.labels, version=__version__).name
    g = pred.image.geometry
    spacing = g.spacing if g.spacing_known else None
    regions = [{"label_value": label.value, "label_name": label.name, **row} for k, label in enumerate(pred.labels)
               for row in region_table(pred.mask == label.value, pred.score[k], spacing)]
    return {"regions": regions, **outputs}


def _write_label_overlay(pred: Prediction, stem: Path) -> None:
    """``stem_overlay.png`` of several labels: the highest label probability as the heat map, each
    label outlined in its colour (:data:`LABEL_RGB`); a volume shows its slice of largest labelled area."""
    img, score, labels = pred.image.array, pred.score.max(axis=0), pred.mask
    if score.ndim == 3:
        k = best_slice(score, labels != 0)
        img, score, labels = img[:, k], score[k], labels[k]
    rgb = overlay_rgb(img, score)
    for i, label in enumerate(pred.labels):
        m = labels == label.value
        rgb[m & ~ndimage.binary_erosion(m)] = LABEL_RGB[i % len(LABEL_RGB)]
    save_png(rgb, Path(f"{stem}_overlay.png"))


def _write_overlay(pred: Prediction, stem: Path) -> None:
    """``stem_overlay.png``; a volume shows its slice with the largest predicted area (else peak score)."""
    img, score, mask = pred.image.array, pred.score, pred.mask
    if score.ndim == 3:
        k = best_slice(score, mask)
        img, score, mask = img[:, k], score[k], mask[k]
    save_png(overlay_rgb(img, score, mask), Path(f"{stem}_overlay.png"))


def _by_stem(folder: Path, cache: dict[Path, dict[str, list[Path]]]) -> dict[str, list[Path]]:
    """The image files of ``folder`` by case-folded stem, listed once per folder (``cache``)."""
    if folder not in cache:
        index: dict[str, list[Path]] = {}
        if folder.is_dir():
            for name in sorted(os.listdir(folder)):
                if full_suffix(name) in IMAGE_SUFFIXES and (folder / name).is_file():
                    index.setdefault(stem_of(name).casefold(), []).append(folder / name)
        cache[folder] = index
    return cache[folder]


def prediction_files(pred_dir: Path, root: Path, image: Path, own: list[Path],
                     cache: dict[Path, dict[str, list[Path]]]) -> list[Path]:
    """Every file of ``pred_dir`` that may be the prediction of ``image`` (below ``root``): the names
    ``predict`` gives it (``own``: name stems such as ``out/rel/stem_pred`` or ``out/rel/case``, whose
    suffix the format decides) and the names other tools give it, below ``pred_dir`` as the image is
    below ``root`` or directly in ``pred_dir`` (nnU-Net writes one flat folder): ``STEM_pred.EXT``
    and ``CASE.EXT`` (:func:`nnunet_case`). Sorted; more than one means the name is ambiguous."""
    rel = Path(os.path.relpath(image, root)).parent
    names = (f"{stem_of(image)}_pred", nnunet_case(image))
    wanted = [(s.parent, s.name) for s in own] + [(pred_dir / d, n) for d in {rel, Path(".")} for n in names]
    return sorted({p for folder, name in wanted for p in _by_stem(folder, cache).get(name.casefold(), [])})


def score_file(pred: Path, cache: dict[Path, dict[str, list[Path]]]) -> Path | None:
    """The score map beside a ``STEM_pred.EXT`` prediction (``STEM_score.*``); None for other names or none there."""
    stem = stem_of(pred)
    if not stem.casefold().endswith("_pred"):
        return None
    found = _by_stem(pred.parent, cache).get(f"{stem[:-len('_pred')]}_score".casefold(), [])
    return found[0] if len(found) == 1 else None

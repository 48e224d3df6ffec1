"""Inputs and outputs of ``predict``: which files below the inputs are images, where each one's
outputs go, and writing one prediction back in its input's own geometry and format.

For an input ``rel/stem.ext`` below an input root, :func:`write_prediction` writes
``rel/stem_pred.<ext>`` (binary mask), ``rel/stem_score.<tif|nii.gz|nrrd>`` (float32 score map),
``rel/stem_overlay.png`` and, for a DICOM series with ``dicom_seg``, ``rel/stem_seg.dcm``. Where two
inputs would share ``rel/stem``, :func:`output_stems` names them by their paths below the inputs'
common root (:func:`medanomaly.core.outputs.unique_stems`); :func:`check_outputs` refuses, before
any work, an output folder that the policy of :mod:`medanomaly.core.outputs` does not allow.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

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
from medanomaly.infer.overlay import best_slice, overlay_rgb, save_png
from medanomaly.infer.predictor import Prediction
from medanomaly.io import (
    IMAGE_SUFFIXES,
    full_suffix,
    is_dicom_series_dir,
    stem_of,
    write_mask,
    write_score,
)
from medanomaly.io.dicomseg import write_dicom_seg
from medanomaly.postprocess.ops import region_table

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = ("_pred", "_score", "_overlay", "_seg")  # of the stems this module writes
#: what write_prediction adds to a stem: exact names, and names whose suffix the image format decides
EXACT_TAILS, FORMAT_TAILS = ("_overlay.png", "_seg.dcm"), ("_pred", "_score")


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
        if given.is_file() or is_dicom_series_dir(given):
            yield given.parent, given
            continue
        for path in sorted(given.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(given).parts):
                continue
            if path.is_dir() and is_dicom_series_dir(path):
                yield given, path
            elif path.is_file() and full_suffix(path) in IMAGE_SUFFIXES and not is_mask_file(path) \
                    and not stem_of(path).endswith(OUTPUT_SUFFIXES) and not is_dicom_series_dir(path.parent):
                yield given, path


def output_stem(out: Path, root: Path, path: Path) -> Path:
    """``out/rel/stem`` for the input ``root/rel/stem.ext``: the outputs add their suffixes to it."""
    rel = path.relative_to(root)
    return out / rel.parent / stem_of(path)


def output_stems(out: Path, items: list[tuple[Path, Path]]) -> dict[Path, Path]:
    """``out/name`` for each (root, path) item: :func:`output_stem`'s ``rel/stem`` where no other
    item has it, else a name from the path below the common root of the items
    (:func:`medanomaly.core.outputs.unique_stems`); keyed by path."""
    return {path: out / name for (_, path), name in zip(items, unique_stems(items, stem_of))}


def check_output_dir(out: Path, inputs: list[str | Path]) -> None:
    """predict/evaluate: ``out`` can be a folder, is not inside an input tree and holds no input."""
    check_out_path(out, "folder")
    check_separate(out, inputs)


def check_outputs(out: Path, stems: list[Path], overwrite: bool, extra: tuple[str, ...] = ()) -> None:
    """Refuse, unless ``overwrite``, when a file that :func:`write_prediction` would write for one of
    the ``stems`` exists already, or one of the ``extra`` names of ``out`` (e.g. regions.json)."""
    found = existing_outputs([out / name for name in extra], ("",)) + existing_outputs(stems, EXACT_TAILS, FORMAT_TAILS)
    refuse_existing(found, overwrite, out)


def write_prediction(pred: Prediction, stem: Path, dicom_seg: bool = False) -> dict:
    """Write mask, score map and overlay for one prediction; return its regions record.

    ``dicom_seg``: for a DICOM series folder, also ``stem_seg.dcm``, the mask as a DICOM SEG
    referencing the series (it carries the patient/study identifiers the standard requires)."""
    write_mask(pred.mask, pred.image, Path(f"{stem}_pred"))
    write_score(pred.score, pred.image, Path(f"{stem}_score"))
    outputs = {}
    if dicom_seg and pred.image.geometry.kind == "dicom" and pred.image.path.is_dir():
        outputs["dicom_seg"] = write_dicom_seg(pred.mask, pred.image.path, Path(f"{stem}_seg.dcm"),
                                               version=__version__).name
    img, score, mask = pred.image.array, pred.score, pred.mask
    if score.ndim == 3:  # a volume: the overlay shows its slice with the largest predicted area (else peak score)
        k = best_slice(score, mask)
        img, score, mask = img[:, k], score[k], mask[k]
    save_png(overlay_rgb(img, score, mask), Path(f"{stem}_overlay.png"))
    g = pred.image.geometry
    return {"regions": region_table(pred.mask, pred.score, g.spacing if g.spacing_known else None), **outputs}

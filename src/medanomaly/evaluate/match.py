"""Which prediction file of a ``--pred`` folder belongs to which image of the data: named as
``predict`` names it (``STEM_pred.EXT``, or ``CASE.EXT`` with ``--naming nnunet``, collision renames
included), as other tools do (``STEM_pred.EXT``) or as nnU-Net does (``CASE.EXT``: the image's stem
without ``_0000``), mirroring the data folder or directly in the ``--pred`` folder. Two candidate
files for one image, or one file for two images, is an error naming the case; images without a
prediction are left out with a warning (none at all: an error)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import Sample
from medanomaly.data.listing import data_root
from medanomaly.infer.write import iter_inputs, nnunet_case, output_stems, prediction_files
from medanomaly.io import stem_of

log = logging.getLogger(__name__)


def find_predictions(pred_dir: Path, data: Path, samples: Sequence[Sample]) -> dict[Path, Path]:
    """The prediction file of each sample that has one, keyed by image: named as ``predict DATA``
    names it (either ``--naming``, collision renames included), as other tools do (``STEM_pred.EXT``)
    or as nnU-Net does (``CASE.EXT``, flat or mirroring DATA; :func:`medanomaly.infer.write.prediction_files`).
    Two candidate files for one image, or one file for two images, is an error naming the case."""
    root, cache, items = data_root(data), {}, list(iter_inputs([data]))
    mine, nnunet = output_stems(pred_dir, items), output_stems(pred_dir, items, "nnunet")
    found: dict[Path, Path] = {}
    claimed: dict[Path, Sample] = {}
    for s in samples:
        inputs = {os.path.abspath(p) for p in (*s.files, s.mask) if p is not None}  # --pred DATA: not the inputs
        own = [Path(f"{mine[s.image]}_pred"), nnunet[s.image]] if s.image in mine else []
        files = [p for p in prediction_files(pred_dir, root, s.image, own, cache) if os.path.abspath(p) not in inputs]
        if len(files) > 1:
            raise MedanomalyError(f"case {s.case}: {len(files)} files in {pred_dir} may be the prediction of {s.image}"
                                  f" ({', '.join(map(str, files))}); keep one of them in --pred")
        if files and files[0] in claimed:
            raise MedanomalyError(f"{files[0]} may be the prediction of {claimed[files[0]].image} (case "
                                  f"{claimed[files[0]].case}) and of {s.image} (case {s.case}); name the predictions "
                                  "as 'predict' does (STEM_pred.EXT) to tell them apart")
        if files:
            found[s.image], claimed[files[0]] = files[0], s
    return found


def check_missing(pred_dir: Path, samples: Sequence[Sample], missing: list[Sample]) -> None:
    """Images without a prediction are left out with a warning naming their cases; none at all is an error."""
    if not missing:
        return
    s = missing[0]
    looked = f"{stem_of(s.image)}_pred.* or {nnunet_case(s.image)}.*"
    if len(missing) == len(samples):
        raise MedanomalyError(f"no prediction in {pred_dir} for any of the {len(samples)} images (e.g. case {s.case}: "
                              f"looked for {looked} as 'predict' or nnU-Net name them, mirroring the data folder or "
                              "directly in it); check --pred and --data")
    cases = sorted({m.case for m in missing})
    log.warning("%d images of %d case(s) (%s) have no prediction in %s (e.g. %s: looked for %s); they are left out",
                len(missing), len(cases), ", ".join(cases[:5]) + (" ..." if len(cases) > 5 else ""), pred_dir,
                s.image, looked)

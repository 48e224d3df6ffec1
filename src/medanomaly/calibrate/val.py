"""The validation split of a model directory scored as ``predict`` will score it: the one
:class:`~medanomaly.infer.predictor.Predictor`, on the directory's ``model.pt`` (checked against its
hash) and the model file about to be written, so what is calibrated is what runs.
2D models give one entry per image; 3D models one per volume (stacked slices too), so that the
post-processing is chosen on whole volumes (3D components, ``min_size`` in voxels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medanomaly.config.model_file import ModelFile
from medanomaly.core.progress import track
from medanomaly.data.discover import Sample, discover, read_sample
from medanomaly.infer.predictor import Predictor
from medanomaly.infer.volume import iter_volumes
from medanomaly.io import read_label_map, read_mask


def val_samples(out: Path, data: Path, labelled_only: bool = True) -> list[Sample]:
    """The samples of ``data`` whose case is in the val split of ``out/splits.json`` (with a mask
    only, if ``labelled_only``)."""
    splits = json.loads((out / "splits.json").read_text())
    val = set(splits["val"])
    return [s for s in discover(data) if s.case in val and (s.mask is not None or not labelled_only)]


def val_predictions(out: Path, data: Path, device: torch.device | str, labelled_only: bool,
                    progress: bool, model_file: ModelFile | None = None) -> dict[str, list]:
    """Lists "scores" (float32 maps), "truths" (bool, all False without a mask), "cases", "images"
    (grey, channels averaged) and "labelled" of the val split, each of the image's own shape, as the
    model ``model_file`` (default: ``out/model.json``) predicts them. A model of several labels gives
    (K, *S) maps, one per label, and label maps (the label values) as truths."""
    predictor = Predictor(out, device, model_file=model_file)
    samples = val_samples(out, data, labelled_only)
    if predictor.dim == 3:  # whole volumes (stacked slices too), post-processed in 3D
        return _val_volumes(predictor, samples, progress)
    res: dict[str, list] = {"scores": [], "truths": [], "cases": [], "images": [], "labelled": []}
    several = bool(predictor.model_file.labels)
    for s in track(samples, desc="calibrating", unit="img", enabled=progress):
        img = read_sample(s)
        res["scores"].append(predictor.scores(img))
        read = read_label_map if several else read_mask  # several labels: truths are label maps (values)
        res["truths"].append(read(s.mask, like=img) if s.mask else np.zeros(img.spatial_shape, bool))
        res["cases"].append(s.case)
        res["images"].append(img.array.mean(axis=0))
        res["labelled"].append(s.mask is not None)
    return res


def _val_volumes(predictor: Predictor, samples: Sequence[Sample], progress: bool) -> dict[str, list]:
    """As :func:`val_predictions`, one entry per volume."""
    res: dict[str, list] = {"scores": [], "truths": [], "cases": [], "images": [], "labelled": []}
    for vc, image, _, truth in iter_volumes(samples, progress, "calibrating"):
        res["scores"].append(predictor.scores(image))
        res["truths"].append(truth)
        res["cases"].append(vc.case)
        res["images"].append(image.array.mean(axis=0))
        res["labelled"].append(any(m is not None for m in vc.masks))
    return res

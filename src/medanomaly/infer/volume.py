"""Volumes for the volume-wise loops of calibration, evaluation and predict with a 3D model:
samples grouped into volumes (:func:`medanomaly.data.volumes.group_volumes`; a folder of 2D slices
is one stacked volume) and the prediction of a stacked volume cut back into its slices, each
written in its own file's format.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from medanomaly.core.progress import track
from medanomaly.data.discover import Sample
from medanomaly.data.volumes import VolumeCase, group_volumes, read_volume, read_volume_mask
from medanomaly.infer.predictor import Prediction
from medanomaly.io import Image


def iter_volumes(samples: Sequence[Sample], progress: bool = False,
                 desc: str = "volumes") -> Iterator[tuple[VolumeCase, Image, list[Image] | None, np.ndarray]]:
    """(volume case, volume image, its 2D slices or None, bool mask (Z, Y, X)) for the samples
    grouped into volumes (:func:`medanomaly.data.volumes.group_volumes`); masks are all False where absent."""
    for vc in track(group_volumes(samples), desc=desc, unit="vol", enabled=progress):
        image, slices = read_volume(vc)
        yield vc, image, slices, read_volume_mask(vc, image, slices)


def slice_predictions(pred: Prediction, slices: list[Image]) -> list[Prediction]:
    """A volume Prediction of stacked slices -> one 2D Prediction per slice (its own Image)."""
    return [Prediction(im, pred.score[k], pred.mask[k]) for k, im in enumerate(slices)]

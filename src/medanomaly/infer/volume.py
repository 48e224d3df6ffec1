"""Inference with a 3D model (``model.json`` ``input.dim`` 3): score maps of whole volumes on the
input's own grid, and the volume-wise loops of calibration, evaluation and predict.

:func:`volume_scores` normalises the volume, resamples it to the training spacing, runs
:func:`medanomaly.infer.sliding.sliding_window` (overlapping patches, Gaussian-weighted logits) and
resamples the probability (or anomaly) map back to the input's grid, so the existing writers
save it with the input's affine. Folders of 2D slices are predicted as one stacked volume
(:mod:`medanomaly.data.volumes`) and written back slice by slice, in each slice's own format.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from medanomaly.anomaly.methods import residual_map
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import autocast
from medanomaly.data.slices import Sample, normalize
from medanomaly.data.volumes import (
    SLICE_SUFFIXES,
    VolumeCase,
    group_volumes,
    read_volume,
    read_volume_mask,
    resample,
    resampled_shape,
)
from medanomaly.infer.predictor import Prediction, output_stem, write_prediction
from medanomaly.infer.sliding import sliding_window
from medanomaly.io import Image

log = logging.getLogger(__name__)
OVERLAP = 0.5  # sliding-window overlap at inference (nnU-Net and MONAI's usual 0.5)


def volume_scores(predictor, image: Image, batch: int = 2) -> np.ndarray:
    """Probability (supervised) or anomaly map (float32, ``image.spatial_shape``) of a volume
    (C, Z, Y, X); a 2D image (C, H, W) is scored as a one-slice volume. ``predictor``: a
    :class:`medanomaly.infer.predictor.Predictor` whose model.json says dim 3."""
    a = normalize(image.array, predictor.normalization, image.geometry.kind, image.geometry.meta.get("dtype"))
    flat = a.ndim == 3
    a = a[:, None] if flat else a
    spacing = image.geometry.spacing if len(image.geometry.spacing) == 3 else (1.0, *image.geometry.spacing)
    shape = resampled_shape(a.shape[1:], spacing, predictor.spacing)
    x = resample(a, shape)
    with torch.inference_mode():
        if predictor.anomaly is not None:
            score = _anomaly_volume(predictor, x, batch)
        else:
            score = _probability_volume(predictor, x, batch)
        back = resample(score[None], a.shape[1:])[0].numpy().astype(np.float32)
    return back[0] if flat else back


def _forward(predictor):
    """The network on a batch of patches (N, C, *patch) -> float32 on the CPU: ONNX Runtime's
    session for ``runtime='onnx'`` (medanomaly.infer.export), else the PyTorch model in its precision."""
    if predictor.runtime == "onnx":
        return predictor._forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(predictor.device, predictor.precision):
            return predictor.model(x.to(predictor.device)).float().cpu()
    return forward


def _probability_volume(predictor, x: torch.Tensor, batch: int) -> torch.Tensor:
    """(C, *S) at the training spacing -> (*S) probability; averaged with the left-right flip if tta."""
    prob = torch.sigmoid(sliding_window(x, predictor.patch, _forward(predictor), OVERLAP, batch)[0])
    if predictor.tta:
        flipped = sliding_window(x.flip(-1), predictor.patch, _forward(predictor), OVERLAP, batch)[0]
        prob = 0.5 * (prob + torch.sigmoid(flipped).flip(-1))
    return prob


def _anomaly_volume(predictor, x: torch.Tensor, batch: int) -> torch.Tensor:
    """(C, *S) -> (*S) residual map (:func:`medanomaly.anomaly.methods.residual_map`, in 3D) of the
    sliding-window reconstruction (or, for method synthetic, the network's anomaly probability)."""
    recon = None
    if predictor.model is not None:
        recon = sliding_window(x, predictor.patch, _forward(predictor), OVERLAP, batch)
        recon = torch.sigmoid(recon) if predictor.anomaly.method == "synthetic" else recon
    return torch.from_numpy(residual_map(x.numpy(), None if recon is None else recon.numpy(), predictor.anomaly))


def iter_volumes(samples: Sequence[Sample], progress: bool = False,
                 desc: str = "volumes") -> Iterator[tuple[VolumeCase, Image, list[Image] | None, np.ndarray]]:
    """(volume case, volume image, its 2D slices or None, bool mask (Z, Y, X)) for the samples
    grouped into volumes (:func:`medanomaly.data.volumes.group_volumes`); masks are all False where absent."""
    from tqdm import tqdm

    for vc in tqdm(group_volumes(samples), desc=desc, unit="vol", disable=not progress):
        image, slices = read_volume(vc)
        yield vc, image, slices, read_volume_mask(vc, image, slices)


def val_predictions_3d(predictor, samples: Sequence[Sample], progress: bool) -> dict[str, list]:
    """As :func:`medanomaly.calibrate.search._val_predictions`, one entry per volume (post-processing is
    then chosen on whole volumes, with 3D components and min_size in voxels)."""
    res: dict[str, list] = {"scores": [], "truths": [], "cases": [], "images": [], "labelled": []}
    for vc, image, _, truth in iter_volumes(samples, progress, "calibrating"):
        res["scores"].append(predictor.scores(image))
        res["truths"].append(truth)
        res["cases"].append(vc.case)
        res["images"].append(image.array.mean(axis=0))
        res["labelled"].append(any(m is not None for m in vc.masks))
    return res


def slice_predictions(pred, slices: list[Image]) -> list:
    """A volume Prediction of stacked slices -> one 2D Prediction per slice (its own Image)."""
    return [Prediction(im, pred.score[k], pred.mask[k]) for k, im in enumerate(slices)]


def predict_items_3d(predictor, items: list[tuple[Path, Path]], out: Path, dicom_seg: bool,
                     progress: bool) -> tuple[list[dict], list[dict]]:
    """predict's loop for a 3D model: the 2D slice files of one folder are stacked and predicted
    as one volume, then written slice by slice; other inputs one by one. (records, failed)."""
    from tqdm import tqdm

    groups: dict[tuple, list[tuple[Path, Path]]] = {}
    for root, path in items:
        stack = path.is_file() and path.suffix.lower() in SLICE_SUFFIXES
        groups.setdefault((root, path.parent) if stack else (root, path), []).append((root, path))
    records, failed = [], []
    for group in tqdm(list(groups.values()), desc="predict", unit="vol", disable=not progress):
        root = group[0][0]
        try:
            vc = VolumeCase("", tuple(p for _, p in group), (None,) * len(group))
            image, slices = read_volume(vc)
            pred = predictor.predict(image)
            parts = [pred] if slices is None else slice_predictions(pred, slices)
            written = []
            for p, path in zip(parts, vc.images):
                stem = output_stem(out, root, path)
                written.append({"case": str(stem.relative_to(out)), **write_prediction(p, stem, dicom_seg)})
        except MedanomalyError as exc:
            log.info("skipped %s (reported at the end)", group[0][1].parent if len(group) > 1 else group[0][1].name)
            failed += [{"input": str(p), "error": str(exc)} for _, p in group]
            continue
        records += written
    return records, failed

"""Choose the threshold and post-processing on the validation split, never on test.

The search maximises the mean per-case Dice (the number users report) over the validation
images at their original size, by coordinate ascent: threshold x minimum component size first,
then hole filling, then boundary smoothing, each kept only if it helps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medanomaly import __version__
from medanomaly.atomic import atomic_write_text
from medanomaly.config import TrainConfig
from medanomaly.data import Sample, discover
from medanomaly.io import read_image, read_mask
from medanomaly.metrics import Stats, dice, get_stats
from medanomaly.postprocess import PostprocessParams, apply

log = logging.getLogger(__name__)

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_SIZES = (0, 10, 25, 50, 100, 200, 400)  # pixels (voxels) of the original image


def mean_case_dice(preds: list[np.ndarray], truths: list[np.ndarray], cases: list[str]) -> float:
    """Mean over cases of the Dice of each case's pooled pixels (slices of a case pooled)."""
    per_case: dict[str, Stats] = {}
    for p, t, c in zip(preds, truths, cases):
        s = get_stats(p, t)
        per_case[c] = per_case[c] + s if c in per_case else s
    return float(np.mean([dice(s) for s in per_case.values()]))


def search(scores: list[np.ndarray], truths: list[np.ndarray], cases: list[str], images: list[np.ndarray]) -> tuple[PostprocessParams, float, list[dict]]:
    """Coordinate-ascent search of PostprocessParams; returns (best, its mean case Dice, trials)."""
    trials: list[dict] = []

    def score_of(params: PostprocessParams) -> float:
        preds = [apply(s, params, image=im) for s, im in zip(scores, images)]
        value = mean_case_dice(preds, truths, cases)
        trials.append({**params.to_dict(), "mean_case_dice": value})
        return value

    best, best_value = PostprocessParams(), -1.0
    for t in THRESHOLDS:
        for m in MIN_SIZES:
            cand = PostprocessParams(threshold=t, min_size=m)
            value = score_of(cand)
            if value > best_value + 1e-9:
                best, best_value = cand, value
    for change in ({"fill_holes": True}, {"smooth_radius": 1}, {"smooth_radius": 2}):
        cand = replace(best, **change)
        value = score_of(cand)
        if value > best_value + 1e-9:
            best, best_value = cand, value
    return best, best_value, trials


def model_meta(cfg: TrainConfig, in_channels: int, post: PostprocessParams, extra: dict) -> dict:
    """The content of model.json: everything predict needs, nothing that identifies a patient."""
    return {
        "format": "medanomaly-model",
        "medanomaly_version": __version__,
        "task": cfg.task,
        "model": {**cfg.model.to_dict(), "in_channels": in_channels, "out_channels": 1},
        "input": {"channels": in_channels, "size": cfg.size, "normalization": cfg.normalization, "dim": 2},
        "precision": cfg.precision,
        "postprocess": post.to_dict(),
        **extra,
    }


def val_samples(out: Path, data: Path) -> list[Sample]:
    splits = json.loads((out / "splits.json").read_text())
    val = set(splits["val"])
    return [s for s in discover(data) if s.case in val and s.mask is not None]


def calibrate_and_save(out: Path, model: torch.nn.Module, cfg: TrainConfig, data: Path, in_channels: int,
                       best_epoch: int, best_val: float, device: torch.device, progress: bool = True) -> PostprocessParams:
    """Write model.json with post-processing chosen on the validation split of ``out/splits.json``."""
    from tqdm import tqdm

    from medanomaly.predict import Predictor

    training = {"best_epoch": best_epoch, "val_dice_at_0.5_train_size": best_val}
    atomic_write_text(out / "model.json", json.dumps(model_meta(cfg, in_channels, PostprocessParams(), {
        "training": training, "calibration": {"status": "pending"}}), indent=2))
    predictor = Predictor(out, device)
    scores, truths, cases, images = [], [], [], []
    for s in tqdm(val_samples(out, data), desc="calibrating", unit="img", disable=not progress):
        img = read_image(s.image)
        scores.append(predictor.scores(img))
        truths.append(read_mask(s.mask, like=img))
        cases.append(s.case)
        images.append(img.array.mean(axis=0))
    best, value, trials = search(scores, truths, cases, images)
    calibration = {"split": "val", "objective": "mean per-case Dice", "n_images": len(scores),
                   "n_cases": len(set(cases)), "mean_case_dice": value,
                   "mean_case_dice_at_0.5": next(t["mean_case_dice"] for t in trials
                                                 if t["threshold"] == 0.5 and t["min_size"] == 0),
                   "trials": len(trials)}
    log.info("post-processing chosen on val: %s (mean case Dice %.4f)", best.to_dict(), value)
    atomic_write_text(out / "model.json", json.dumps(model_meta(cfg, in_channels, best, {
        "training": training, "calibration": calibration}), indent=2))
    return best

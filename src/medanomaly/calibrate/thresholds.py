"""The searches for the threshold and post-processing on the validation split (never on test),
on score maps already computed at the images' original size.

- :func:`search` (supervised): maximises the mean per-case Dice (the number users report) by
  coordinate ascent: threshold x minimum component size first, then hole filling, then boundary
  smoothing, each kept only if it improves the Dice by more than 1e-9.
- :func:`calibrate_labels` (several labels): :func:`search` for each label on its own probability.
- :func:`calibrate_anomaly`: the threshold at a target false-positive rate of the foreground pixels
  of normal images, or, where val has lesion masks, the threshold and minimum component size with
  the best pooled Dice.

Sizes (``min_size``) are pixels (voxels for 3D models) of the original image.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from medanomaly.config.labels import Label
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import PostprocessParams
from medanomaly.data.foreground import foreground_mask
from medanomaly.metrics.functional import (
    Stats,
    add_case,
    best_dice_threshold,
    dice,
    get_stats,
    mean_case_dice,
    threshold_at_fpr,
)
from medanomaly.postprocess.ops import apply

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_SIZES = (0, 10, 25, 50, 100, 200, 400)  # pixels (voxels) of the original image
REFINEMENTS = ({"fill_holes": True}, {"smooth_radius": 1}, {"smooth_radius": 2})  # tried in turn on the best
ANOMALY_FACTORS = (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25)  # x the best pixel-Dice threshold


def search(scores: list[np.ndarray], truths: list[np.ndarray], cases: list[str],
           images: list[np.ndarray]) -> tuple[PostprocessParams, float, list[dict[str, Any]]]:
    """Coordinate-ascent search of PostprocessParams over the val images (score maps, bool truths
    and grey images of one shape each; ``cases`` pools the slices of a case); returns (best, its
    mean per-case Dice, every trial with its Dice)."""
    trials: list[dict[str, Any]] = []

    def score_of(params: PostprocessParams) -> float:
        per_case: dict[str, Stats] = {}
        for s, t, c, im in zip(scores, truths, cases, images):
            add_case(per_case, c, get_stats(apply(s, params, image=im), t))
        value = mean_case_dice(per_case)
        trials.append({**params.to_dict(), "mean_case_dice": value})
        return value

    best, best_value = PostprocessParams(), -1.0
    for t in THRESHOLDS:
        for m in MIN_SIZES:
            cand = PostprocessParams(threshold=t, min_size=m)
            value = score_of(cand)
            if value > best_value + 1e-9:
                best, best_value = cand, value
    for change in REFINEMENTS:
        cand = replace(best, **change)
        value = score_of(cand)
        if value > best_value + 1e-9:
            best, best_value = cand, value
    return best, best_value, trials


def calibrate_labels(v: dict[str, list], labels: tuple[Label, ...]) -> tuple[tuple[PostprocessParams, ...],
                                                                              dict[str, Any]]:
    """Several labels: :func:`search` for each label on its own probability maps (``v["scores"]``:
    (K, *S) per image) against its own truth (``v["truths"]``: label maps, compared with the label's
    value). Returns (each label's post-processing, the calibration record)."""
    posts, records = [], []
    for k, label in enumerate(labels):
        best, value, trials = search([s[k] for s in v["scores"]], [t == label.value for t in v["truths"]],
                                     v["cases"], v["images"])
        posts.append(best)
        records.append({"value": label.value, "name": label.name, "mean_case_dice": value,
                        "mean_case_dice_at_0.5": next(t["mean_case_dice"] for t in trials
                                                      if t["threshold"] == 0.5 and t["min_size"] == 0),
                        "trials": len(trials)})
    return tuple(posts), {"split": "val", "objective": "mean per-case Dice of each label", "n_images": len(v["scores"]),
                          "n_cases": len(set(v["cases"])),
                          "mean_case_dice": float(np.mean([r["mean_case_dice"] for r in records])), "labels": records}


def calibrate_anomaly(v: dict[str, list], cfg: TrainConfig) -> tuple[PostprocessParams, dict[str, Any]]:
    """Anomaly thresholds on val (``v``: lists "scores", "truths" and "images" as
    :func:`medanomaly.calibrate.val.val_predictions` gives): (a) from normal images only, at the
    target pixel FPR inside the foreground; (b) where val masks with lesions exist, threshold and
    minimum component size maximising the pooled Dice over all val images. (b) is used when
    available. Returns (the post-processing, the calibration record)."""
    normal = [i for i, t in enumerate(v["truths"]) if not t.any()]
    fg_scores = np.concatenate([v["scores"][i][foreground_mask(v["images"][i])] for i in normal] or [np.zeros(1)])
    t_fpr = threshold_at_fpr(fg_scores, cfg.anomaly.target_fpr)
    calib = {"split": "val", "target_fpr": cfg.anomaly.target_fpr, "threshold_at_target_fpr": t_fpr,
             "n_normal_images": len(normal), "achieved_fpr": float((fg_scores > t_fpr).mean()),
             "n_images": len(v["scores"])}
    if not any(t.any() for t in v["truths"]):
        calib["mode"] = "target_fpr (no lesion masks in val)"
        return PostprocessParams(threshold=t_fpr), calib
    flat_s = np.concatenate([s.ravel() for s in v["scores"]])
    flat_t = np.concatenate([t.ravel() for t in v["truths"]])
    t0, _ = best_dice_threshold(flat_s, flat_t, n_thresholds=200)
    best, best_dice = PostprocessParams(threshold=t_fpr), -1.0
    for t in np.unique([t0 * f for f in ANOMALY_FACTORS]):
        for m in MIN_SIZES:
            params = PostprocessParams(threshold=float(t), min_size=m)
            stats = sum((get_stats(apply(s, params), tr) for s, tr in zip(v["scores"], v["truths"])), Stats(0, 0, 0, 0))
            if dice(stats) > best_dice + 1e-9:
                best, best_dice = params, dice(stats)
    calib.update({"mode": "dice_on_val", "objective": "pooled Dice over val images", "val_dice": best_dice})
    return best, calib

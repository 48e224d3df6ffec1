"""Tests for medanomaly.calibrate.thresholds: the threshold and post-processing searches on tiny,
hand-checkable score maps."""

from __future__ import annotations

import numpy as np
import pytest

from medanomaly.calibrate.thresholds import MIN_SIZES, THRESHOLDS, calibrate_anomaly, calibrate_labels, search
from medanomaly.config.labels import Label
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import AnomalyConfig, PostprocessParams

N_TRIALS = len(THRESHOLDS) * len(MIN_SIZES) + 3  # the grid, then fill_holes, smooth 1, smooth 2


def _search(scores: list[np.ndarray], truths: list[np.ndarray], cases: list[str]):
    return search(scores, [t.astype(bool) for t in truths], cases, [np.zeros_like(s) for s in scores])


def test_the_first_threshold_separating_lesion_from_background_wins():
    """Scores 0.1, 0.35 | 0.65, 0.9 with the lesion on the right: thresholds 0.4..0.6 give Dice 1;
    0.4 is the first one (later equal ones are not better); min_size 10 would empty the mask."""
    best, value, trials = _search([np.array([[0.1, 0.35, 0.65, 0.9]])], [np.array([[0, 0, 1, 1]])], ["a"])
    assert best == PostprocessParams(threshold=0.4, min_size=0) and value == 1.0
    assert len(trials) == N_TRIALS
    at = {(t["threshold"], t["min_size"]): t["mean_case_dice"] for t in trials}
    assert at[(0.2, 0)] == pytest.approx(0.8)  # tp 2, fp 1: 4 / 5
    assert at[(0.7, 0)] == pytest.approx(2 / 3)  # tp 1, fn 1
    assert at[(0.4, 10)] == 0.0  # the 2-pixel lesion is smaller than min_size


def test_slices_of_a_case_are_pooled_and_cases_averaged():
    """Case a: slice 1 a hit, slice 2 (no lesion) a false positive at 0.55; case b: a lesion scored
    0.45. At 0.2: a pools to tp 1, fp 1 (Dice 2/3), b is 1: mean 5/6 (per-slice it would be 2/3)."""
    z = np.full((1, 3), 0.1)
    a1, a2, b = z.copy(), z.copy(), z.copy()
    a1[0, 0], a2[0, 1], b[0, 2] = 0.9, 0.55, 0.45
    t_a1, t_a2, t_b = np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((1, 3))
    t_a1[0, 0], t_b[0, 2] = 1, 1
    best, value, trials = _search([a1, a2, b], [t_a1, t_a2, t_b], ["a", "a", "b"])
    assert (best.threshold, best.min_size) == (0.2, 0) and value >= 5 / 6  # smoothing may reshape 1-pixel objects
    at = {(t["threshold"], t["min_size"]): t["mean_case_dice"] for t in trials[:-3]}
    assert at[(0.2, 0)] == at[(0.4, 0)] == pytest.approx(5 / 6) == max(at.values())
    assert at[(0.5, 0)] == pytest.approx(1 / 3)  # a: 2/3, b: missed
    assert at[(0.6, 0)] == pytest.approx(1 / 2)  # a: 1, b: missed


def test_min_size_removes_a_small_false_positive():
    score, truth = np.full((20, 20), 0.05), np.zeros((20, 20))
    score[2:8, 2:8], truth[2:8, 2:8] = 0.9, 1  # a 36-pixel lesion
    score[15:17, 15:17] = 0.9  # a 4-pixel false positive
    best, value, _ = _search([score], [truth], ["a"])
    assert best == PostprocessParams(threshold=0.2, min_size=10) and value == 1.0


def test_hole_filling_is_kept_only_when_it_helps():
    score, truth = np.full((20, 20), 0.05), np.zeros((20, 20))
    score[2:8, 2:8], truth[2:8, 2:8] = 0.9, 1
    score[4, 4] = 0.1  # a one-pixel hole inside the lesion: Dice 70 / 71 without filling
    best, value, trials = _search([score], [truth], ["a"])
    assert best == PostprocessParams(threshold=0.2, fill_holes=True) and value == 1.0
    assert max(t["mean_case_dice"] for t in trials[:-3]) == pytest.approx(70 / 71)


def _anomaly_val(lesion: bool) -> dict[str, list]:
    """Two 24x24 'images' (a bright square head on black), scores 0.1 inside the head, 0.8 on a
    4x4 lesion of the first image where ``lesion``."""
    images, scores, truths = [], [], []
    for k in range(2):
        img, s, t = np.zeros((24, 24)), np.zeros((24, 24)), np.zeros((24, 24), bool)
        img[4:20, 4:20], s[4:20, 4:20] = 1.0, 0.1 + 0.01 * np.arange(16)[None, :]
        if lesion and k == 0:
            s[8:12, 8:12], t[8:12, 8:12] = 0.8, True
        images.append(img), scores.append(s), truths.append(t)
    return {"scores": scores, "truths": truths, "images": images}


def test_anomaly_threshold_with_lesions_in_val_maximises_the_pooled_dice():
    post, calib = calibrate_anomaly(_anomaly_val(True), TrainConfig(task="anomaly"))
    assert calib["mode"] == "dice_on_val" and calib["val_dice"] == 1.0 and calib["n_images"] == 2
    assert 0.25 < post.threshold < 0.8 and post.min_size == 0
    assert calib["n_normal_images"] == 1


def test_anomaly_threshold_without_lesions_is_the_target_fpr_of_normal_foreground():
    cfg = TrainConfig(task="anomaly", anomaly=AnomalyConfig(target_fpr=0.25))
    post, calib = calibrate_anomaly(_anomaly_val(False), cfg)
    assert calib["mode"].startswith("target_fpr")
    assert post == PostprocessParams(threshold=calib["threshold_at_target_fpr"])
    assert 0 < calib["achieved_fpr"] <= 0.25 and calib["n_normal_images"] == 2


def test_each_label_gets_its_own_threshold_on_its_own_probability():
    """Label 1 (value 1) is separated at 0.4, label 2 (value 3) only at 0.7: each search sees its
    own probability map and its own truth (the label map compared with the label's value)."""
    scores = [np.array([[[0.1, 0.35, 0.65, 0.9], [0.0, 0.0, 0.0, 0.0]],
                        [[0.0, 0.0, 0.0, 0.0], [0.2, 0.65, 0.75, 0.8]]], np.float32)]  # (K=2, 2, 4)
    truths = [np.array([[0, 0, 1, 1], [0, 0, 3, 3]])]
    v = {"scores": scores, "truths": truths, "cases": ["a"], "images": [np.zeros((2, 4))]}
    posts, record = calibrate_labels(v, (Label(1, "edema"), Label(3, "necrosis")))
    assert [p.threshold for p in posts] == [0.4, 0.7]
    assert record["mean_case_dice"] == 1.0 and record["objective"] == "mean per-case Dice of each label"
    assert [(r["value"], r["name"], r["mean_case_dice"], r["trials"]) for r in record["labels"]] == [
        (1, "edema", 1.0, N_TRIALS), (3, "necrosis", 1.0, N_TRIALS)]
    assert record["labels"][1]["mean_case_dice_at_0.5"] == pytest.approx(0.8)  # tp 2, fp 1

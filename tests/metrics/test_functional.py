"""Tests of medanomaly.metrics.functional against small hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn import metrics as skm

from medanomaly.metrics import functional as M
from medanomaly.metrics.functional import Stats

# pred (4x4):    truth (4x4):
#  1 1 0 0        0 1 1 0
#  1 1 0 0        0 1 1 0
#  0 0 0 0        0 0 0 0
#  0 0 0 0        0 0 0 0
# tp = 2 ((0,1), (1,1)), fp = 2 ((0,0), (1,0)), fn = 2 ((0,2), (1,2)), tn = 16 - 6 = 10
PRED = np.zeros((4, 4), bool)
PRED[:2, :2] = True
TRUTH = np.zeros((4, 4), bool)
TRUTH[:2, 1:3] = True


def test_get_stats_hand_example() -> None:
    s = M.get_stats(PRED, TRUTH)
    assert s == Stats(tp=2, fp=2, fn=2, tn=10)
    assert M.dice(s) == pytest.approx(4 / 8)  # 2*2 / (2*2 + 2 + 2)
    assert M.f1(s) == M.dice(s)
    assert M.iou(s) == pytest.approx(2 / 6)
    assert M.sensitivity(s) == pytest.approx(2 / 4)
    assert M.precision(s) == pytest.approx(2 / 4)
    assert M.specificity(s) == pytest.approx(10 / 12)


def test_get_stats_accepts_01_ints_and_3d() -> None:
    s = M.get_stats(PRED.astype(np.uint8)[None], TRUTH.astype(np.float32)[None])
    assert s == Stats(2, 2, 2, 10)


def test_get_stats_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        M.get_stats(PRED, TRUTH[:3])
    with pytest.raises(ValueError, match="boolean"):
        M.get_stats(PRED * 0.7, TRUTH)


def test_both_empty() -> None:
    # tp = fp = fn = 0, tn = 16
    s = M.get_stats(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    assert s == Stats(0, 0, 0, 16)
    assert M.dice(s) == 1.0 and M.iou(s) == 1.0 and M.f1(s) == 1.0
    assert math.isnan(M.sensitivity(s)) and math.isnan(M.precision(s))
    assert M.specificity(s) == 1.0


def test_empty_truth_nonempty_prediction() -> None:
    pred = np.zeros((4, 4), bool)
    pred[0, :2] = True  # tp 0, fp 2, fn 0, tn 14
    s = M.get_stats(pred, np.zeros((4, 4), bool))
    assert s == Stats(0, 2, 0, 14)
    assert M.dice(s) == 0.0 and M.iou(s) == 0.0
    assert math.isnan(M.sensitivity(s))
    assert M.precision(s) == 0.0
    assert M.specificity(s) == pytest.approx(14 / 16)


def test_empty_prediction_nonempty_truth() -> None:
    truth = np.zeros((4, 4), bool)
    truth[3, 1:] = True  # tp 0, fp 0, fn 3, tn 13
    s = M.get_stats(np.zeros((4, 4), bool), truth)
    assert s == Stats(0, 0, 3, 13)
    assert M.dice(s) == 0.0 and M.sensitivity(s) == 0.0
    assert math.isnan(M.precision(s))
    assert M.specificity(s) == 1.0


def test_specificity_nan_without_negatives() -> None:
    full = np.ones((2, 2), bool)
    assert math.isnan(M.specificity(M.get_stats(full, full)))


def test_stats_addition_pools_counts() -> None:
    a, b = Stats(2, 2, 2, 10), Stats(0, 2, 0, 14)
    assert a + b == Stats(2, 4, 2, 24)
    assert sum([a, b]) == a + b
    assert M.dice(a + b) == pytest.approx(4 / 10)  # 2*2 / (4 + 4 + 2), not the mean 0.25


# scores 0.1 0.4 0.35 0.8, truth 0 0 1 1: positive/negative pairs ranked right:
# 0.35 > 0.1, 0.8 > 0.1, 0.8 > 0.4 (0.35 < 0.4) -> AUROC 3/4.
# Descending: 0.8 (P) prec 1 rec .5; 0.4 (N) prec .5 rec .5; 0.35 (P) prec 2/3 rec 1
# -> AP = 0.5*1 + 0 + 0.5*2/3 = 5/6.
SCORES4 = np.array([[0.1, 0.4], [0.35, 0.8]])
TRUTH4 = np.array([[0, 0], [1, 1]], bool)


def test_auroc_auprc_hand_example() -> None:
    assert M.auroc(SCORES4, TRUTH4) == pytest.approx(0.75)
    assert M.auprc(SCORES4, TRUTH4) == pytest.approx(5 / 6)


def test_perfect_ranking() -> None:
    scores = np.array([0.1, 0.2, 0.7, 0.9])
    truth = np.array([0, 0, 1, 1], bool)
    assert M.auroc(scores, truth) == 1.0
    assert M.auprc(scores, truth) == 1.0


def test_ranking_nan_cases() -> None:
    scores = np.array([0.1, 0.2, 0.7])
    assert math.isnan(M.auroc(scores, np.zeros(3, bool)))
    assert math.isnan(M.auroc(scores, np.ones(3, bool)))
    assert math.isnan(M.auprc(scores, np.zeros(3, bool)))
    with pytest.raises(ValueError, match="nan"):
        M.auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1], bool))


def test_curves_shapes() -> None:
    fpr, tpr, thr = M.roc_curve(SCORES4, TRUTH4)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr.shape == tpr.shape == thr.shape
    prec, rec, thr = M.pr_curve(SCORES4, TRUTH4)
    assert prec.shape == rec.shape == (thr.size + 1,)
    assert prec[-1] == 1 and rec[-1] == 0


@pytest.mark.parametrize("integer_scores", [True, False])
def test_histogram_path_matches_sklearn(monkeypatch: pytest.MonkeyPatch, integer_scores) -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((60, 50)) < 0.2
    scores = truth * 40 + rng.normal(100, 30, truth.shape)
    if integer_scores:  # 8-bit-like maps: binning is exact
        scores = np.clip(np.round(scores), 0, 255).astype(np.uint8)
    exact_roc = skm.roc_auc_score(truth.ravel(), scores.ravel())
    exact_ap = skm.average_precision_score(truth.ravel(), scores.ravel())
    monkeypatch.setattr(M, "EXACT_MAX_PIXELS", 100)
    tol = 1e-12 if integer_scores else 1e-3
    assert M.auroc(scores, truth) == pytest.approx(exact_roc, abs=tol)
    assert M.auprc(scores, truth) == pytest.approx(exact_ap, abs=tol)
    prec, rec, thr = M.pr_curve(scores, truth)
    assert prec.shape == rec.shape == (thr.size + 1,) and np.all(np.diff(thr) > 0)
    fpr, tpr, _ = M.roc_curve(scores, truth)
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0


# truth (6x6) has lesions A = rows 0-1 x cols 0-1 and B = rows 4-5 x cols 4-5.
# pred has 3 components: rows 1-2 x cols 1-2 (overlaps A at (1, 1)), (0, 4)-(0, 5), and (5, 0).
# -> n_true 2, n_pred 3, tp_true 1 (A), tp_pred 1.
def _lesions_2d() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((6, 6), bool)
    truth[0:2, 0:2] = True
    truth[4:6, 4:6] = True
    pred = np.zeros((6, 6), bool)
    pred[1:3, 1:3] = True
    pred[0, 4:6] = True
    pred[5, 0] = True
    return pred, truth


def test_lesion_stats_2d() -> None:
    pred, truth = _lesions_2d()
    ls = M.lesion_stats(pred, truth)
    assert ls == {"n_true": 2, "n_pred": 3, "tp_true": 1, "tp_pred": 1}
    lm = M.lesion_metrics(ls)
    assert lm["lesion_sensitivity"] == pytest.approx(0.5)
    assert lm["lesion_precision"] == pytest.approx(1 / 3)
    assert lm["lesion_f1"] == pytest.approx(0.4)  # 2 * (1/2 * 1/3) / (1/2 + 1/3)


def test_lesion_stats_3d_and_connectivity() -> None:
    pred2, truth2 = _lesions_2d()
    # Same pattern in slices 1-2 of a (4, 6, 6) volume: still 2 true and 3 predicted lesions.
    pred, truth = np.zeros((4, 6, 6), bool), np.zeros((4, 6, 6), bool)
    pred[1:3], truth[1:3] = pred2, truth2
    assert M.lesion_stats(pred, truth) == {"n_true": 2, "n_pred": 3, "tp_true": 1, "tp_pred": 1}
    # Two voxels touching only at a corner: one lesion with full connectivity, two with faces.
    diag = np.zeros((3, 3, 3), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert M.lesion_stats(diag, diag)["n_true"] == 1
    assert M.lesion_stats(diag, diag, connectivity=1) == {
        "n_true": 2, "n_pred": 2, "tp_true": 2, "tp_pred": 2
    }
    with pytest.raises(ValueError, match="connectivity"):
        M.lesion_stats(diag, diag, connectivity=4)


def test_lesion_metrics_empty_cases_and_pooling() -> None:
    none = {"n_true": 0, "n_pred": 0, "tp_true": 0, "tp_pred": 0}
    assert all(math.isnan(v) for v in M.lesion_metrics(none).values())
    false_only = M.lesion_metrics({"n_true": 0, "n_pred": 2, "tp_true": 0, "tp_pred": 0})
    assert math.isnan(false_only["lesion_sensitivity"])
    assert false_only["lesion_precision"] == 0.0 and false_only["lesion_f1"] == 0.0
    missed = M.lesion_metrics({"n_true": 2, "n_pred": 0, "tp_true": 0, "tp_pred": 0})
    assert missed["lesion_sensitivity"] == 0.0 and missed["lesion_f1"] == 0.0
    pooled = M.add_lesion_stats(M.lesion_stats(*_lesions_2d()), none)
    assert pooled == {"n_true": 2, "n_pred": 3, "tp_true": 1, "tp_pred": 1}
    with pytest.raises(ValueError, match="keys"):
        M.add_lesion_stats(pooled, {"n_true": 1})


def test_best_dice_threshold_toy() -> None:
    truth = np.zeros((4, 4), bool)
    truth[1:3, 1:3] = True
    scores = np.where(truth, 0.9, 0.1)
    thr, d = M.best_dice_threshold(scores, truth)
    assert d == 1.0 and 0.1 <= thr < 0.9


def test_best_dice_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random((40, 50)) < 0.1
    scores = truth * 0.8 + rng.normal(0, 0.5, truth.shape)
    thr, d = M.best_dice_threshold(scores, truth, n_thresholds=50)
    candidates = M.dice_threshold_candidates(scores, 50)
    brute = [M.dice(M.get_stats(scores > t, truth)) for t in candidates]
    assert d == pytest.approx(max(brute), abs=1e-6)
    assert M.dice(M.get_stats(scores > thr, truth)) == pytest.approx(d, abs=1e-12)


def test_threshold_at_fpr() -> None:
    rng = np.random.default_rng(2)
    normal = rng.normal(size=(200, 250))
    for target in (0.001, 0.01, 0.05, 0.2, 0.5):
        fpr = np.mean(normal > M.threshold_at_fpr(normal, target))
        assert target - 0.01 <= fpr <= target
    assert np.mean(normal > M.threshold_at_fpr(normal, 0.0)) == 0.0
    with pytest.raises(ValueError, match="target_fpr"):
        M.threshold_at_fpr(normal, 1.5)


def test_inputs_not_modified() -> None:
    pred, truth = _lesions_2d()
    scores = np.random.default_rng(3).random(truth.shape)
    for a in (pred, truth, scores):
        a.setflags(write=False)  # any in-place write raises
    copies = [pred.copy(), truth.copy(), scores.copy()]
    M.get_stats(pred, truth)
    M.lesion_stats(pred, truth)
    M.auroc(scores, truth)
    M.auprc(scores, truth)
    M.roc_curve(scores, truth)
    M.pr_curve(scores, truth)
    M.best_dice_threshold(scores, truth)
    M.threshold_at_fpr(scores, 0.1)
    for a, c in zip((pred, truth, scores), copies):
        np.testing.assert_array_equal(a, c)


@st.composite
def mask_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
    a = draw(hnp.arrays(bool, shape))
    b = draw(hnp.arrays(bool, shape))
    return a, b


@settings(max_examples=60, deadline=None)
@given(mask_pairs())
def test_dice_symmetric_bounded_and_self_one(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    d = M.dice(M.get_stats(a, b))
    assert 0.0 <= d <= 1.0
    assert d == M.dice(M.get_stats(b, a))
    assert M.dice(M.get_stats(a, a)) == 1.0
    s = M.get_stats(a, b)
    assert s.tp + s.fp + s.fn + s.tn == a.size


# Several labels, a 4x4 label map by hand:
# pred:       truth:
#  1 1 0 0     1 1 0 0      label 1: pred 3 px, truth 4 px: tp 3, fp 0, fn 1, tn 12
#  1 0 0 0     1 1 0 0      label 2: pred 4 px, truth 2 px: tp 2, fp 2, fn 0, tn 12
#  0 0 2 2     0 0 2 0      label 3: absent from both: tn 16
#  0 0 2 2     0 0 2 0
LABEL_PRED = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
LABEL_TRUTH = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 2, 0]])


def test_label_stats_hand_example() -> None:
    stats = M.label_stats(LABEL_PRED, LABEL_TRUTH, [1, 2, 3])
    assert stats == {1: Stats(3, 0, 1, 12), 2: Stats(2, 2, 0, 12), 3: Stats(0, 0, 0, 16)}
    assert M.dice(stats[1]) == pytest.approx(6 / 7) and M.dice(stats[2]) == pytest.approx(4 / 6)
    assert M.dice(stats[3]) == 1.0  # a label absent from both: a correct "nothing here"
    assert M.overlap_metrics(stats[2]) == pytest.approx(
        {"dice": 2 / 3, "iou": 2 / 4, "sensitivity": 1.0, "specificity": 12 / 14, "precision": 2 / 4})


def test_label_lesion_stats_hand_example() -> None:
    ls = M.label_lesion_stats(LABEL_PRED, LABEL_TRUTH, [1, 2])
    assert ls[1] == {"n_true": 1, "n_pred": 1, "tp_true": 1, "tp_pred": 1}
    assert ls[2] == {"n_true": 1, "n_pred": 1, "tp_true": 1, "tp_pred": 1}


def test_label_stats_of_one_label_are_the_binary_stats() -> None:
    rng = np.random.default_rng(0)
    pred, truth = rng.random((2, 9, 7)) > 0.6
    assert M.label_stats(pred, truth, [1]) == {1: M.get_stats(pred, truth)}
    assert M.label_lesion_stats(pred.astype(np.uint8), truth, [1]) == {1: M.lesion_stats(pred, truth)}


def test_label_maps_must_hold_non_negative_integers() -> None:
    with pytest.raises(ValueError, match="integer label values"):
        M.label_stats(LABEL_PRED * 0.5, LABEL_TRUTH, [1])
    with pytest.raises(ValueError, match="negative"):
        M.label_stats(-LABEL_PRED, LABEL_TRUTH, [1])
    with pytest.raises(ValueError, match="shape"):
        M.label_stats(LABEL_PRED, LABEL_TRUTH[:3], [1])
    assert M.as_label_map(np.array([0.0, 2.0])).dtype == np.int64


def test_mean_over_labels_leaves_nan_out() -> None:
    nan = float("nan")
    mean = M.mean_over_labels([{"dice": 1.0, "sensitivity": nan, "auroc": nan, "name": "a"},
                               {"dice": 0.5, "sensitivity": 0.25, "auroc": nan, "name": "b"}])
    assert mean["dice"] == 0.75 and mean["sensitivity"] == 0.25 and math.isnan(mean["auroc"])
    assert "name" not in mean and M.mean_over_labels([]) == {}

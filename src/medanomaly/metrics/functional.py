"""Segmentation and anomaly-detection metrics on numpy arrays.

Pixel-overlap metrics follow the pattern of segmentation_models_pytorch's
``metrics/functional.py`` and nnU-Net's ``compute_tp_fp_fn_tn``: :func:`get_stats` counts the
confusion matrix once, and every metric is a one-line function of those counts. Counts from
several cases can be pooled with ``+`` (``sum(stats_list, Stats(0, 0, 0, 0))``).

Conventions for empty cases (these are part of the API; the README quotes them):

* ``dice``, ``iou`` and ``f1`` are **1.0** when truth and prediction are both empty
  (``tp + fp + fn == 0``): a correct "nothing here". If only one of them is empty they are 0.0.
* ``sensitivity`` is **nan** when the truth has no positives (``tp + fn == 0``): undefined, and
  excluded from means computed with ``np.nanmean``.
* ``precision`` is **nan** when nothing is predicted positive (``tp + fp == 0``).
* ``specificity`` is **nan** when the truth has no negatives (``tn + fp == 0``).
* ``auroc`` is **nan** when the truth holds only one class; ``auprc`` is **nan** when the truth
  has no positives.
* Lesion-wise (connected-component) metrics: ``lesion_sensitivity`` is nan without true lesions,
  ``lesion_precision`` is nan without predicted lesions, ``lesion_f1`` is their harmonic mean,
  0.0 when exactly one side has no lesions and nan when both have none.

Ranking metrics (``auroc``, ``auprc``, ``roc_curve``, ``pr_curve``) pool all pixels. Up to
``EXACT_MAX_PIXELS`` pixels they use scikit-learn exactly. Above it they bin the scores into
``HIST_BINS`` equal-width bins between the minimum and maximum score and compute the curve from
per-bin counts in O(n): this is exact when the scores take at most ``HIST_BINS`` evenly spaced
values (8-bit or 16-bit maps) and otherwise only treats scores within one bin width as tied.

Masks are boolean arrays (0/1 integer or float arrays are accepted); scores are finite real
arrays of the same shape. Inputs are never modified.

Several labels: on integer label maps (0 = background), :func:`label_stats` and
:func:`label_lesion_stats` give, per label value ``l``, the binary counts of ``pred == l`` against
``truth == l``; every binary metric above then applies per label, and :func:`mean_over_labels`
averages them (NaN left out, as ``np.nanmean``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

logger = logging.getLogger(__name__)

EXACT_MAX_PIXELS = 2_000_000
HIST_BINS = 2**16
LESION_KEYS = ("n_true", "n_pred", "tp_true", "tp_pred")


@dataclass(frozen=True)
class Stats:
    """Confusion-matrix counts (pixels or voxels) of one case or of pooled cases."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: Stats) -> Stats:
        """Pool counts of two cases (micro-averaging)."""
        if not isinstance(other, Stats):
            return NotImplemented
        return Stats(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def __radd__(self, other: object) -> Stats:
        """Allow ``sum(list_of_stats)`` starting from the integer 0."""
        if other == 0:
            return self
        return NotImplemented


def as_bool_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a bool array; ValueError unless its values are all 0/1 (or bool)."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be boolean (or hold only 0 and 1); threshold scores first")
    return arr.astype(bool)


def _check_shapes(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} shape {a.shape} differs from {names[1]} shape {b.shape}")


def get_stats(pred: np.ndarray, truth: np.ndarray) -> Stats:
    """Count tp, fp, fn, tn of a predicted mask against the truth.

    ``pred`` and ``truth``: bool arrays of the same shape (any ndim). Counts are in pixels/voxels.
    """
    p, t = as_bool_mask(pred, "pred"), as_bool_mask(truth, "truth")
    _check_shapes(p, t, ("pred", "truth"))
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return Stats(tp=tp, fp=fp, fn=fn, tn=int(p.size) - tp - fp - fn)


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den > 0 else empty


def dice(s: Stats) -> float:
    """Dice = 2tp / (2tp + fp + fn); 1.0 when truth and prediction are both empty."""
    return _ratio(2 * s.tp, 2 * s.tp + s.fp + s.fn, 1.0)


def add_case(per_case: dict[str, Stats], case: str, s: Stats) -> None:
    """Pool ``s`` into ``per_case[case]`` (the slices of a case are counted as one image)."""
    per_case[case] = per_case[case] + s if case in per_case else s


def mean_case_dice(per_case: dict[str, Stats]) -> float:
    """Mean over cases of the Dice of each case's pooled counts (NaN without cases): the number
    users report as "mean per-patient Dice"."""
    return float(np.mean([dice(s) for s in per_case.values()])) if per_case else float("nan")


def iou(s: Stats) -> float:
    """Intersection over union (Jaccard) = tp / (tp + fp + fn); 1.0 when both are empty."""
    return _ratio(s.tp, s.tp + s.fp + s.fn, 1.0)


def sensitivity(s: Stats) -> float:
    """Sensitivity (recall) = tp / (tp + fn); nan when the truth has no positives."""
    return _ratio(s.tp, s.tp + s.fn, float("nan"))


def specificity(s: Stats) -> float:
    """Specificity = tn / (tn + fp); nan when the truth has no negatives."""
    return _ratio(s.tn, s.tn + s.fp, float("nan"))


def precision(s: Stats) -> float:
    """Precision = tp / (tp + fp); nan when nothing is predicted positive."""
    return _ratio(s.tp, s.tp + s.fp, float("nan"))


def f1(s: Stats) -> float:
    """F1 score; identical to :func:`dice` for binary masks."""
    return dice(s)


def _flat_scores_truth(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    t = as_bool_mask(truth, "truth")
    _check_shapes(s, t, ("scores", "truth"))
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be a real numeric array, got dtype {s.dtype}")
    s = s.ravel()
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain nan or inf")
    return s, t.ravel()


def _binned_curve(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) for thresholds = bin lower edges, descending. O(n) in pixels."""
    lo, hi = float(s.min()), float(s.max())
    width = (hi - lo) / HIST_BINS if hi > lo else 1.0
    idx = np.clip(((s - lo) / width).astype(np.int64), 0, HIST_BINS - 1)
    pos = np.bincount(idx[t], minlength=HIST_BINS)[::-1]
    neg = np.bincount(idx[~t], minlength=HIST_BINS)[::-1]
    keep = (pos + neg) > 0
    thresholds = (lo + width * np.arange(HIST_BINS)[::-1])[keep]
    return np.cumsum(pos)[keep], np.cumsum(neg)[keep], thresholds


def _big(s: np.ndarray) -> bool:
    if s.size > EXACT_MAX_PIXELS:
        logger.debug("%d pixels > %d: using %d-bin histogram", s.size, EXACT_MAX_PIXELS, HIST_BINS)
        return True
    return False


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-level ROC curve: (fpr, tpr, thresholds), predicting positive where score >= threshold.

    Arrays are 1-D, thresholds decreasing; for plotting. Needs both classes in ``truth``.
    """
    s, t = _flat_scores_truth(scores, truth)
    if not _big(s):
        fpr, tpr, thr = skm.roc_curve(t, s)
        return fpr, tpr, thr
    tp, fp, thr = _binned_curve(s, t)
    n_pos, n_neg = max(int(tp[-1]), 1), max(int(fp[-1]), 1)
    fpr = np.concatenate([[0.0], fp / n_neg])
    tpr = np.concatenate([[0.0], tp / n_pos])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def pr_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-level precision-recall curve: (precision, recall, thresholds), as scikit-learn's.

    ``precision`` and ``recall`` have one more entry than ``thresholds`` (the point (1, 0)).
    """
    s, t = _flat_scores_truth(scores, truth)
    if not _big(s):
        prec, rec, thr = skm.precision_recall_curve(t, s)
        return prec, rec, thr
    tp, fp, thr = _binned_curve(s, t)
    prec = tp / (tp + fp)
    rec = tp / tp[-1] if tp[-1] > 0 else np.zeros_like(prec)
    # scikit-learn order: increasing thresholds, then the final point (precision 1, recall 0).
    return np.append(prec[::-1], 1.0), np.append(rec[::-1], 0.0), thr[::-1]


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Pixel-level area under the ROC curve, all pixels pooled; nan if truth has one class."""
    s, t = _flat_scores_truth(scores, truth)
    n_pos = int(np.count_nonzero(t))
    if n_pos == 0 or n_pos == t.size:
        return float("nan")
    if not _big(s):
        return float(skm.roc_auc_score(t, s))
    fpr, tpr, _ = roc_curve(s, t)
    return float(np.trapezoid(tpr, fpr))


def auprc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Pixel-level average precision (area under the PR curve); nan if truth has no positives."""
    s, t = _flat_scores_truth(scores, truth)
    if not np.any(t):
        return float("nan")
    if not _big(s):
        return float(skm.average_precision_score(t, s))
    prec, rec, _ = pr_curve(s, t)
    # Same step-wise sum as sklearn.metrics.average_precision_score.
    return float(-np.sum(np.diff(rec) * prec[:-1]))


def _label(mask: np.ndarray, connectivity: int | None) -> tuple[np.ndarray, int]:
    conn = mask.ndim if connectivity is None else connectivity
    if not 1 <= conn <= max(mask.ndim, 1):
        raise ValueError(f"connectivity must be between 1 and {mask.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(mask.ndim, conn)
    labels, n = ndimage.label(mask, structure=structure)
    return labels, int(n)


def lesion_stats(pred: np.ndarray, truth: np.ndarray, connectivity: int | None = None) -> dict:
    """Count lesions (connected components) and which of them are detected.

    ``pred``, ``truth``: bool arrays of the same shape (2D or 3D). ``connectivity``: 1..ndim as in
    scikit-image (1 = faces only); None = ndim (full: 8-neighbours in 2D, 26 in 3D).
    Returns ``{"n_true", "n_pred", "tp_true", "tp_pred"}`` where ``tp_true`` counts true lesions
    overlapped by any predicted pixel and ``tp_pred`` predicted components overlapping any true one.
    """
    p, t = as_bool_mask(pred, "pred"), as_bool_mask(truth, "truth")
    _check_shapes(p, t, ("pred", "truth"))
    lab_t, n_true = _label(t, connectivity)
    lab_p, n_pred = _label(p, connectivity)
    both = p & t
    return {
        "n_true": n_true,
        "n_pred": n_pred,
        "tp_true": int(np.unique(lab_t[both]).size),
        "tp_pred": int(np.unique(lab_p[both]).size),
    }


def add_lesion_stats(a: dict, b: dict) -> dict:
    """Pool two :func:`lesion_stats` dicts key-wise."""
    if set(a) != set(LESION_KEYS) or set(b) != set(LESION_KEYS):
        raise ValueError(f"lesion stats must have exactly the keys {LESION_KEYS}")
    return {k: int(a[k]) + int(b[k]) for k in LESION_KEYS}


def lesion_metrics(ls: dict) -> dict:
    """Lesion-wise sensitivity, precision and F1 from (pooled) :func:`lesion_stats` counts.

    ``lesion_sensitivity`` = tp_true / n_true (nan if n_true == 0); ``lesion_precision`` =
    tp_pred / n_pred (nan if n_pred == 0); ``lesion_f1`` = harmonic mean of the two, 0.0 when only
    one side has lesions (all missed or all false), nan when neither has any.
    """
    nan = float("nan")
    sens = _ratio(ls["tp_true"], ls["n_true"], nan)
    prec = _ratio(ls["tp_pred"], ls["n_pred"], nan)
    if np.isnan(sens) and np.isnan(prec):
        f = nan
    elif np.isnan(sens) or np.isnan(prec):
        f = 0.0
    else:
        f = _ratio(2 * sens * prec, sens + prec, 0.0)
    return {"lesion_sensitivity": sens, "lesion_precision": prec, "lesion_f1": f}


def as_label_map(labels: np.ndarray, name: str = "label map") -> np.ndarray:
    """Return ``labels`` as an int64 array; ValueError unless its values are non-negative integers
    (bool and integer-valued float arrays are accepted: a 0/1 mask is a label map of label 1)."""
    arr = np.asarray(labels)
    exact = arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)
    if exact or (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        out = arr.astype(np.int64)
    else:
        raise ValueError(f"{name} must hold integer label values (0 = background), got dtype {arr.dtype}")
    if out.size and out.min() < 0:
        raise ValueError(f"{name} holds negative values; label values are 0 (background), 1, 2, ...")
    return out


def label_stats(pred: np.ndarray, truth: np.ndarray, values: Sequence[int]) -> dict[int, Stats]:
    """Per label value ``l``: :func:`get_stats` of ``pred == l`` against ``truth == l``.

    ``pred``, ``truth``: integer label maps of the same shape (any ndim; 0 = background).
    Values absent from both maps count as a correct "nothing here" (all tn).
    """
    p, t = as_label_map(pred, "pred"), as_label_map(truth, "truth")
    _check_shapes(p, t, ("pred", "truth"))
    return {int(v): get_stats(p == v, t == v) for v in values}


def label_lesion_stats(pred: np.ndarray, truth: np.ndarray, values: Sequence[int],
                       connectivity: int | None = None) -> dict[int, dict]:
    """Per label value ``l``: :func:`lesion_stats` of ``pred == l`` against ``truth == l``."""
    p, t = as_label_map(pred, "pred"), as_label_map(truth, "truth")
    _check_shapes(p, t, ("pred", "truth"))
    return {int(v): lesion_stats(p == v, t == v, connectivity) for v in values}


def overlap_metrics(s: Stats) -> dict[str, float]:
    """The one-line pixel metrics of one set of counts, keyed as summary.json names them."""
    return {"dice": dice(s), "iou": iou(s), "sensitivity": sensitivity(s), "specificity": specificity(s),
            "precision": precision(s)}


def mean_over_labels(per_label: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over labels of metric dicts (their common numeric keys), NaN entries left out
    (a label without true pixels has no sensitivity); NaN where every label's value is NaN."""
    if not per_label:
        return {}
    keys = [k for k, v in per_label[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(k in d for d in per_label)]
    out = {}
    for k in keys:
        vals = np.array([float(d[k]) for d in per_label], dtype=np.float64)
        out[k] = float(np.mean(vals[np.isfinite(vals)])) if np.isfinite(vals).any() else float("nan")
    return out


def dice_threshold_candidates(scores: np.ndarray, n_thresholds: int = 100) -> np.ndarray:
    """The thresholds :func:`best_dice_threshold` tries: ``n_thresholds`` evenly spaced values
    from the minimum to the maximum score (inclusive; at the maximum the prediction is empty)."""
    if n_thresholds < 1:
        raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}")
    s = np.asarray(scores)
    return np.linspace(float(s.min()), float(s.max()), n_thresholds)


def best_dice_threshold(
    scores: np.ndarray, truth: np.ndarray, n_thresholds: int = 100
) -> tuple[float, float]:
    """Threshold maximising the pooled Dice of ``scores > threshold`` against ``truth``.

    Tries :func:`dice_threshold_candidates`; one ``searchsorted`` and two cumulative sums give
    the counts at every threshold at once (about 1 s for 1e7 pixels). Returns
    ``(threshold, dice)``; on ties the lowest threshold wins. Dice follows :func:`dice`
    (1.0 when truth and prediction are both empty).
    """
    s, t = _flat_scores_truth(scores, truth)
    thr = dice_threshold_candidates(s, n_thresholds)
    # j = number of thresholds strictly below the score: the pixel is predicted for thr[:j].
    j = np.searchsorted(thr, s, side="left")
    hist_all = np.bincount(j, minlength=thr.size + 1)
    hist_pos = np.bincount(j[t], minlength=thr.size + 1)
    # counts at threshold k: pixels with j > k, i.e. reverse cumulative sums from index k + 1.
    n_pred = np.cumsum(hist_all[::-1])[::-1][1:]
    tp = np.cumsum(hist_pos[::-1])[::-1][1:]
    den = n_pred + int(np.count_nonzero(t))
    d = np.where(den > 0, 2.0 * tp / np.maximum(den, 1), 1.0)
    k = int(np.argmax(d))
    return float(thr[k]), float(d[k])


def threshold_at_fpr(scores_normal: np.ndarray, target_fpr: float) -> float:
    """Threshold t with at most ``target_fpr`` of normal pixels scoring strictly above t.

    ``scores_normal``: anomaly scores of normal (lesion-free) pixels, any shape.
    ``target_fpr``: fraction in [0, 1]. Uses ``np.quantile(..., method="higher")`` at
    ``1 - target_fpr``, so the achieved rate is <= target and within 1/n of it for
    continuous scores (ties can make it lower).
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    s = np.asarray(scores_normal, dtype=np.float64).ravel()
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("scores_normal must be non-empty and finite")
    return float(np.quantile(s, 1.0 - target_fpr, method="higher"))

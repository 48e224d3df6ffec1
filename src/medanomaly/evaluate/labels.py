"""Scoring several labels: which labels an evaluation scores, label maps checked against them, and
the per-label tallies behind summary.json's ``labels``, cases.csv's rows and report.html's per-label table.

Which labels: a multi-label model's own labels (its model file's ``labels``, :func:`model_labels`);
for ``evaluate --pred`` (:func:`evaluation_labels`), ``--labels 1=edema,2=enhancing`` as given, else the ``labels``
of DATA/dataset.json (:func:`medanomaly.data.discover.dataset_labels`). Labels from a model or
dataset.json are scored per label only when there are several (as training takes them); ``--labels``
always (one label included). Otherwise evaluation stays binary: any value > 0 is lesion.

Per label value ``l`` the binary metrics of ``pred == l`` against ``truth == l``
(:func:`medanomaly.metrics.functional.label_stats`), per case and pooled, and their mean over labels.
Every value of a truth or prediction map must be 0 or a listed label: an unlisted value is an error
naming the file, never silently background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.config.labels import Label, checked, parse_labels
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import dataset_labels
from medanomaly.io import Image
from medanomaly.io import read_label_map as read_values
from medanomaly.metrics import functional as M

#: the labels scored, ascending by value; value 0 is the background and never listed
Labels = tuple[Label, ...]
#: cases.csv's columns with several labels: one row per case and label
LABEL_CASE_FIELDS = ["case", "label", "value", "n_images", "dice", "iou", "sensitivity", "specificity", "precision",
                     "tp", "fp", "fn", "tn", "n_true_lesions", "n_pred_lesions"]
LABELS_NOTE = ("Summary cards score any label against background; the per-label table scores each label on its "
               "own (prediction == label against truth == label).")


def as_labels(records: Any, where: str) -> Labels:
    """Labels from :class:`Label` objects, ``{"value", "name"}`` records (a model file's ``labels``)
    or (value, name) pairs, checked (values 1..255, no value or name twice) and sorted by value."""
    found = [_label(r) for r in records]
    for r, lb in zip(records, found):
        if lb is None or not isinstance(lb.value, int) or isinstance(lb.value, bool) or not isinstance(lb.name, str):
            raise MedanomalyError(f"{where}: {r!r} is not a label; give each as value and name, e.g. 1=edema")
    return checked(found, where)


def _label(record: Any) -> Label | None:
    if isinstance(record, Label):
        return record
    if isinstance(record, Mapping):
        return Label(record.get("value"), record.get("name"))
    return Label(*record) if isinstance(record, (tuple, list)) and len(record) == 2 else None


def model_labels(records: Any) -> Labels | None:
    """The labels ``evaluate --model`` scores per label: a model file's ``labels`` when it has several
    (a binary model has none: None, whatever the data's dataset.json says)."""
    labels = as_labels(records, "the model file's labels") if records else ()
    return labels if len(labels) > 1 else None


def evaluation_labels(data: Path, given: str | Sequence[Any] | None) -> Labels | None:
    """The labels ``evaluate --pred`` scores per label (module docstring), or None for binary scoring.
    ``given``: ``--labels`` text or (value, name) pairs."""
    if given:
        return parse_labels(given) if isinstance(given, str) else as_labels(given, "labels")
    labels = dataset_labels(data) if Path(data).is_dir() else ()  # a CSV listing: --labels only
    return labels if len(labels) > 1 else None


def check_values(label_map: np.ndarray, labels: Labels, path: Path | str, what: str) -> None:
    """Every value of ``label_map`` must be 0 or one of ``labels``; else an error naming ``path``."""
    unknown = sorted(set(np.unique(label_map).tolist()) - {0} - {lb.value for lb in labels})
    if unknown:
        shown = ", ".join(f"{u:g}" for u in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        listed = ",".join(f"{lb.value}={lb.name}" for lb in labels)
        raise MedanomalyError(f"{what} {path} holds label value(s) {shown}, which are not among the labels scored "
                              f"({listed}); list every label (--labels, dataset.json) or fix the file")


def read_label_map(path: Path, like: Image, labels: Labels, what: str = "mask") -> np.ndarray:
    """The integer label map ((H, W) or (Z, Y, X), int32) stored in ``path``, on the grid of ``like``
    (:func:`medanomaly.io.read_label_map`), its values checked against ``labels`` (:func:`check_values`)."""
    values = read_values(path, like)
    check_values(values, labels, path, what)
    return values.astype(np.int32)


def split_scores(score: np.ndarray, labels: Labels, shape: tuple[int, ...]) -> tuple[np.ndarray, dict | None]:
    """A multi-label prediction's score maps as (the any-label score of ``shape``, {label value: its
    map}): ``score`` is (K, *shape), one probability map per label in label order (as
    :class:`medanomaly.infer.predictor.Prediction` holds them), and the any-label score their sum (1 - the
    background's softmax probability), at most 1. A ``score`` of ``shape`` has no per-label maps:
    (score, None), and AUROC/AUPRC per label are left out."""
    arr = np.asarray(score)
    if arr.shape != (len(labels), *shape):
        return arr, None
    return np.minimum(arr.sum(axis=0), 1.0).astype(np.float32), {lb.value: arr[k] for k, lb in enumerate(labels)}


@dataclass
class LabelTally:
    """Running per-label totals over the evaluated images (one image at a time): counts and lesion
    counts per label and case, and per-label scores (for AUROC/AUPRC) where a model gives them."""

    labels: Labels
    per_case: dict[int, dict[str, M.Stats]] = field(default_factory=dict)
    lesions: dict[int, dict[str, dict]] = field(default_factory=dict)
    scores: dict[int, list[np.ndarray]] = field(default_factory=dict)
    truths: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def add(self, case: str, pred: np.ndarray, truth: np.ndarray, scores: dict[int, np.ndarray] | None) -> None:
        """Tally one image: ``pred``, ``truth`` integer label maps of one shape; ``scores`` per label value."""
        values = [lb.value for lb in self.labels]
        for v, s in M.label_stats(pred, truth, values).items():
            M.add_case(self.per_case.setdefault(v, {}), case, s)
        for v, ls in M.label_lesion_stats(pred, truth, values).items():
            done = self.lesions.setdefault(v, {})
            done[case] = M.add_lesion_stats(done[case], ls) if case in done else ls
        for v in values if scores is not None else ():
            self.scores.setdefault(v, []).append(np.asarray(scores[v], np.float32).ravel())
            self.truths.setdefault(v, []).append((np.asarray(truth) == v).ravel())

    def label_entry(self, value: int) -> dict:
        """summary.json's entry of one label: pooled metrics, per-case means, lesion-wise detection."""
        cases = self.per_case.get(value, {})
        pooled = sum(cases.values(), M.Stats(0, 0, 0, 0))
        lesions = {k: 0 for k in M.LESION_KEYS}
        for ls in self.lesions.get(value, {}).values():
            lesions = M.add_lesion_stats(lesions, ls)
        case_dice = [M.dice(s) for s in cases.values()]
        entry = {"value": value, **M.overlap_metrics(pooled), "dice_per_case_mean": M.mean_case_dice(cases),
                 "dice_per_case_std": float(np.std(case_dice)) if case_dice else float("nan"),
                 "per_case_mean": M.mean_over_labels([M.overlap_metrics(s) for s in cases.values()]),
                 **M.lesion_metrics(lesions), "lesions": lesions}
        if self.scores.get(value):
            s, t = np.concatenate(self.scores[value]), np.concatenate(self.truths[value])
            entry["auroc"], entry["auprc"] = M.auroc(s, t), M.auprc(s, t)
        return entry

    def summary(self) -> dict:
        """summary.json's ``labels`` (name -> :meth:`label_entry`) and ``labels_mean`` (the mean over
        labels of every per-label number, NaN left out)."""
        per = {lb.name: self.label_entry(lb.value) for lb in self.labels}
        flat = [{k: x for k, x in e.items() if k not in ("value", "lesions", "per_case_mean")} for e in per.values()]
        return {"labels": per, "labels_mean": M.mean_over_labels(flat)}

    def rows(self, n_images: dict[str, int]) -> list[dict]:
        """cases.csv's rows (:data:`LABEL_CASE_FIELDS`): one per case and label, cases in order of first sight."""
        rows = []
        for case, n in n_images.items():
            for lb in self.labels:
                s, ls = self.per_case[lb.value][case], self.lesions[lb.value][case]
                rows.append({"case": case, "label": lb.name, "value": lb.value, "n_images": n,
                             **M.overlap_metrics(s), "tp": s.tp, "fp": s.fp, "fn": s.fn, "tn": s.tn,
                             "n_true_lesions": ls["n_true"], "n_pred_lesions": ls["n_pred"]})
        return rows


def label_table(summary: dict) -> list[dict]:
    """report.html's per-label rows from a summary with ``labels``, the mean over labels last."""
    keys = ("dice", "dice_per_case_mean", "iou", "sensitivity", "precision", "lesion_f1", "auroc", "auprc")
    rows = [{"label": name, "value": e["value"], **{k: e[k] for k in keys if k in e}}
            for name, e in summary.get("labels", {}).items()]
    mean = summary.get("labels_mean") or {}
    if rows:
        rows.append({"label": "mean over labels", "value": "", **{k: mean[k] for k in keys if k in rows[0]}})
    return rows

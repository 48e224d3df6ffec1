"""medanomaly.evaluate.labels: which labels an evaluation scores (a model's, --labels, dataset.json),
label maps checked against them, and the per-label tallies (summary entries, case rows, report rows)
on a hand-made 4x4 label map whose numbers are checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medanomaly.config.labels import Label
from medanomaly.core.errors import MedanomalyError
from medanomaly.evaluate.labels import (
    LabelTally,
    as_labels,
    check_values,
    evaluation_labels,
    label_table,
    model_labels,
    split_scores,
)

TWO = (Label(1, "edema"), Label(2, "enhancing"))
# pred:       truth:
#  1 1 0 0     1 1 0 0      edema: tp 3, fp 0, fn 1, tn 12 (Dice 6/7)
#  1 0 0 0     1 1 0 0      enhancing: tp 2, fp 2, fn 0, tn 12 (Dice 2/3)
#  0 0 2 2     0 0 2 0
#  0 0 2 2     0 0 2 0
PRED = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
TRUTH = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 2, 0]])


def _dataset_json(folder: Path, labels: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder


def test_a_models_labels_when_it_has_several(tmp_path: Path) -> None:
    records = [{"value": 2, "name": "enhancing", "postprocess": {}}, {"value": 1, "name": "edema", "postprocess": {}}]
    assert model_labels(records) == TWO  # sorted by value
    assert model_labels(TWO) == TWO  # Label objects, as the model file holds them
    assert model_labels([{"value": 1, "name": "lesion"}]) is None  # one label: binary
    assert model_labels(()) is None and model_labels(None) is None


def test_given_labels_are_scored_per_label_even_one(tmp_path: Path) -> None:
    assert evaluation_labels(tmp_path, "2=enhancing, 1=edema") == TWO
    assert evaluation_labels(tmp_path, "2=enhancing") == (Label(2, "enhancing"),)
    assert evaluation_labels(tmp_path, [(1, "edema"), (2, "enhancing")]) == TWO
    with pytest.raises(MedanomalyError, match="given twice"):
        evaluation_labels(tmp_path, "1=a,1=b")
    with pytest.raises(MedanomalyError, match="not a label"):
        as_labels([("1", "a")], "labels")


def test_dataset_json_labels_when_it_names_several(tmp_path: Path) -> None:
    v2 = _dataset_json(tmp_path / "v2", {"background": 0, "edema": 1, "enhancing": 2})
    v1 = _dataset_json(tmp_path / "v1", {"0": "background", "1": "edema", "2": "enhancing"})
    one = _dataset_json(tmp_path / "one", {"background": 0, "lesion": 1})
    assert evaluation_labels(v2, None) == evaluation_labels(v1, None) == TWO
    assert evaluation_labels(one, None) is None  # one label: binary, as today
    assert evaluation_labels(tmp_path, None) is None  # no dataset.json
    assert evaluation_labels(v2, "3=necrosis") == (Label(3, "necrosis"),)  # --labels wins


def test_unlisted_values_are_an_error_naming_the_file() -> None:
    check_values(TRUTH, TWO, "t.png", "mask")
    with pytest.raises(MedanomalyError, match=r"prediction p\.png holds label value\(s\) 3, 7, which are not among "
                                              r"the labels scored \(1=edema,2=enhancing\)"):
        check_values(np.array([0, 3, 7, 1]), TWO, "p.png", "prediction")


def test_tally_by_hand() -> None:
    tally = LabelTally(TWO)
    tally.add("a", PRED, TRUTH, None)
    tally.add("b", np.zeros((4, 4), int), TRUTH, None)  # nothing predicted: Dice 0 for both labels
    summary = tally.summary()
    edema, enh = summary["labels"]["edema"], summary["labels"]["enhancing"]
    assert (edema["value"], enh["value"]) == (1, 2)
    # pooled over a and b: edema tp 3, fn 1 + 4; enhancing tp 2, fp 2, fn 2
    assert edema["dice"] == pytest.approx(6 / 11) and enh["dice"] == pytest.approx(4 / 8)
    assert edema["dice_per_case_mean"] == pytest.approx((6 / 7 + 0) / 2)
    assert enh["dice_per_case_mean"] == pytest.approx((2 / 3 + 0) / 2)
    assert enh["per_case_mean"]["precision"] == pytest.approx(0.5)  # b predicts nothing: NaN, left out
    assert edema["lesions"] == {"n_true": 2, "n_pred": 1, "tp_true": 1, "tp_pred": 1}
    assert "auroc" not in edema  # no score maps
    mean = summary["labels_mean"]
    assert mean["dice"] == pytest.approx((6 / 11 + 1 / 2) / 2)
    assert mean["dice_per_case_mean"] == pytest.approx((3 / 7 + 1 / 3) / 2)
    assert "value" not in mean and "lesions" not in mean


def test_rows_one_per_case_and_label() -> None:
    tally = LabelTally(TWO)
    tally.add("a", PRED, TRUTH, None)
    rows = tally.rows({"a": 1})
    assert [(r["case"], r["label"], r["value"]) for r in rows] == [("a", "edema", 1), ("a", "enhancing", 2)]
    assert (rows[0]["tp"], rows[0]["fn"], rows[1]["fp"]) == (3, 1, 2)
    assert rows[1]["dice"] == pytest.approx(2 / 3)


def test_per_label_auroc_from_score_maps() -> None:
    tally = LabelTally(TWO)
    scores = {1: (TRUTH == 1).astype(np.float32), 2: (TRUTH == 2) * 0.5 + 0.1}
    tally.add("a", PRED, TRUTH, scores)
    labels = tally.summary()["labels"]
    assert labels["edema"]["auroc"] == 1.0 and labels["enhancing"]["auprc"] == 1.0


def test_split_scores_of_a_prediction() -> None:
    maps = np.stack([np.full((4, 4), 0.25, np.float32), np.full((4, 4), 0.5, np.float32)])  # edema, enhancing
    fg, per = split_scores(maps, TWO, (4, 4))
    assert fg.shape == (4, 4) and fg[0, 0] == 0.75 and per[1][0, 0] == 0.25 and per[2][0, 0] == 0.5
    assert split_scores(maps * 3, TWO, (4, 4))[0][0, 0] == 1.0  # at most 1
    binary, none = split_scores(maps[0], TWO, (4, 4))  # one map: no per-label scores
    assert none is None and binary is not None and binary.shape == (4, 4)


def test_label_table_ends_with_the_mean() -> None:
    tally = LabelTally(TWO)
    tally.add("a", PRED, TRUTH, None)
    rows = label_table(tally.summary())
    assert [r["label"] for r in rows] == ["edema", "enhancing", "mean over labels"]
    assert rows[-1]["dice"] == pytest.approx((6 / 7 + 2 / 3) / 2) and "auroc" not in rows[0]
    assert label_table({"dice": 1.0}) == [] and math.isfinite(rows[0]["dice"])

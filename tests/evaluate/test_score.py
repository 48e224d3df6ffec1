"""Scoring (medanomaly.evaluate.score) on hand-made masks whose numbers are checked by hand: the
Accumulator's per-case pooling, case rows, the summary (pooled, per-case and lesion-wise numbers,
AUROC), the curves, ``evaluate_predictions`` on a tiny folder of predictions (medanomaly's and
nnU-Net's names, a CSV listing as the data), and ``evaluate_model`` on its own and on external data;
with several labels, per-label numbers on the two-label phantoms (``multilabel_phantoms``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image as PILImage

from medanomaly.config.labels import Label
from medanomaly.config.model_file import TrainingSummary, build_model_file, write_model_file
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import PostprocessParams, UNetConfig
from medanomaly.core.errors import MedanomalyError
from medanomaly.evaluate.labels import LABEL_CASE_FIELDS
from medanomaly.evaluate.score import (
    CASE_FIELDS,
    EXTERNAL_SPLIT,
    Accumulator,
    _predict_and_score,
    case_rows,
    curves,
    evaluate_model,
    evaluate_predictions,
    select,
    summarize,
)
from medanomaly.infer.run import predict_paths
from medanomaly.metrics import functional as M
from medanomaly.models.unet import UNet


def _mask(*boxes: tuple[slice, slice], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    m = np.zeros(shape, bool)
    for box in boxes:
        m[box] = True
    return m


@pytest.fixture
def three_cases() -> Accumulator:
    """Case a: two 4x4 slices, a 2x2 lesion predicted as 2x3 (tp 4, fp 2), then both empty (tn 16);
    case b: a 2x2 lesion missed (fn 4); case c: no lesion, one false pixel (fp 1). Scores = truth."""
    acc = Accumulator()
    rows = [("a", _mask(np.s_[0:2, 0:3]), _mask(np.s_[0:2, 0:2])), ("a", _mask(), _mask()),
            ("b", _mask(), _mask(np.s_[2:4, 2:4])), ("c", _mask(np.s_[3:4, 0:1]), _mask())]
    for case, pred, truth in rows:
        acc.add(case, pred, truth, truth.astype(np.float32))
    return acc


def test_slices_of_a_case_are_pooled(three_cases: Accumulator) -> None:
    assert three_cases.per_case == {"a": M.Stats(4, 2, 0, 26), "b": M.Stats(0, 0, 4, 12), "c": M.Stats(0, 1, 0, 15)}
    assert three_cases.n_images == {"a": 2, "b": 1, "c": 1}
    assert three_cases.lesions_case["a"] == {"n_true": 1, "n_pred": 1, "tp_true": 1, "tp_pred": 1}


def test_case_rows(three_cases: Accumulator) -> None:
    rows = {r["case"]: r for r in case_rows(three_cases)}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["dice"], a["iou"], a["sensitivity"], a["precision"]) == pytest.approx((0.8, 4 / 6, 1.0, 4 / 6))
    assert a["specificity"] == pytest.approx(26 / 28) and a["n_images"] == 2
    assert b["dice"] == 0 and b["sensitivity"] == 0 and math.isnan(b["precision"]) and b["fn"] == 4
    assert c["dice"] == 0 and math.isnan(c["sensitivity"])  # empty truth, one predicted pixel: Dice 0
    assert (c["n_true_lesions"], c["n_pred_lesions"]) == (0, 1)


def test_summary_numbers(three_cases: Accumulator) -> None:
    s = summarize(three_cases)  # pooled: tp 4, fp 3, fn 4, tn 53
    assert (s["n_cases"], s["n_images"]) == (3, 4)
    assert s["dice"] == pytest.approx(8 / 15) and s["f1"] == s["dice"] and s["iou"] == pytest.approx(4 / 11)
    assert s["sensitivity"] == 0.5 and s["precision"] == pytest.approx(4 / 7)
    assert s["specificity"] == pytest.approx(53 / 56)
    assert s["dice_per_case_mean"] == pytest.approx(0.8 / 3) and s["dice_per_case_median"] == 0
    assert s["dice_per_case_std"] == pytest.approx(np.std([0.8, 0, 0]))
    assert s["lesions"] == {"n_true": 2, "n_pred": 2, "tp_true": 1, "tp_pred": 1}
    assert s["lesion_sensitivity"] == s["lesion_precision"] == s["lesion_f1"] == 0.5
    assert s["auroc"] == 1.0 and s["auprc"] == 1.0  # the scores are the truth itself
    assert "image_auroc" not in s  # no image-level detection was added


def test_curves_and_pooled_scores(three_cases: Accumulator) -> None:
    c = curves(three_cases)
    assert c["roc"]["fpr"][0] == 0 and c["roc"]["fpr"][-1] == 1 and c["roc"]["tpr"][-1] == 1
    assert max(c["pr"]["precision"]) == 1.0
    scores, truths = three_cases.pooled()
    assert scores.shape == truths.shape == (64,) and len(three_cases.scores) == 1 and truths.sum() == 8
    assert curves(Accumulator()) == {}
    only_negatives = Accumulator()
    only_negatives.add("x", _mask(), _mask(), np.zeros((4, 4)))
    assert curves(only_negatives) == {}  # no curve without both classes


def test_nothing_to_evaluate_is_an_error() -> None:
    with pytest.raises(MedanomalyError, match="nothing to evaluate"):
        summarize(Accumulator())


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("xyz"), hnp.arrays(bool, (3, 5)), hnp.arrays(bool, (3, 5))),
                min_size=1, max_size=6))
def test_pooling_is_additive(images: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """A case's counts are those of its slices stacked into one image, and the pooled Dice is the
    Dice of everything stacked, whatever the order in which the slices come."""
    acc = Accumulator()
    for case, pred, truth in images:
        acc.add(case, pred, truth, None)
    for case in acc.per_case:
        mine = [(p, t) for c, p, t in images if c == case]
        assert acc.per_case[case] == M.get_stats(np.stack([p for p, _ in mine]), np.stack([t for _, t in mine]))
    everything = M.get_stats(np.stack([p for _, p, _ in images]), np.stack([t for _, _, t in images]))
    assert summarize(acc)["dice"] == M.dice(everything)


# --- evaluate_predictions on a tiny folder ---------------------------------------------------------

def _write_predictions(preds: Path) -> None:
    """case0 predicted exactly, case1 empty, case2 not at all, case3 the left half of each lesion
    (the labelled phantoms: an 8x8 lesion at [8:16, 8:16] of every 32x32 slice)."""
    for k in range(3):
        for case, box in (("case0", np.s_[8:16, 8:16]), ("case1", None), ("case3", np.s_[8:16, 8:12])):
            m = np.zeros((32, 32), np.uint8)
            if box is not None:
                m[box] = 255
            (preds / case).mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(m).save(preds / case / f"{case}_{k}_pred.png")


def test_evaluate_predictions_on_a_tiny_folder(tmp_path: Path, labelled_phantoms) -> None:
    data = labelled_phantoms(tmp_path / "data")
    _write_predictions(tmp_path / "preds")
    s = evaluate_predictions(tmp_path / "preds", data, tmp_path / "eval", progress=False)
    # pooled over 9 slices: tp 3*64 + 3*32, fn 3*64 + 3*32, no false positive
    assert (s["n_cases"], s["n_images"], s["n_missing_predictions"], s["split"]) == (3, 9, 3, "all")
    assert s["dice"] == pytest.approx(2 / 3) and s["precision"] == 1.0 and s["sensitivity"] == 0.5
    assert s["dice_per_case_mean"] == pytest.approx((1 + 0 + 2 / 3) / 3) and math.isnan(s["auroc"])  # no score files
    with open(tmp_path / "eval" / "cases.csv") as fh:
        dice = {r["case"]: float(r["dice"]) for r in csv.DictReader(fh)}
    assert dice == pytest.approx({"case0": 1.0, "case1": 0.0, "case3": 2 / 3})
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n_images"] == 9
    assert (tmp_path / "eval" / "report.html").is_file()


def test_evaluate_predictions_of_one_split(tmp_path: Path, labelled_phantoms) -> None:
    data = labelled_phantoms(tmp_path / "data")  # splits.json: test = [case3]
    _write_predictions(tmp_path / "preds")
    s = evaluate_predictions(tmp_path / "preds", data, tmp_path / "eval", split="test",
                             splits_file=data / "splits.json", progress=False)
    assert (s["n_cases"], s["n_images"], s["n_missing_predictions"]) == (1, 3, 0)
    assert s["dice"] == pytest.approx(2 / 3) and s["split"] == "test"


def test_predictions_named_as_nnunet_names_them_score_as_ours(tmp_path: Path, labelled_phantoms, make_model_dir):
    data = labelled_phantoms(tmp_path / "data")
    model = make_model_dir(tmp_path / "m")
    predict_paths(model, [data], tmp_path / "ours", progress=False)
    predict_paths(model, [data], tmp_path / "nn", progress=False, naming="nnunet")
    flat = tmp_path / "flat"  # as nnU-Net writes them: one folder, CASE.png
    flat.mkdir()
    for p in (tmp_path / "nn").rglob("*.png"):
        p.rename(flat / p.name)
    ours = evaluate_predictions(tmp_path / "ours", data, tmp_path / "e1", progress=False)
    theirs = evaluate_predictions(flat, data, tmp_path / "e2", progress=False)
    assert (ours["n_images"], ours["n_missing_predictions"]) == (theirs["n_images"], 0) == (12, 0)
    assert theirs["dice"] == ours["dice"] and math.isnan(theirs["auroc"]) and not math.isnan(ours["auroc"])


def test_a_csv_listing_with_a_split_column_is_the_data(tmp_path: Path, labelled_phantoms) -> None:
    data = labelled_phantoms(tmp_path / "data")
    _write_predictions(tmp_path / "preds")
    rows = [f"case{c}/case{c}_{k}.png,case{c}/case{c}_{k}_mask.png,case{c},{'test' if c == 3 else 'train'}"
            for c in range(4) for k in range(3)]
    (data / "list.csv").write_text("image,mask,case,split\n" + "\n".join(rows) + "\n")
    s = evaluate_predictions(tmp_path / "preds", data / "list.csv", tmp_path / "eval", split="test", progress=False)
    assert (s["n_cases"], s["n_images"], s["split"]) == (1, 3, "test") and s["dice"] == pytest.approx(2 / 3)


def test_evaluate_model_on_data_outside_its_split_scores_every_case(tmp_path: Path, labelled_phantoms,
                                                                    make_model_dir) -> None:
    data = labelled_phantoms(tmp_path / "data")  # cases case0..case3; its splits.json: test = [case3]
    model = make_model_dir(tmp_path / "m")
    (model / "splits.json").write_text(json.dumps({"train": ["p1", "p2"], "val": ["p3"], "test": ["p4"]}))
    s = evaluate_model(model, data, tmp_path / "external", progress=False)
    assert (s["split"], s["n_cases"]) == (EXTERNAL_SPLIT, 4)
    assert json.loads((tmp_path / "external" / "summary.json").read_text())["split"] == EXTERNAL_SPLIT
    (model / "splits.json").write_text((data / "splits.json").read_text())  # the training data: its test split
    s = evaluate_model(model, data, tmp_path / "own", progress=False)
    assert (s["split"], s["n_cases"]) == ("test", 1)


def _label_predictions(data: Path, preds: Path) -> None:
    """Label-map predictions of the two-label phantoms (4 cases x 3 slices, 8x8 squares of edema = 1 and
    enhancing = 2): edema exact everywhere; enhancing: its top half (32 of 64 pixels) in case0-case2,
    predicted as edema in case3."""
    for c in range(4):
        for k in range(3):
            truth = np.asarray(PILImage.open(data / f"case{c}" / f"case{c}_{k}_mask.png"))
            pred = truth.copy()
            bottom = np.zeros(truth.shape, bool)
            bottom[np.nonzero((truth == 2).any(axis=1))[0][4]:] = True  # below the 4th row of enhancing
            if c < 3:
                pred[(truth == 2) & bottom] = 0
            else:
                pred[truth == 2] = 1
            (preds / f"case{c}").mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(pred).save(preds / f"case{c}" / f"case{c}_{k}_pred.png")


def test_evaluate_predictions_per_label(tmp_path: Path, multilabel_phantoms) -> None:
    data = multilabel_phantoms(tmp_path / "data")  # dataset.json: edema 1, enhancing 2
    _label_predictions(data, tmp_path / "preds")
    s = evaluate_predictions(tmp_path / "preds", data, tmp_path / "eval", progress=False)
    edema, enh = s["labels"]["edema"], s["labels"]["enhancing"]
    # edema: tp 12 x 64, fp 3 x 64 (case3's enhancing); enhancing: tp 9 x 32, fn 9 x 32 + 3 x 64
    assert edema["dice"] == pytest.approx(8 / 9) and edema["dice_per_case_mean"] == pytest.approx((3 + 2 / 3) / 4)
    assert enh["dice"] == pytest.approx(6 / 11) and enh["dice_per_case_mean"] == pytest.approx(0.5)
    assert edema["lesion_precision"] == pytest.approx(12 / 15) and enh["lesion_sensitivity"] == pytest.approx(9 / 12)
    assert s["labels_mean"]["dice"] == pytest.approx((8 / 9 + 6 / 11) / 2)
    assert s["labels_mean"]["dice_per_case_mean"] == pytest.approx((11 / 12 + 1 / 2) / 2)
    assert s["dice"] == pytest.approx(26 / 29)  # any label against background: 1248 tp, 288 fn
    assert "auroc" not in edema  # no per-label score maps
    on_disk = json.loads((tmp_path / "eval" / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert on_disk["labels"]["enhancing"]["dice"] == pytest.approx(6 / 11)
    with open(tmp_path / "eval" / "cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == LABEL_CASE_FIELDS
    assert [(r["case"], r["label"], r["value"]) for r in rows[:2]] == [("case0", "edema", "1"), ("case0", "enhancing", "2")]
    assert len(rows) == 8 and float(rows[-1]["dice"]) == 0.0 and float(rows[-2]["dice"]) == pytest.approx(2 / 3)
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "<h2>Per label</h2>" in page and "mean over labels" in page and "enhancing" in page


def test_labels_given_or_none(tmp_path: Path, multilabel_phantoms) -> None:
    data = multilabel_phantoms(tmp_path / "data", dataset_json=False)
    _label_predictions(data, tmp_path / "preds")
    given = evaluate_predictions(tmp_path / "preds", data, tmp_path / "given", progress=False,
                                 labels="1=edema,2=enhancing")
    binary = evaluate_predictions(tmp_path / "preds", data, tmp_path / "binary", progress=False)
    assert given["labels"]["enhancing"]["dice"] == pytest.approx(6 / 11)
    assert "labels" not in binary and binary["dice"] == given["dice"]  # without labels: any value > 0 is lesion
    with open(tmp_path / "binary" / "cases.csv") as fh:
        assert next(csv.reader(fh)) == CASE_FIELDS


def test_one_label_in_dataset_json_keeps_the_binary_summary(tmp_path: Path, labelled_phantoms) -> None:
    data = labelled_phantoms(tmp_path / "data")
    _write_predictions(tmp_path / "preds")
    before = evaluate_predictions(tmp_path / "preds", data, tmp_path / "e1", progress=False)
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    after = evaluate_predictions(tmp_path / "preds", data, tmp_path / "e2", progress=False)
    assert json.dumps(before, sort_keys=True) == json.dumps(after, sort_keys=True)
    assert (tmp_path / "e1" / "cases.csv").read_text() == (tmp_path / "e2" / "cases.csv").read_text()


def test_a_multilabel_models_predictions_are_scored_per_label(tmp_path: Path, multilabel_phantoms) -> None:
    """What evaluate --model does with a two-label model: a stand-in predictor marks the bright squares
    edema and the dim ones enhancing, with one probability map per label (AUROC per label)."""
    data = multilabel_phantoms(tmp_path / "data")

    def predict(img):
        a = img.array[0] / img.array[0].max()  # squares: 1 (edema) and 120/220 (enhancing); background < 0.3
        maps = np.stack([a > 0.8, (a > 0.4) & (a <= 0.8)]).astype(np.float32)
        return SimpleNamespace(mask=np.where(a > 0.8, 1, np.where(a > 0.4, 2, 0)), score=maps)  # (K, H, W)

    predictor = SimpleNamespace(predict=predict, anomaly=None, dim=2)
    labels = (Label(1, "edema"), Label(2, "enhancing"))
    s = summarize(_predict_and_score(predictor, select(data, None, None), data, None, False, labels))
    for name in ("edema", "enhancing"):
        assert s["labels"][name]["dice"] == 1.0 and s["labels"][name]["auroc"] == 1.0
    assert s["labels_mean"]["auroc"] == 1.0 and s["auroc"] == 1.0


def test_evaluate_model_of_several_labels(tmp_path: Path, multilabel_phantoms) -> None:
    """A two-label model (random weights, softmax over background + 2) on its test split: per-label
    numbers with AUROC from its probability maps, each label's post-processing, rows per case and label."""
    data = multilabel_phantoms(tmp_path / "data")  # splits.json: test = [case3]
    cfg = TrainConfig(size=32, model=UNetConfig(width=4, depth=2), precision="fp32", labels="1=edema,2=enhancing")
    model_file = build_model_file(cfg, 1, PostprocessParams(), TrainingSummary(), {})
    write_model_file(model_file, tmp_path / "m")
    torch.manual_seed(0)
    torch.save(UNet(model_file.model).state_dict(), tmp_path / "m" / "model.pt")
    s = evaluate_model(tmp_path / "m", data, tmp_path / "eval", progress=False)
    assert (s["split"], s["n_cases"], list(s["labels"])) == ("test", 1, ["edema", "enhancing"])
    for entry in s["labels"].values():
        assert 0.0 <= entry["auroc"] <= 1.0 and 0.0 <= entry["dice"] <= 1.0
    assert list(s["label_postprocess"]) == ["edema", "enhancing"]
    with open(tmp_path / "eval" / "cases.csv") as fh:
        assert [(r["case"], r["label"]) for r in csv.DictReader(fh)] == [("case3", "edema"), ("case3", "enhancing")]

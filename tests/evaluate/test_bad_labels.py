"""Bad ``evaluate`` inputs with several labels, through the CLI: a --labels value that is not a label
list, a label given twice, --labels for a model, masks or predictions holding a value that is not a
listed label (binary 0/255 masks scored as label 1 included), and nnU-Net's region-based labels in
dataset.json. Each refused with exit 2, a message naming the flag, label or file, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image as PILImage


def _predictions(data: Path, preds: Path, change: dict[int, int] | None = None) -> Path:
    """A ``*_pred.png`` label map per mask of ``data`` (its truth, values mapped by ``change``)."""
    for mask in sorted(data.rglob("*_mask.png")):
        pred = np.asarray(PILImage.open(mask)).copy()
        for old, new in (change or {}).items():
            pred[pred == old] = new
        out = preds / mask.parent.name / mask.name.replace("_mask.png", "_pred.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(pred).save(out)
    return preds


def test_bad_labels_not_value_name_pairs(cli, tmp_path, multilabel_phantoms):
    data = multilabel_phantoms(tmp_path / "data")
    preds = _predictions(data, tmp_path / "preds")
    cli.refuses("evaluate", "--pred", preds, "--data", data, "--labels", "edema", "--out", tmp_path / "eval",
                says=r"--labels.*value=name pairs of the labels, e\.g\. 1=edema,2=enhancing", untouched=(tmp_path,))


def test_bad_labels_value_given_twice(cli, tmp_path, multilabel_phantoms):
    data = multilabel_phantoms(tmp_path / "data")
    preds = _predictions(data, tmp_path / "preds")
    cli.refuses("evaluate", "--pred", preds, "--data", data, "--labels", "1=edema,1=enhancing", "--out",
                tmp_path / "eval", says=r"label value 1 is given twice", untouched=(tmp_path,))


def test_bad_labels_for_a_model(cli, tmp_path, multilabel_phantoms, make_model_dir):
    data = multilabel_phantoms(tmp_path / "data")
    model = make_model_dir(tmp_path / "m")
    cli.refuses("evaluate", "--model", model, "--data", data, "--labels", "1=edema,2=enhancing", "--out",
                tmp_path / "eval", says=r"--labels is for scoring predictions \(--pred\); a model scores the labels "
                                        r"it was trained on", untouched=(tmp_path,))


def test_bad_labels_mask_value_not_listed(cli, tmp_path, multilabel_phantoms):
    data = multilabel_phantoms(tmp_path / "data", dataset_json=False)
    preds = _predictions(data, tmp_path / "preds", change={2: 0})  # predictions hold edema only
    cli.refuses("evaluate", "--pred", preds, "--data", data, "--labels", "1=edema", "--out", tmp_path / "eval",
                says=r"mask .*case0_0_mask\.png holds label value\(s\) 2, which are not among the labels scored "
                     r"\(1=edema\); list every label", untouched=(tmp_path,))


def test_bad_labels_prediction_value_not_listed(cli, tmp_path, multilabel_phantoms):
    data = multilabel_phantoms(tmp_path / "data")  # dataset.json: edema 1, enhancing 2
    preds = _predictions(data, tmp_path / "preds", change={2: 3})
    cli.refuses("evaluate", "--pred", preds, "--data", data, "--out", tmp_path / "eval",
                says=r"prediction .*case0_0_pred\.png holds label value\(s\) 3, which are not among the labels "
                     r"scored \(1=edema,2=enhancing\)", untouched=(tmp_path,))


def test_bad_labels_binary_masks_scored_as_labels(cli, tmp_path, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")  # masks hold 0 and 255
    preds = _predictions(data, tmp_path / "preds", change={255: 1})
    cli.refuses("evaluate", "--pred", preds, "--data", data, "--labels", "1=lesion", "--out", tmp_path / "eval",
                says=r"mask .*case0_0_mask\.png holds label value\(s\) 255, which are not among the labels scored "
                     r"\(1=lesion\)", untouched=(tmp_path,))


def test_bad_labels_region_based_dataset_json(cli, tmp_path, multilabel_phantoms):
    data = multilabel_phantoms(tmp_path / "data")
    preds = _predictions(data, tmp_path / "preds")
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumor": [1, 2], "enhancing": 2}}))
    cli.refuses("evaluate", "--pred", preds, "--data", data, "--out", tmp_path / "eval",
                says=r"dataset\.json: label 'tumor'.*region-based labels", untouched=(tmp_path,))

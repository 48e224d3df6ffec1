"""Labels the data get wrong, refused before training (exit 2, one message naming the file, nothing
written): a dataset.json whose labels are region-based or give a value twice, and masks holding a
value that none of the named labels has."""

from __future__ import annotations

import json
from pathlib import Path


def test_bad_labels_region_based_in_dataset_json(cli, tmp_path: Path, multilabel_phantoms, tiny_train_flags) -> None:
    data = multilabel_phantoms(tmp_path / "data")
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumor": [1, 2], "edema": 1}}))
    out = tmp_path / "model"
    err = cli.refuses("train", data, "--out", out, *tiny_train_flags,
                      says=r"dataset\.json: label 'tumor': \[1, 2\] is not a name and an integer value \(region-based "
                           r"labels .* are not supported\)", untouched=(data, out))
    assert cli.names(err, data / "dataset.json")


def test_bad_labels_value_twice_in_dataset_json(cli, tmp_path: Path, multilabel_phantoms, tiny_train_flags) -> None:
    data = multilabel_phantoms(tmp_path / "data")
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "edema": 1, "oedema": 1}}))
    out = tmp_path / "model"
    cli.refuses("train", data, "--out", out, *tiny_train_flags, says=r"dataset\.json: label value 1 is given twice",
                untouched=(data, out))


def test_bad_labels_mask_value_no_label_names(cli, tmp_path: Path, multilabel_phantoms, tiny_train_flags) -> None:
    data = multilabel_phantoms(tmp_path / "data", dataset_json=False)
    out = tmp_path / "model"
    err = cli.refuses("train", data, "--out", out, *tiny_train_flags, "--labels", "1=edema,3=necrosis",
                      says=r"mask .*_mask\.png holds the value 2, which none of the labels \(1, 3\) names; name it "
                           r"\(--labels or DATA/dataset\.json 'labels'\) or fix the mask", untouched=(data, out))
    assert "Traceback" not in err

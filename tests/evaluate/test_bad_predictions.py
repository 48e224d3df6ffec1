"""Bad ``evaluate`` inputs of the interop paths, through the CLI: ambiguous or absent predictions
in --pred, a split name on data outside the model's split, and ``predict --naming nnunet`` over
earlier label maps. Each refused with exit 2, a message naming the case or file, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image as PILImage


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    return path


def test_bad_evaluate_ambiguous_prediction(cli, tmp_path, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")
    preds = tmp_path / "preds"
    _png(preds / "case1" / "case1_0_pred.png")
    _png(preds / "case1" / "case1_0.png")  # the nnU-Net name of the same image
    cli.refuses("evaluate", "--pred", preds, "--data", data, "--out", tmp_path / "eval",
                says=r"case case1: 2 files in .*preds may be the prediction of .*case1_0\.png", untouched=(tmp_path,))


def test_bad_evaluate_no_prediction_found(cli, tmp_path, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")
    _png(tmp_path / "preds" / "unrelated_pred.png")
    cli.refuses("evaluate", "--pred", tmp_path / "preds", "--data", data, "--out", tmp_path / "eval",
                says=r"no prediction in .*preds for any of the 12 images \(e.g. case case0: looked for "
                     r"case0_0_pred\.\* or case0_0\.\*", untouched=(tmp_path,))


def test_bad_evaluate_split_name_on_external_data(cli, tmp_path, labelled_phantoms, make_model_dir):
    data = labelled_phantoms(tmp_path / "data")
    model = make_model_dir(tmp_path / "m")
    (model / "splits.json").write_text(json.dumps({"train": ["p1"], "val": ["p2"], "test": ["p3"]}))
    cli.refuses("evaluate", "--model", model, "--data", data, "--split", "val", "--out", tmp_path / "eval",
                says=r"--split val: .*data holds none of the 3 cases of the model's split file .*--split all",
                untouched=(tmp_path,))


def test_bad_predict_nnunet_names_exist(cli, tmp_path, make_model_dir):
    model = make_model_dir(tmp_path / "m")
    _png(tmp_path / "in" / "c1_0000.png")
    _png(tmp_path / "out" / "c1.png")  # an earlier label map
    cli.refuses("predict", model, tmp_path / "in", "--out", tmp_path / "out", "--naming", "nnunet",
                says=r"already holds 1 file.*c1\.png.*--overwrite", untouched=(tmp_path,))

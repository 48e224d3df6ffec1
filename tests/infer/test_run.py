"""Tests for medanomaly.infer.run (``predict``): a model directory applied to every image below the
inputs, bad files reported and skipped, regions.json at the output root, refusals before any work,
and a 3D model predicting a folder of slices as one stacked volume written back slice by slice.
Random-weight tiny models on hand-made phantoms; the real LGG slices of ../shared/data where present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medanomaly.apps.api import train_with_config as train
from medanomaly.config import schema as config
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__
from medanomaly.data.volumes import VolumeCase, read_volume
from medanomaly.evaluate.score import evaluate_model
from medanomaly.infer.predictor import Predictor
from medanomaly.infer.run import predict_paths
from medanomaly.io import read_image

LGG = Path(os.environ["MEDANOMALY_SHARED_DATA"]) / "lgg-flair"  # the root is resolved by tests/conftest.py


@pytest.fixture
def data(tmp_path, labelled_phantoms) -> Path:
    return labelled_phantoms(tmp_path / "data")  # case folders of 3 slices of 32 x 32 (and their masks)


def test_every_image_below_the_inputs_is_predicted(tmp_path, data, make_model_dir):
    model = make_model_dir(tmp_path / "m")
    out = tmp_path / "pred"
    res = predict_paths(model, [data / "case3", data / "case2" / "case2_0.png"], out, progress=False)
    assert res == {"n_ok": 4, "failed": [], "out": str(out)}
    regions = json.loads((out / "regions.json").read_text())
    assert (regions["medanomaly_version"], regions["model"], regions["runtime"], regions["threshold"]) == (
        __version__, str(model), "torch", 0.5)
    assert [r["case"] for r in regions["images"]] == ["case3_0", "case3_1", "case3_2", "case2_0"]
    expected = Predictor(model).predict(read_image(data / "case3" / "case3_1.png"))
    written = read_image(out / "case3_1_score.tif").array[0]
    np.testing.assert_array_equal(written, expected.score)


def test_a_bad_file_is_reported_and_the_rest_predicted(tmp_path, data, make_model_dir):
    (data / "case3" / "case3_9.png").write_bytes(b"not a png at all")
    res = predict_paths(make_model_dir(tmp_path / "m"), [data / "case3"], tmp_path / "pred", progress=False)
    assert res["n_ok"] == 3 and [f["input"] for f in res["failed"]] == [str(data / "case3" / "case3_9.png")]
    assert "case3_9.png" in res["failed"][0]["error"]
    regions = json.loads((tmp_path / "pred" / "regions.json").read_text())
    assert regions["failed"] == res["failed"] and len(regions["images"]) == 3


def test_refusals_before_any_work(tmp_path, data, make_model_dir):
    model, out = make_model_dir(tmp_path / "m"), tmp_path / "pred"
    with pytest.raises(MedanomalyError, match="does not exist"):
        predict_paths(model, [tmp_path / "absent"], out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedanomalyError, match="no images found"):
        predict_paths(model, [tmp_path / "empty"], out, progress=False)
    predict_paths(model, [data / "case3"], out, progress=False)
    with pytest.raises(MedanomalyError, match="--overwrite"):
        predict_paths(model, [data / "case3"], out, progress=False)
    assert predict_paths(model, [data / "case3"], out, overwrite=True, progress=False)["n_ok"] == 3


def test_a_3d_model_stacks_a_folder_of_slices_and_writes_each_slice(tmp_path, data, make_model_dir_3d):
    model = make_model_dir_3d(tmp_path / "m3")
    res = predict_paths(model, [data], tmp_path / "pred", progress=False)
    assert res["n_ok"] == 12 and not res["failed"]  # 4 folders of 3 slices, one volume each
    written = sorted(p.name for p in (tmp_path / "pred" / "case1").glob("*_pred.png"))
    assert written == ["case1_0_pred.png", "case1_1_pred.png", "case1_2_pred.png"]
    volume, _ = read_volume(VolumeCase("", tuple(sorted((data / "case1").glob("case1_?.png"))), (None,) * 3))
    expected = Predictor(model).scores(volume)  # the folder scored as one (3, 32, 32) volume
    written = np.stack([read_image(tmp_path / "pred" / "case1" / f"case1_{k}_score.tif").array[0] for k in range(3)])
    np.testing.assert_array_equal(written, expected)


@pytest.mark.shared_data("lgg-flair")
def test_3d_on_lgg_patient_folders_stacks_and_writes_per_slice(tmp_path):
    splits = json.loads((LGG / "splits.json").read_text())
    picked = {k: splits[k][:1] for k in ("train", "val", "test")}
    data = tmp_path / "lgg"
    data.mkdir()
    for ids in picked.values():
        (data / ids[0]).symlink_to(LGG / ids[0])
    (tmp_path / "splits.json").write_text(json.dumps(picked))
    cfg = config.load(None, {"model.dim": 3, "model.width": 4, "model.depth": 2, "model.norm": "instance",
                             "epochs": 1, "patches_per_epoch": 2, "patch": (8, 32, 32), "spacing": (1.0, 4.0, 4.0)})
    train(data, tmp_path / "model", cfg, tmp_path / "splits.json", progress=False)
    summary = evaluate_model(tmp_path / "model", data, tmp_path / "eval", split="test", progress=False)
    n_slices = len(list((data / picked["test"][0]).glob("*_flair.png")))
    assert summary["n_cases"] == 1 and summary["n_images"] == n_slices
    written = sorted((tmp_path / "eval" / "predictions" / picked["test"][0]).glob("*_pred.png"))
    assert len(written) == n_slices
    res = predict_paths(tmp_path / "model", [data / picked["test"][0]], tmp_path / "pred", progress=False)
    assert res["n_ok"] == n_slices and not res["failed"]


def test_a_csv_listing_predicted_with_nnunet_names(tmp_path, data, make_model_dir):
    listing = tmp_path / "todo.csv"
    listing.write_text("image\ndata/case3/case3_0.png\ndata/case2/case2_1.png\n")
    out = tmp_path / "pred"
    res = predict_paths(make_model_dir(tmp_path / "m"), [listing], out, progress=False, naming="nnunet")
    assert res["n_ok"] == 2 and sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == [
        "case2/case2_1.png", "case3/case3_0.png", "regions.json"]
    regions = json.loads((out / "regions.json").read_text())
    assert regions["naming"] == "nnunet" and [r["case"] for r in regions["images"]] == ["case3/case3_0",
                                                                                         "case2/case2_1"]

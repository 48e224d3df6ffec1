"""Tests for medanomaly.apps.api: ``train_with_config`` trains, then calibrates on the val split, so
the model directory it returns is finished (model.json with the chosen post-processing) and predicts;
resuming continues it and calibrates again. ``train`` plans first, exactly as the CLI does (same
model.json and plan); options are TrainConfig's keys; ``Model`` predicts in memory; ``plan``,
``predict`` and ``evaluate`` are what the commands call. Tiny runs on the demo phantoms."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.apps import api
from medanomaly.apps.apidoc import EXAMPLE
from medanomaly.apps.cli import main
from medanomaly.config import schema as config
from medanomaly.config.model_file import read_model_file
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.predictor import Predictor
from medanomaly.io import read_image
from medanomaly.train.plan import Plan, load_plan

TINY = {"size": 32, "model.width": 4, "model.depth": 2, "epochs": 1, "batch_size": 4, "precision": "fp32",
        "max_minutes": 0}
TRAINED = {"checkpoint.pt", "config.json", "metrics.csv", "model.pt", "splits.json", "train.log", "progress.png"}


def test_train_writes_a_finished_model_directory(phantoms, tmp_path):
    out = tmp_path / "m"
    cfg = config.load(None, TINY)
    res = api.train_with_config(phantoms, out, cfg, progress=False)
    assert res.out_dir == out and res.epochs_run == 1 and res.best_epoch == 0 and res.in_channels == 1
    assert {p.name for p in out.iterdir()} == TRAINED | {"model.json"}
    mf = read_model_file(out)
    assert mf.config == res.cfg and mf.task == "supervised" and mf.has_network
    assert (mf.training.best_epoch, mf.training.best_val_score) == (res.best_epoch, pytest.approx(res.best_val_score))
    cal = mf.calibration
    assert (cal["split"], cal["n_cases"], cal["n_images"]) == ("val", 1, 4)  # one val case of 4 slices
    predictor = Predictor(out)
    assert predictor.post == mf.postprocess
    image = read_image(sorted((phantoms / "synthetic_case_04").glob("*_1.png"))[0])  # a test slice
    pred = predictor.predict(image)
    assert pred.mask.shape == pred.score.shape == (48, 48) and np.isfinite(pred.score).all()
    with pytest.raises(MedanomalyError, match="already holds a trained model"):
        api.train_with_config(phantoms, out, cfg, progress=False)


def test_resume_trains_on_and_calibrates_again(phantoms, tmp_path):
    out = tmp_path / "m"
    api.train_with_config(phantoms, out, config.load(None, TINY), progress=False)
    res = api.train_with_config(phantoms, out, config.load(None, {**TINY, "epochs": 2}), resume=True, progress=False)
    assert res.epochs_run == 2  # epochs in all: 0 from the checkpoint, then 1
    with (out / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]
    mf = read_model_file(out)
    assert mf.training.best_epoch == res.best_epoch and mf.config.epochs == 2


def test_the_intensity_baseline_is_calibrated_without_training(phantoms, tmp_path):
    out = tmp_path / "b"
    res = api.train_with_config(phantoms, out, config.load(None, {**TINY, "task": "anomaly",
                                                                  "anomaly.method": "intensity"}), progress=False)
    assert (res.best_epoch, res.epochs_run) == (-1, 0)
    assert {p.name for p in out.iterdir()} == {"config.json", "splits.json", "model.json", "train.log"}
    mf = read_model_file(out)
    assert not mf.has_network and mf.anomaly.method == "intensity" and mf.training.best_epoch == -1
    assert Predictor(out).model is None


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


#: what differs between two identical runs: the speed the plan measured, the minutes the training took
MEASURED = ("plan_images_per_s", "train_minutes")


def _settled(model_file: dict) -> dict:
    """A model.json without :data:`MEASURED`."""
    for section in ("config", "training"):
        model_file[section] = {k: v for k, v in model_file[section].items() if k not in MEASURED}
    return model_file


@pytest.fixture(scope="module")
def tiny_model(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api") / "m"
    api.train_with_config(phantoms, out, config.load(None, TINY), progress=False)
    return out


def test_the_readme_example_trains_what_the_cli_trains(phantoms, tmp_path, monkeypatch, caplog):
    """The example of docs/api.md (and the README) runs, and its planned run is the CLI's: same plan, same
    model.json (config, chosen post-processing, weights' SHA-256). One epoch instead of the budget's."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(phantoms, tmp_path / "lgg-flair")
    shutil.copy(next((phantoms / "synthetic_case_04").glob("*_1.png")), tmp_path / "scan.png")
    code = EXAMPLE.replace("max_minutes=5)", "max_minutes=5, epochs=1, device='cpu', progress=False)")
    with caplog.at_level(logging.INFO, logger="medanomaly.apps.api"):
        exec(compile(code, "README example", "exec"), {})  # noqa: S102  (our own example, as a user runs it)
    assert any(r.getMessage().startswith("time: training") and "calibration" in r.getMessage() for r in caplog.records)
    assert main(["-q", "train", "lgg-flair", "--out", "cli", "--max-minutes", "5", "--epochs", "1",
                 "--device", "cpu"]) == 0
    api_run, cli_run = (_settled(json.loads((tmp_path / d / "model.json").read_text())) for d in ("model", "cli"))
    assert api_run == cli_run and len(api_run["weights"]["sha256"]) == 64  # the same weights
    plans = [load_plan(tmp_path / d / "plan.json").to_config_overrides() for d in ("model", "cli")]
    chosen = [{k: v for k, v in p.items() if k not in (*MEASURED, "epochs")} for p in plans]  # epochs: from the speed
    assert chosen[0] == chosen[1] and set(chosen[0]) >= {"size", "batch_size", "model.width", "model.depth"}
    assert api_run["config"]["size"] == plans[0]["size"] != config.TrainConfig.size  # the plan was used, not defaults
    assert (tmp_path / "eval" / "report.html").is_file()


def test_train_returns_a_model_with_its_timings(phantoms, tmp_path):
    model = api.train(phantoms, tmp_path / "m", plan=False, device="cpu", progress=False,
                      **{k: v for k, v in TINY.items() if k != "model.width"}, model={"width": 4})
    assert model.path == tmp_path / "m" and model.config == read_model_file(tmp_path / "m").config
    assert model.config.model.width == 4 and not (tmp_path / "m" / "plan.json").exists()  # plan=False: defaults
    assert set(model.timings) == {"training_s", "calibration_s"} and model.timings["calibration_s"] > 0


def test_options_are_the_config_keys(tmp_path):
    assert api._overrides({"size": 32, "model": {"width": 8}, "augment.enabled": False, "init": tmp_path,
                           "seed": None}) == {"size": 32, "model.width": 8, "augment.enabled": False,
                                              "init": str(tmp_path)}
    assert {"size", "model.width", "anomaly.method", "augment.p_flip"} <= set(api.option_keys())
    assert set(api.option_keys()) >= {k for k in config.TrainConfig().to_dict() if k not in ("model", "augment",
                                                                                             "anomaly")}


def test_bad_api_unknown_option(phantoms, tmp_path):
    before = _digest(phantoms)
    with pytest.raises(MedanomalyError, match=r"unknown training option\(s\) 'sise'; valid: .*\bsize\b"):
        api.train(phantoms, tmp_path / "m", sise=32)
    with pytest.raises(MedanomalyError, match=r"'model.widht'"):
        api.train(phantoms, tmp_path / "m", model={"widht": 4})
    assert not (tmp_path / "m").exists() and _digest(phantoms) == before


def test_bad_api_option_value(phantoms, tmp_path):
    with pytest.raises(MedanomalyError, match="size"):
        api.train(phantoms, tmp_path / "m", size=3)
    with pytest.raises(MedanomalyError, match="unknown task 'segment'; valid: supervised, anomaly"):
        api.plan(phantoms, task="segment")
    assert not (tmp_path / "m").exists()


def test_model_predicts_in_memory_as_predict_does(tiny_model, phantoms):
    before = _digest(tiny_model)
    model = api.Model.load(tiny_model, device="cpu")
    assert model.config == read_model_file(tiny_model).config and model.timings == {}
    assert "supervised, 2D, size 32" in repr(model) and model.postprocess == Predictor(tiny_model).post
    path = min((phantoms / "synthetic_case_04").glob("*_1.png"))
    mask, score = model.predict(path)
    expected = Predictor(tiny_model).predict(read_image(path))
    np.testing.assert_array_equal(mask, expected.mask)
    np.testing.assert_array_equal(score, expected.score)
    assert mask.dtype == bool and score.dtype == np.float32 and mask.shape == (48, 48)
    pixels = np.asarray(PILImage.open(path))  # an array of the same 8-bit pixels: the same prediction
    np.testing.assert_array_equal(model.predict(pixels)[1], score)
    assert _digest(tiny_model) == before  # nothing written


def test_bad_api_image_array(tiny_model):
    with pytest.raises(MedanomalyError, match=r"\(H, W\) or \(C, H, W\)"):
        api.Model.load(tiny_model).predict(np.zeros((2, 2, 2, 2)))
    with pytest.raises(MedanomalyError, match="must be numeric"):
        api.Model.load(tiny_model).predict(np.array([["a", "b"]]))


def test_bad_api_unfinished_model(phantoms, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(MedanomalyError, match=str(tmp_path / "m")):
        api.Model.load(tmp_path / "m")


def test_predict_then_evaluate_a_model_and_its_predictions(tiny_model, phantoms, tmp_path):
    res = api.predict(api.Model.load(tiny_model), phantoms / "synthetic_case_04", tmp_path / "pred", device="cpu",
                      progress=False)
    assert res["n_ok"] == 4 and res["failed"] == []
    by_model = api.evaluate(tiny_model, phantoms, tmp_path / "e1", device="cpu", progress=False)  # its test split
    by_pred = api.evaluate(tmp_path / "pred", phantoms, tmp_path / "e2", split="test", progress=False)
    assert by_model["n_cases"] == by_pred["n_cases"] == 1
    assert by_model["dice_per_case_mean"] == pytest.approx(by_pred["dice_per_case_mean"])
    assert api.Model.load(tiny_model).evaluate(phantoms, tmp_path / "e3", progress=False)["n_cases"] == 1


def test_plan_is_what_train_plans(phantoms):
    p = api.plan(phantoms, max_minutes=2)
    assert isinstance(p, Plan) and p.task == "supervised" and p.max_minutes == 2
    assert "size" in p.table()

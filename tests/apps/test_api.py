"""Tests for medanomaly.apps.api: ``train`` trains, then calibrates on the val split, so the model
directory it returns is finished (model.json with the chosen post-processing) and predicts; resuming
continues it and calibrates again. Tiny runs on the demo phantoms (one epoch of 32 x 32 slices)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from medanomaly.apps import api
from medanomaly.config import schema as config
from medanomaly.config.model_file import read_model_file
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.predictor import Predictor
from medanomaly.io import read_image

TINY = {"size": 32, "model.width": 4, "model.depth": 2, "epochs": 1, "batch_size": 4, "precision": "fp32",
        "max_minutes": 0}
TRAINED = {"checkpoint.pt", "config.json", "metrics.csv", "model.pt", "splits.json"}


def test_train_writes_a_finished_model_directory(phantoms, tmp_path):
    out = tmp_path / "m"
    cfg = config.load(None, TINY)
    res = api.train(phantoms, out, cfg, progress=False)
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
        api.train(phantoms, out, cfg, progress=False)


def test_resume_trains_on_and_calibrates_again(phantoms, tmp_path):
    out = tmp_path / "m"
    api.train(phantoms, out, config.load(None, TINY), progress=False)
    res = api.train(phantoms, out, config.load(None, {**TINY, "epochs": 2}), resume=True, progress=False)
    assert res.epochs_run == 2  # epochs in all: 0 from the checkpoint, then 1
    with (out / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]
    mf = read_model_file(out)
    assert mf.training.best_epoch == res.best_epoch and mf.config.epochs == 2


def test_the_intensity_baseline_is_calibrated_without_training(phantoms, tmp_path):
    out = tmp_path / "b"
    res = api.train(phantoms, out, config.load(None, {**TINY, "task": "anomaly", "anomaly.method": "intensity"}),
                    progress=False)
    assert (res.best_epoch, res.epochs_run) == (-1, 0)
    assert {p.name for p in out.iterdir()} == {"config.json", "splits.json", "model.json"}
    mf = read_model_file(out)
    assert not mf.has_network and mf.anomaly.method == "intensity" and mf.training.best_epoch == -1
    assert Predictor(out).model is None

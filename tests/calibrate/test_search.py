"""Tests for medanomaly.calibrate.search: calibrating a model directory on its val split writes a
complete model file (schema version 2) through medanomaly.config.model_file; recalibrating and the
intensity baseline read it back. Tiny 32x32 phantoms, random-weight networks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from medanomaly.calibrate.search import calibrate_and_save, fit_intensity_baseline, recalibrate
from medanomaly.calibrate.thresholds import MIN_SIZES, THRESHOLDS
from medanomaly.config import schema
from medanomaly.config.model_file import TrainingSummary, read_model_file
from medanomaly.config.sections import AnomalyConfig, PostprocessParams
from medanomaly.infer.predictor import Predictor


@pytest.fixture
def data(tmp_path, labelled_phantoms) -> Path:
    return labelled_phantoms(tmp_path / "data")


def _model(tmp_path: Path, data: Path, make_model_dir, **kw) -> tuple[Path, schema.TrainConfig]:
    """A model directory with random weights plus what train writes before calibrating."""
    out = make_model_dir(tmp_path / "model", **kw)
    shutil.copy(data / "splits.json", out / "splits.json")
    mf = read_model_file(out)
    cfg = mf.config
    schema.save(cfg, out / "config.json")
    (out / "model.json").unlink()  # train has not calibrated yet
    return out, cfg


def test_supervised_calibration_writes_the_model_file(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir)
    best = calibrate_and_save(out, cfg, data, 1, 7, 0.42, torch.device("cpu"), progress=False)
    mf = read_model_file(out)
    assert json.loads((out / "model.json").read_text())["schema_version"] == 2
    assert mf.postprocess == best and mf.config == cfg and mf.task == "supervised"
    assert mf.training == TrainingSummary(7, 0.42, "mean per-case Dice at 0.5 (training size)")
    cal = mf.calibration
    assert (cal["split"], cal["n_images"], cal["n_cases"]) == ("val", 3, 1)  # case2's three slices
    assert cal["trials"] == len(THRESHOLDS) * len(MIN_SIZES) + 3 and 0.0 <= cal["mean_case_dice"] <= 1.0
    assert cal["mean_case_dice"] >= cal["mean_case_dice_at_0.5"]
    assert Predictor(out).post == best


def test_recalibration_gives_the_same_model_file(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir)
    calibrate_and_save(out, cfg, data, 1, 3, 0.5, torch.device("cpu"), progress=False)
    first = read_model_file(out)
    assert recalibrate(out, data, progress=False) == first.postprocess
    assert read_model_file(out) == first  # the training summary is carried over


def test_anomaly_calibration_writes_the_map_settings_into_the_config(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir, task="anomaly")
    calibrate_and_save(out, cfg, data, 1, 2, -0.1, torch.device("cpu"), progress=False)
    mf = read_model_file(out)
    choice = mf.calibration["map_selection"]
    assert choice["selected"] is True and len(choice["trials"]) == 12  # 3 residuals x 2 erosions x 2 medians
    best = max(choice["trials"], key=lambda t: t["val_auprc"])
    chosen = {k: best[k] for k in ("residual", "erode", "median_size")}
    assert {k: getattr(mf.anomaly, k) for k in chosen} == chosen
    assert mf.config.anomaly == mf.anomaly  # the model file's configuration is the final one
    assert mf.calibration["mode"] == "dice_on_val" and mf.training.val_score.startswith("minus the denoise")
    assert schema.load(out / "config.json").anomaly == cfg.anomaly  # config.json: the configuration as trained


def test_intensity_baseline_is_a_model_directory_of_its_own(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir, task="anomaly")
    calibrate_and_save(out, cfg, data, 1, 2, -0.1, torch.device("cpu"), progress=False)
    base = fit_intensity_baseline(out, data, tmp_path / "baseline", progress=False)
    mf = read_model_file(base)
    assert mf.anomaly == AnomalyConfig(method="intensity", **{k: getattr(mf.anomaly, k) for k in
                                                              ("residual", "erode", "median_size")})
    assert not mf.has_network and not (base / "model.pt").exists()
    assert mf.training.best_epoch == -1 and math.isnan(mf.training.best_val_score)
    assert (base / "splits.json").read_text() == (out / "splits.json").read_text()
    assert isinstance(mf.postprocess, PostprocessParams) and Predictor(base).model is None

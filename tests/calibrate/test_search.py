"""Tests for medanomaly.calibrate.search: calibrating a model directory on its val split writes a
complete model file (schema version 2) through medanomaly.config.model_file; recalibrating and the
intensity baseline read it back. Tiny 32x32 phantoms, random-weight networks."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image as PILImage

from medanomaly.calibrate import search as search_mod
from medanomaly.calibrate.search import (
    calibrate_and_save,
    calibrate_model,
    fit_intensity_baseline,
    recalibrate,
)
from medanomaly.calibrate.thresholds import MIN_SIZES, THRESHOLDS
from medanomaly.config import schema
from medanomaly.config.model_file import TrainingSummary, read_model_file
from medanomaly.config.sections import AnomalyConfig, PostprocessParams
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.predictor import Predictor
from medanomaly.io import read_image


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


def test_the_model_file_is_written_last_with_the_weights_hash(tmp_path, data, make_model_dir, monkeypatch):
    """While the val predictions run, no model.json exists (the predictor runs on the model file in
    memory); the one written at the end records the SHA-256 of the model.pt that was calibrated."""
    out, cfg = _model(tmp_path, data, make_model_dir)
    seen = []
    real = search_mod.val_predictions

    def spy(*args, **kwargs):
        seen.append((out / "model.json").exists())
        return real(*args, **kwargs)

    monkeypatch.setattr(search_mod, "val_predictions", spy)
    calibrate_and_save(out, cfg, data, 1, 0, 0.5, torch.device("cpu"), progress=False)
    assert seen == [False]
    assert read_model_file(out).weights_sha256 == hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()


@pytest.mark.parametrize("task", ["supervised", "anomaly"])
def test_a_failed_calibration_leaves_no_model_file(tmp_path, data, make_model_dir, monkeypatch, task):
    out, cfg = _model(tmp_path, data, make_model_dir, task=task)
    before = sorted(p.name for p in out.iterdir())

    def fail(*args, **kwargs):
        raise ValueError("the searches failed")

    monkeypatch.setattr(search_mod, "calibrate_anomaly" if task == "anomaly" else "search", fail)
    with pytest.raises(ValueError, match="the searches failed"):
        calibrate_and_save(out, cfg, data, 1, 0, 0.5, torch.device("cpu"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # no model.json, pending or otherwise


def test_recalibration_completes_an_interrupted_run_from_its_checkpoint(tmp_path, data, make_model_dir):
    """No model.json: the training summary comes from checkpoint.pt, the channels from the data, and
    the result equals the calibration training would have written."""
    out, cfg = _model(tmp_path, data, make_model_dir)
    schema.save(replace(cfg, epochs=3), out / "config.json")
    torch.save({"epoch": 2, "step": 9, "best": 0.25, "best_epoch": 1, "elapsed": 3.0, "bad_epochs": 1},
               out / "checkpoint.pt")
    (out / ".tmp-model-x.json").write_text("{")  # a write cut off by a kill
    recalibrate(out, data, progress=False)
    mf = read_model_file(out)
    assert (mf.training.best_epoch, mf.training.best_val_score, mf.input.channels) == (1, 0.25, 1)
    assert not list(out.glob(".tmp-*"))
    done = tmp_path / "done"
    shutil.copytree(out, done)
    (done / "model.json").unlink()
    calibrate_and_save(done, replace(cfg, epochs=3), data, 1, 1, 0.25, torch.device("cpu"), progress=False)
    assert read_model_file(done) == mf


def test_recalibration_is_refused_while_the_training_has_not_ended(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir)
    schema.save(replace(cfg, epochs=3, max_minutes=0), out / "config.json")
    torch.save({"epoch": 0, "step": 3, "best": 0.25, "best_epoch": 0, "elapsed": 1.0, "bad_epochs": 0},
               out / "checkpoint.pt")
    with pytest.raises(MedanomalyError, match=f"stopped after epoch 1 of 3.*'medanomaly train DATA --out {out} --resume'"):
        recalibrate(out, data, progress=False)
    assert not (out / "model.json").exists()


def test_calibrate_replaces_a_finished_model_file_only_when_asked(tmp_path, data, make_model_dir):
    out, _ = _model(tmp_path, data, make_model_dir)
    calibrate_model(out, data, progress=False)  # unfinished: completed
    first = read_model_file(out)
    with pytest.raises(MedanomalyError, match="already holds a model file.*--overwrite"):
        calibrate_model(out, data, progress=False)
    assert calibrate_model(out, data, overwrite=True, progress=False) == first.postprocess
    pending = json.loads((out / "model.json").read_text())
    pending["calibration"] = {"status": "pending"}  # an earlier release's interrupted calibration
    (out / "model.json").write_text(json.dumps(pending))
    calibrate_model(out, data, progress=False)  # completed without --overwrite
    assert read_model_file(out) == first


def test_several_labels_are_calibrated_per_label_and_predicted_as_label_maps(tmp_path, cli, multilabel_phantoms,
                                                                            tiny_train_flags):
    """dataset.json names two labels: train (1 epoch) -> a threshold and post-processing per label
    on val in model.json -> predict writes label maps (the label values) on the input's grid."""
    data = multilabel_phantoms(tmp_path / "data")
    model = tmp_path / "model"
    rc, err = cli("train", data, "--out", model, *tiny_train_flags)
    assert rc == 0, err
    mf = read_model_file(model)
    assert [(lb.value, lb.name) for lb in mf.labels] == [(1, "edema"), (2, "enhancing")]
    assert mf.model.out_channels == 3 and len(mf.label_posts) == 2
    assert [r["name"] for r in mf.calibration["labels"]] == ["edema", "enhancing"]
    assert mf.calibration["mean_case_dice"] == pytest.approx(
        sum(r["mean_case_dice"] for r in mf.calibration["labels"]) / 2)
    assert "mean over the labels" in mf.training.val_score
    out = tmp_path / "pred"
    rc, err = cli("predict", model, data / "case3", "--out", out)
    assert rc == 0, err
    pred = np.asarray(PILImage.open(out / "case3_0_pred.png"))
    assert pred.shape == (32, 32) and set(np.unique(pred).tolist()) <= {0, 1, 2}
    scores = [tifffile.imread(out / f"case3_0_score_{name}.tif") for name in ("edema", "enhancing")]
    assert all(s.shape == (32, 32) for s in scores) and float((scores[0] + scores[1]).max()) <= 1 + 1e-5
    record = json.loads((out / "regions.json").read_text())
    assert [(r["name"], r["threshold"]) for r in record["labels"]] == [
        (lb.name, p.threshold) for lb, p in zip(mf.labels, mf.label_posts)]
    regions = record["images"]
    assert len(regions) == 3 and all({"label_value", "label_name"} <= set(r) for im in regions for r in im["regions"])
    again = Predictor(model).predict(read_image(data / "case3" / "case3_0.png"))
    np.testing.assert_array_equal(again.mask, pred)  # what was written is what the predictor gives

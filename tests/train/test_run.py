"""A training run (medanomaly.train.run.train): it trains only (calibration and model.json are
composed above it, in medanomaly.apps.api.train), returns what calibration needs, trains nothing
for the intensity baseline, and checks an --init model's channels."""

from __future__ import annotations

import json

import grimp
import pytest
import torch

from medanomaly.apps import api
from medanomaly.config import schema as config
from medanomaly.core.errors import MedanomalyError
from medanomaly.train import run

TINY = {"size": 32, "model.width": 4, "model.depth": 2, "epochs": 1, "batch_size": 4, "precision": "fp32",
        "max_minutes": 0}


def test_training_imports_nothing_of_calibration():
    graph = grimp.build_graph("medanomaly", cache_dir=None)
    assert not graph.chain_exists(importer="medanomaly.train", imported="medanomaly.calibrate", as_packages=True)


def test_train_trains_and_the_api_calibrates(phantoms, tmp_path):
    cfg = config.load(None, TINY)
    res = run.train(phantoms, tmp_path / "m", cfg, progress=False)
    assert (res.out_dir, res.best_epoch, res.epochs_run, res.cfg, res.in_channels) == (tmp_path / "m", 0, 1, cfg, 1)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert files == {"checkpoint.pt", "config.json", "metrics.csv", "model.pt", "splits.json"}  # no model.json
    res = api.train(phantoms, tmp_path / "api", cfg, progress=False)
    meta = json.loads((tmp_path / "api" / "model.json").read_text())
    assert meta["training"]["best_epoch"] == res.best_epoch == 0
    with pytest.raises(MedanomalyError, match="already holds a trained model"):
        run.train(phantoms, tmp_path / "api", cfg, progress=False)


def test_the_intensity_baseline_trains_nothing(phantoms, tmp_path):
    cfg = config.load(None, {**TINY, "task": "anomaly", "anomaly.method": "intensity"})
    res = run.train(phantoms, tmp_path / "m", cfg, progress=False)
    assert (res.best_epoch, res.epochs_run, res.seconds) == (-1, 0, 0.0)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "splits.json"}


def test_new_model_loads_init_weights_of_the_same_channels(phantoms, tmp_path):
    cfg = config.load(None, TINY)
    run.train(phantoms, tmp_path / "pre", cfg, progress=False)  # a directory without model.json, as a pretraining
    model = run.new_model(cfg, 1, torch.device("cpu"), init=str(tmp_path / "pre"))
    saved = torch.load(tmp_path / "pre" / "model.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    conv = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # 2D: channels-last, as configured
    (tmp_path / "pre" / "model.json").write_text(json.dumps({"input": {"channels": 3}}))
    with pytest.raises(MedanomalyError, match="trained on 3-channel images but these have 1"):
        run.new_model(cfg, 1, torch.device("cpu"), init=str(tmp_path / "pre"))

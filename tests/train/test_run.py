"""A training run (medanomaly.train.run.train): it trains only (calibration and model.json are
composed above it, in medanomaly.apps.api), returns what calibration needs, trains nothing
for the intensity baseline, and checks an --init model's channels."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import grimp
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.apps import api
from medanomaly.config import schema as config
from medanomaly.config.model_file import read_model_file
from medanomaly.core.errors import MedanomalyError
from medanomaly.train import prepare as prepare_mod
from medanomaly.train import run
from medanomaly.train.checkpoint import METRIC_FIELDS
from medanomaly.train.loop import MIN_IMAGES

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
    assert files == {"checkpoint.pt", "config.json", "metrics.csv", "model.pt", "splits.json", "train.log",
                     "progress.png"}  # no model.json
    res = api.train_with_config(phantoms, tmp_path / "api", cfg, progress=False)
    meta = json.loads((tmp_path / "api" / "model.json").read_text())
    assert meta["training"]["best_epoch"] == res.best_epoch == 0
    with pytest.raises(MedanomalyError, match="already holds a trained model"):
        run.train(phantoms, tmp_path / "api", cfg, progress=False)


def test_the_intensity_baseline_trains_nothing(phantoms, tmp_path):
    cfg = config.load(None, {**TINY, "task": "anomaly", "anomaly.method": "intensity"})
    res = run.train(phantoms, tmp_path / "m", cfg, progress=False)
    assert (res.best_epoch, res.epochs_run, res.seconds) == (-1, 0, 0.0)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "splits.json", "train.log"}


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


def _never_loaded(monkeypatch) -> None:
    """Loading any image for training fails the test: what is checked must be checked before."""
    def load(*args, **kwargs):
        raise AssertionError("data were loaded before the check")

    monkeypatch.setattr(prepare_mod, "load_slices", load)


def test_checks_come_before_any_image_is_loaded(phantoms, tmp_path, monkeypatch, labelled_phantoms):
    cfg = config.load(None, TINY)
    res = run.train(phantoms, tmp_path / "m", cfg, progress=False)
    rgb = labelled_phantoms(tmp_path / "rgb", n_cases=1, rgb=True)  # extra pairs of 3 channels for grey data
    _never_loaded(monkeypatch)
    with pytest.raises(MedanomalyError, match="has 3 channels but the training images have 1"):
        run.train(phantoms, tmp_path / "x", replace(cfg, extra=str(rgb)), progress=False)
    with pytest.raises(MedanomalyError, match="holds a run of another network"):
        run.train(phantoms, res.out_dir, replace(cfg, model=replace(cfg.model, width=8)), resume=True, progress=False)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")  # weights of another architecture
    with pytest.raises(MedanomalyError, match="--init .*foreign.pt: none of its 1 tensors matches"):
        run.train(phantoms, tmp_path / "y", replace(cfg, init=str(tmp_path / "foreign.pt")), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resuming_a_finished_run_makes_it_unfinished_until_calibrated(phantoms, tmp_path):
    cfg = config.load(None, TINY)
    api.train_with_config(phantoms, tmp_path / "m", cfg, progress=False)
    run.train(phantoms, tmp_path / "m", replace(cfg, epochs=2), resume=True, progress=False)  # the weights change
    assert not (tmp_path / "m" / "model.json").exists()


def _record(tmp_path, cfg, state: dict, seconds: float | None = None) -> run.RunRecord:
    (tmp_path / "model.pt").write_bytes(b"")
    torch.save({"epoch": 1, "step": 6, "best": 0.5, "best_epoch": 1, "elapsed": 60.0, "bad_epochs": 0, **state},
               tmp_path / "checkpoint.pt")
    if seconds is not None:
        rows = [",".join(METRIC_FIELDS), f"1,0.1,0.1,0.5,0.001,{seconds},10"]
        (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run.run_record(tmp_path, cfg)


@pytest.mark.parametrize("state, seconds, ended", [
    ({}, None, False),  # epoch 2 of 5, within every budget
    ({"epoch": 4}, None, True),  # all epochs
    ({"bad_epochs": 3}, None, True),  # early stop (patience 3)
    ({"elapsed": 600.0}, None, True),  # budget of 10 min spent
    ({"elapsed": 540.0}, 80.0, True),  # the next epoch would overrun it (by the loop's 2 % margin)
    ({"elapsed": 540.0}, 30.0, False),
])
def test_the_run_record_applies_the_loops_stopping_rules(tmp_path, state, seconds, ended):
    cfg = config.load(None, {**TINY, "epochs": 5, "patience": 3, "max_minutes": 10})
    record = _record(tmp_path, cfg, state, seconds)
    assert record.ended is ended and (record.best_epoch, record.best_val_score) == (1, 0.5)
    assert "stopped after epoch 2 of 5" in record.reason or ended


def test_the_run_record_without_a_checkpoint(tmp_path):
    cfg = config.load(None, TINY)
    assert not run.run_record(tmp_path, cfg).ended  # nothing trained yet
    (tmp_path / "model.pt").write_bytes(b"")
    assert run.run_record(tmp_path, cfg).ended  # a copied directory: its model.pt is final
    baseline = config.load(None, {**TINY, "task": "anomaly", "anomaly.method": "intensity"})
    assert run.run_record(tmp_path / "absent", baseline).ended


@pytest.mark.parametrize("elapsed, val_seconds, ended", [(590.0, 10.0, True), (580.0, 10.0, False)])
def test_the_run_record_of_a_checkpoint_that_counts_images(tmp_path, elapsed, val_seconds, ended):
    """The loop's rule: no step once the training time plus the last validation's reaches the budget."""
    cfg = config.load(None, {**TINY, "epochs": 5, "patience": 3, "max_minutes": 10})
    record = _record(tmp_path, cfg, {"elapsed": elapsed, "val_seconds": val_seconds, "images_seen": 96})
    assert record.ended is ended and (record.epochs, record.images_seen, record.seconds) == (2, 96, elapsed)
    assert _record(tmp_path, cfg, {}).images_seen is None  # an earlier release's checkpoint did not count them


def test_the_model_file_states_epochs_images_seen_and_the_plans_minimum(phantoms, tmp_path):
    res = api.train_with_config(phantoms, tmp_path / "m", config.load(None, TINY), progress=False)
    assert res.images_seen == 12 and res.load_seconds > 0
    training = json.loads((tmp_path / "m" / "model.json").read_text())["training"]
    assert (training["epochs"], training["images_seen"]) == (1, 12) and "min_images" not in training  # no plan
    planned = config.load(None, {**TINY, "plan_images_per_s": 50.0, "max_minutes": 5})
    api.train_with_config(phantoms, tmp_path / "p", planned, progress=False)
    training = json.loads((tmp_path / "p" / "model.json").read_text())["training"]
    assert (training["plan_images_per_s"], training["min_images"], training["images_seen"]) == (50.0, MIN_IMAGES, 12)


def _weights(cli, data, out, *flags) -> dict[str, torch.Tensor]:
    rc, err = cli("train", data, "--out", out, "--no-plan", "--size", "32", "--width", "4", "--depth", "2", "--epochs",
                  "1", "--batch-size", "2", "--device", "cpu", *flags)
    assert rc == 0, err
    return torch.load(out / "model.pt", weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_binary_runs_are_bit_identical_with_one_label_or_with_masks_of_several_values(tmp_path, cli,
                                                                                     labelled_phantoms,
                                                                                     multilabel_phantoms):
    """Binary stays binary, to the bit: one label named (--labels or dataset.json) trains the weights of
    no label named; masks holding 1 and 2 without labels train as their 0/255 binarisation."""
    data = labelled_phantoms(tmp_path / "binary")
    plain = _weights(cli, data, tmp_path / "m0")
    assert _same(plain, _weights(cli, data, tmp_path / "m1", "--labels", "1=lesion"))
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    assert _same(plain, _weights(cli, data, tmp_path / "m2"))
    several = multilabel_phantoms(tmp_path / "several", dataset_json=False)
    binarised = shutil.copytree(several, tmp_path / "binarised")
    for mask in binarised.rglob("*_mask.png"):
        PILImage.fromarray(((np.asarray(PILImage.open(mask)) > 0) * 255).astype(np.uint8)).save(mask)
    assert _same(_weights(cli, several, tmp_path / "m3"), _weights(cli, binarised, tmp_path / "m4"))
    assert read_model_file(tmp_path / "m3").labels == () and "labels" not in json.loads(
        (tmp_path / "m3" / "model.json").read_text())


def test_several_labels_train_a_softmax_network_of_labels_plus_background(tmp_path, cli, multilabel_phantoms):
    data = multilabel_phantoms(tmp_path / "data")
    weights = _weights(cli, data, tmp_path / "m", "--labels", "1=edema,2=enhancing")
    out_conv = [v for k, v in weights.items() if v.ndim == 4][-1]  # the last convolution: the output layer
    assert out_conv.shape[0] == 3
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["labels"] == "1=edema,2=enhancing"
    metrics = (tmp_path / "m" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 2 and "nan" not in metrics[1]  # one epoch, a finite loss and validation score

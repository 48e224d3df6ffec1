"""Bad model directories, each refused by the command that would use it (predict, export, evaluate,
serve, calibrate) with exit 2, a message saying what is wrong and the command that fixes it, and
nothing created or changed: unfinished runs (no model.json, or the 'pending' one of earlier
releases), weights changed after calibration or holding NaN, and the misuses of ``calibrate``.
Tiny 32x32 phantoms and random-weight networks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medanomaly.config import schema
from medanomaly.config.model_file import read_model_file, write_model_file
from medanomaly.core.atomic import file_sha256

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model-v1"


@pytest.fixture
def run(tmp_path, make_model_dir, labelled_phantoms) -> tuple[Path, Path, Path]:
    """(a finished model directory, as train leaves it: model.json with the weights' SHA-256, config.json,
    splits.json; its data folder; an image to predict)."""
    data = labelled_phantoms(tmp_path / "data")
    model = make_model_dir(tmp_path / "model")
    mf = read_model_file(model)
    write_model_file(replace(mf, weights_sha256=file_sha256(model / "model.pt")), model)
    schema.save(replace(mf.config, epochs=2, max_minutes=0), model / "config.json")
    shutil.copy(data / "splits.json", model / "splits.json")
    return model, data, data / "case3" / "case3_0.png"


def _predict_refused(cli, tmp_path: Path, model: Path, image: Path, says: str) -> str:
    return cli.refuses("predict", model, image, "--out", tmp_path / "out", says=says, untouched=(tmp_path,))


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _nan_weights(model: Path) -> None:
    state = torch.load(model / "model.pt", weights_only=True)
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(state, model / "model.pt")


def test_bad_model_pending_calibration(run, cli, tmp_path):
    model, data, image = run  # the model.json earlier releases wrote before calibrating (placeholder threshold)
    _edit_json(model / "model.json", lambda d: d.update(calibration={"status": "pending"}))
    _predict_refused(cli, tmp_path, model, image, f"calibration was interrupted.*'medanomaly calibrate {model} --data")
    cli.refuses("export", model, "--out", tmp_path / "m.onnx", says="calibrate", untouched=(tmp_path,))
    cli.refuses("evaluate", "--model", model, "--data", data, "--out", tmp_path / "eval", says="calibrate",
                untouched=(tmp_path,))


def test_bad_model_weights_without_model_file(run, cli, tmp_path):
    model, _, image = run  # killed in training or calibration: model.pt and checkpoint.pt, no model.json
    (model / "model.json").unlink()
    (model / "checkpoint.pt").write_bytes(b"")
    err = _predict_refused(cli, tmp_path, model, image, f"{model} is unfinished.*no model.json")
    assert cli.says(err, f"'medanomaly calibrate {model} --data DATA'") and cli.says(err, f"--out {model} --resume")


def test_bad_model_checkpoint_without_weights(run, cli, tmp_path):
    model, _, image = run
    (model / "model.json").unlink()
    (model / "model.pt").unlink()
    (model / "checkpoint.pt").write_bytes(b"")
    _predict_refused(cli, tmp_path, model, image, f"training was interrupted.*'medanomaly train DATA --out {model} --resume'")


def test_bad_model_run_interrupted_before_its_first_epoch(run, cli, tmp_path):
    model, _, image = run  # config.json and splits.json only
    (model / "model.json").unlink()
    (model / "model.pt").unlink()
    _predict_refused(cli, tmp_path, model, image, f"before its first epoch ended.*'medanomaly train DATA --out {model}'")


def test_bad_model_intensity_baseline_not_calibrated(run, cli, tmp_path):
    model, _, image = run
    (model / "model.json").unlink()
    (model / "model.pt").unlink()
    _edit_json(model / "config.json", lambda d: (d.update(task="anomaly"), d["anomaly"].update(method="intensity")))
    _predict_refused(cli, tmp_path, model, image, f"intensity baseline.*'medanomaly calibrate {model} --data DATA'")


def test_bad_model_weights_changed_after_calibration(run, cli, tmp_path):
    model, _, image = run  # a byte-corrupted model.pt that still unpickles (its values changed)
    raw = bytearray((model / "model.pt").read_bytes())
    head = torch.load(model / "model.pt", weights_only=True)["head.weight"].numpy().tobytes()
    at = raw.find(head)
    raw[at:at + 4] = b"\x00\x00\xc0\x7f"  # a NaN in place of the first weight
    (model / "model.pt").write_bytes(bytes(raw))
    assert torch.load(model / "model.pt", weights_only=True)["head.weight"].isnan().any()
    _predict_refused(cli, tmp_path, model, image, f"{model / 'model.pt'} is not the weights file this model was "
                     "calibrated with: its SHA-256")
    cli.refuses("export", model, "--out", tmp_path / "m.onnx", says="SHA-256", untouched=(tmp_path,))


def test_bad_model_nan_weights(run, cli, tmp_path):
    model, _, image = run  # non-finite weights recorded as such (a diverged run): the hash matches
    _nan_weights(model)
    write_model_file(replace(read_model_file(model), weights_sha256=file_sha256(model / "model.pt")), model)
    _predict_refused(cli, tmp_path, model, image, "holds non-finite weights.*NaN")


def test_bad_model_nan_weights_of_a_version_1_directory(cli, tmp_path):
    model = tmp_path / "v1"  # no hash recorded: the finite check alone
    shutil.copytree(FIXTURES / "supervised", model)
    _nan_weights(model)
    _predict_refused(cli, tmp_path, model, FIXTURES / "input.png", "holds non-finite weights")


def test_bad_model_malformed_weights_record(run, cli, tmp_path):
    model, _, image = run
    _edit_json(model / "model.json", lambda d: d["weights"].update(sha256="abc"))
    _predict_refused(cli, tmp_path, model, image, "damaged or was edited.*weights.sha256 'abc' is not a SHA-256")


def test_bad_model_served_unfinished(run, cli, tmp_path):
    model, _, _ = run
    (model / "model.json").unlink()
    cli.refuses("serve", model, "--port", "0", says=f"{model} is unfinished.*calibrate", untouched=(tmp_path,))


def test_bad_calibrate_training_not_ended(run, cli, tmp_path):
    model, data, _ = run  # stopped after epoch 1 of 2: calibrating now would freeze an unfinished training
    (model / "model.json").unlink()
    torch.save({"epoch": 0, "step": 3, "best": 0.2, "best_epoch": 0, "elapsed": 1.0, "bad_epochs": 0},
               model / "checkpoint.pt")
    cli.refuses("calibrate", model, "--data", data, says=f"training has not ended \\(it stopped after epoch 1 of 2\\)"
                f".*'medanomaly train DATA --out {model} --resume'", untouched=(tmp_path,))


def test_bad_calibrate_already_calibrated(run, cli, tmp_path):
    model, data, _ = run
    cli.refuses("calibrate", model, "--data", data, says="already holds a model file.*--overwrite",
                untouched=(tmp_path,))


def test_bad_calibrate_other_data(run, cli, tmp_path, labelled_phantoms):
    model, _, _ = run
    (model / "model.json").unlink()
    other = labelled_phantoms(tmp_path / "other", n_cases=2)  # cases 0 and 1: none of the val case
    cli.refuses("calibrate", model, "--data", other, says="none of the val cases.*data folder the model was trained on",
                untouched=(tmp_path,))


def test_bad_calibrate_data_not_a_folder(run, cli, tmp_path):
    model, _, image = run
    (model / "model.json").unlink()
    cli.refuses("calibrate", model, "--data", image, says="is not a folder", untouched=(tmp_path,))


def test_bad_calibrate_not_a_training_run(run, cli, tmp_path):
    _, data, _ = run
    (tmp_path / "empty").mkdir()
    cli.refuses("calibrate", tmp_path / "empty", "--data", data, says="not the folder of a training run",
                untouched=(tmp_path,))

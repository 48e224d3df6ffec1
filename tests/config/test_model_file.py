"""Tests for medanomaly.config.model_file: the schema of model.json, built from a TrainConfig, written,
read back and checked; version 1 files (no schema_version, no config) upgraded in memory."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from medanomaly.config import schema
from medanomaly.config.model_file import (
    SCHEMA_VERSION,
    InputSpec,
    ModelFile,
    TrainingSummary,
    build_model_file,
    is_pending,
    network_out_channels,
    read_model_file,
    unfinished,
    write_model_file,
)
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import AnomalyConfig, PostprocessParams, UNetConfig
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model-v1"
TRAINING = TrainingSummary(3, 0.71, "mean per-case Dice at 0.5 (training size)")
V1_KEYS = ["format", "medanomaly_version", "task", "model", "input", "precision", "postprocess", "training",
           "calibration"]


def _cfg(**changes) -> TrainConfig:
    return replace(TrainConfig(size=32, model=UNetConfig(width=4, depth=2), precision="fp32"), **changes)


def _v1(tmp_path: Path, name: str = "supervised") -> Path:
    """A copy of a model.json written by the pre-redesign release (tests/fixtures/model-v1)."""
    d = tmp_path / name
    d.mkdir()
    for f in ("model.json", "config.json"):
        (d / f).write_text((FIXTURES / name / f).read_text())
    return d


def test_build_derives_every_section_from_the_config():
    cfg = _cfg(tta=True, seed=7)
    mf = build_model_file(cfg, 3, PostprocessParams(threshold=0.4), TRAINING, {"split": "val"})
    assert mf.task == "supervised" and mf.anomaly is None and mf.precision == "fp32"
    assert mf.input == InputSpec(channels=3, size=32, normalization="auto", dim=2, tta=True)
    assert (mf.model.in_channels, mf.model.out_channels, mf.model.width) == (3, 1, 4)
    assert mf.config == replace(cfg, model=mf.model)  # the configuration, with the network's real channels
    assert mf.config.seed == 7 and mf.postprocess.threshold == 0.4 and mf.training == TRAINING
    assert (mf.format, mf.schema_version, mf.medanomaly_version) == ("medanomaly-model", 2, __version__)


def test_anomaly_model_file_holds_the_map_settings_in_its_config():
    chosen = AnomalyConfig(residual="positive", erode=6, median_size=7)
    mf = build_model_file(_cfg(task="anomaly", tta=True, anomaly=chosen), 2, PostprocessParams(), TRAINING, {})
    assert mf.anomaly == mf.config.anomaly == chosen
    assert mf.model.out_channels == 2 and not mf.input.tta  # a reconstruction; tta is for supervised models only
    synthetic = build_model_file(_cfg(task="anomaly", anomaly=AnomalyConfig(method="synthetic")), 2,
                                 PostprocessParams(), TRAINING, {})
    assert synthetic.model.out_channels == 1
    pairs = [("supervised", "denoise"), ("anomaly", "denoise"), ("anomaly", "intensity"), ("anomaly", "synthetic")]
    assert [network_out_channels(t, m, 3) for t, m in pairs] == [1, 3, 3, 1]


def test_3d_input_spec_has_patch_and_spacing():
    cfg = _cfg(model=UNetConfig(dim=3, width=4, depth=2), patch=(8, 16, 16), spacing=(2.0, 1.0, 1.0))
    mf = build_model_file(cfg, 1, PostprocessParams(), TRAINING, {})
    assert mf.input.to_dict() == {"channels": 1, "size": 32, "normalization": "auto", "dim": 3, "tta": False,
                                  "patch": [8, 16, 16], "spacing": [2.0, 1.0, 1.0]}
    assert "patch" not in build_model_file(_cfg(), 1, PostprocessParams(), TRAINING, {}).input.to_dict()


def test_write_and_read_round_trip(tmp_path):
    for cfg in (_cfg(), _cfg(task="anomaly", anomaly=AnomalyConfig(erode=6)),
                _cfg(model=UNetConfig(dim=3, width=4, depth=2), patch=(8, 16, 16), spacing=(2.0, 1.0, 1.0))):
        mf = build_model_file(cfg, 1, PostprocessParams(threshold=0.3, min_size=10), TRAINING, {"mode": "x"})
        path = write_model_file(mf, tmp_path)
        assert path == tmp_path / "model.json" and read_model_file(tmp_path) == mf


def test_json_keeps_the_version_1_keys_and_adds_schema_version_and_config(tmp_path):
    mf = build_model_file(_cfg(task="anomaly"), 1, PostprocessParams(), TRAINING, {"split": "val"})
    write_model_file(mf, tmp_path)
    data = json.loads((tmp_path / "model.json").read_text())
    assert list(data) == V1_KEYS[:1] + ["schema_version"] + V1_KEYS[1:] + ["anomaly", "config"]
    assert data["schema_version"] == SCHEMA_VERSION == 2 and data["format"] == "medanomaly-model"
    assert data["config"] == json.loads(json.dumps(mf.config.to_dict()))
    assert data["anomaly"] == data["config"]["anomaly"]
    assert data["training"] == {"best_epoch": 3, "best_val_score": 0.71, "val_score": TRAINING.val_score}
    assert schema.from_dict(data["config"]) == mf.config


def test_version_1_supervised_file_is_upgraded_in_memory(tmp_path):
    d = _v1(tmp_path)
    raw = json.loads((d / "model.json").read_text())
    assert "schema_version" not in raw and "config" not in raw  # as the old release wrote it
    mf = read_model_file(d)
    assert mf.schema_version == 2 and mf.task == "supervised" and mf.anomaly is None
    assert mf.model == UNetConfig(**raw["model"]) and mf.input == InputSpec(**raw["input"])
    assert mf.postprocess == PostprocessParams(**raw["postprocess"])
    assert mf.training == TrainingSummary(**raw["training"])
    assert mf.calibration == raw["calibration"] and mf.medanomaly_version == raw["medanomaly_version"]
    trained = schema.load(d / "config.json")
    assert mf.config == replace(trained, model=mf.model)  # config.json, with the network's real channels
    assert json.loads((d / "model.json").read_text()) == raw  # reading never rewrites the file


def test_version_1_anomaly_file_gets_the_map_settings_chosen_on_val_into_its_config(tmp_path):
    d = _v1(tmp_path, "anomaly")
    raw = json.loads((d / "model.json").read_text())
    mf = read_model_file(d)
    assert mf.anomaly == AnomalyConfig(**raw["anomaly"]) == mf.config.anomaly
    assert mf.config.anomaly != schema.load(d / "config.json").anomaly  # config.json has the configured ones
    assert mf.calibration["map_selection"]["selected"] is True


def test_version_1_file_without_config_json_or_optional_entries(tmp_path):
    """The oldest version 1 files: no dim/tta/precision/task/training/calibration, no config.json."""
    raw = json.loads((FIXTURES / "supervised" / "model.json").read_text())
    for key in ("task", "precision", "training", "calibration"):
        del raw[key]
    del raw["input"]["dim"], raw["input"]["tta"]
    (tmp_path / "model.json").write_text(json.dumps(raw))
    mf = read_model_file(tmp_path)
    assert (mf.task, mf.precision, mf.input.dim, mf.input.tta) == ("supervised", "auto", 2, False)
    assert mf.calibration == {} and mf.training.best_epoch == -1 and math.isnan(mf.training.best_val_score)
    assert mf.config == replace(TrainConfig(size=32, precision="auto"), model=mf.model)


def test_version_1_file_with_an_unreadable_config_json_still_loads(tmp_path, caplog):
    d = _v1(tmp_path)
    (d / "config.json").write_text(json.dumps({"lr": 1e-3, "no_such_key": 1}))
    mf = read_model_file(d)
    assert mf.config == replace(TrainConfig(size=32, precision="fp32"), model=mf.model)
    assert "config.json" in caplog.text and "no_such_key" in caplog.text


@pytest.mark.parametrize("damage, expected", [
    (None, "is not a medanomaly model directory (no model.json)"),
    ("{", "is not valid JSON"),
    (json.dumps({"format": "medanomaly-onnx"}), "format 'medanomaly-onnx', expected 'medanomaly-model'"),
    (json.dumps([1]), "format 'list'"),
    (json.dumps({"format": "medanomaly-model", "schema_version": 3}), "schema_version 3"),
])
def test_not_a_model_file_is_a_clear_error(tmp_path, damage, expected):
    if damage is not None:
        (tmp_path / "model.json").write_text(damage)
    with pytest.raises(MedanomalyError, match=re.escape(expected)):
        read_model_file(tmp_path)


def _edited(tmp_path: Path, edit) -> Path:
    mf = build_model_file(_cfg(), 1, PostprocessParams(), TRAINING, {})
    data = mf.to_dict()
    edit(data)
    (tmp_path / "model.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.pop("config"), "missing entry 'config'"),
    (lambda d: d.pop("postprocess"), "missing entry 'postprocess'"),
    (lambda d: d["input"].update(channels=3), "input.channels is 3 but model.in_channels is 1"),
    (lambda d: d["model"].update(out_channels=2), "model.out_channels is 2; a supervised model has 1"),
    (lambda d: d.update(task="segmentation"), "task 'segmentation' is not 'supervised' or 'anomaly'"),
    (lambda d: d["input"].update(normalization="zscore"), "input.normalization 'zscore'"),
    (lambda d: d.update(precision="fp8"), "precision 'fp8'"),
    (lambda d: d["postprocess"].update(treshold=0.5), "treshold"),
    (lambda d: d["model"].update(wdith=4), "wdith"),
    (lambda d: d["config"].update(lrr=1.0), "lrr"),
    (lambda d: d.update(task="anomaly"), "missing entry 'anomaly'"),
])
def test_damaged_or_edited_model_file_names_the_file_and_the_entry(tmp_path, edit, expected):
    d = _edited(tmp_path, edit)
    with pytest.raises(MedanomalyError) as exc:
        read_model_file(d)
    msg = str(exc.value)
    assert f"{d / 'model.json'} is damaged or was edited" in msg and expected in msg, msg


def test_sections_are_what_predict_follows(tmp_path):
    """A hand edit of a section (here input.tta) is read as written; config keeps the run's record."""
    mf = read_model_file(_edited(tmp_path, lambda d: d["input"].update(tta=True)))
    assert mf.input.tta and not mf.config.tta


def test_model_file_checks_its_own_sections():
    mf = build_model_file(_cfg(), 1, PostprocessParams(), TRAINING, {})
    with pytest.raises(ValueError, match="anomaly section"):
        replace(mf, anomaly=AnomalyConfig())
    with pytest.raises(ValueError, match="patch"):
        InputSpec(1, 32, "auto", dim=3)
    assert isinstance(mf, ModelFile) and mf.has_network
    intensity = build_model_file(_cfg(task="anomaly", anomaly=AnomalyConfig(method="intensity")), 1,
                                 PostprocessParams(), TRAINING, {})
    assert not intensity.has_network


SHA = "0123456789abcdef" * 4


def test_the_weights_hash_is_recorded_last_and_read_back(tmp_path):
    mf = build_model_file(_cfg(), 1, PostprocessParams(), TRAINING, {}, SHA)
    write_model_file(mf, tmp_path)
    data = json.loads((tmp_path / "model.json").read_text())
    assert list(data)[-2:] == ["config", "weights"] and data["weights"] == {"file": "model.pt", "sha256": SHA}
    assert read_model_file(tmp_path) == mf and read_model_file(tmp_path).weights_sha256 == SHA
    assert "weights" not in build_model_file(_cfg(), 1, PostprocessParams(), TRAINING, {}).to_dict()  # not recorded


@pytest.mark.parametrize("weights, expected", [
    ({"file": "model.pt", "sha256": "abc"}, "weights.sha256 'abc' is not a SHA-256"),
    ({"file": "model.pt", "sha256": SHA.upper()}, "is not a SHA-256"),
    ({"file": "../other.pt", "sha256": SHA}, "expected {'file': 'model.pt'"),
    ({"file": "model.pt", "sha256": SHA, "size": 1}, "expected {'file': 'model.pt'"),
    ("model.pt", "weights is 'model.pt'"),
])
def test_a_damaged_weights_record_is_a_clear_error(tmp_path, weights, expected):
    d = _edited(tmp_path, lambda data: data.update(weights=weights))
    with pytest.raises(MedanomalyError, match=re.escape(expected)):
        read_model_file(d)


def test_a_pending_calibration_is_refused_unless_asked_for(tmp_path):
    """Earlier releases wrote model.json before calibrating, with a placeholder threshold."""
    d = _edited(tmp_path, lambda data: data.update(calibration={"status": "pending"}))
    assert is_pending(json.loads((d / "model.json").read_text()))
    with pytest.raises(MedanomalyError, match=f"calibration was interrupted.*'medanomaly calibrate {d} --data DATA'"):
        read_model_file(d)
    assert read_model_file(d, finished=False).calibration == {"status": "pending"}  # what calibrate completes


@pytest.mark.parametrize("files, expected", [
    ({"model.pt", "checkpoint.pt", "config.json"}, "training or its calibration was interrupted.*calibrate.*--resume"),
    ({"model.pt"}, "training or its calibration was interrupted"),
    ({"checkpoint.pt", "config.json"}, "its training was interrupted \\(no model.pt\\).*--resume"),
    ({"config.json", "splits.json"}, "before its first epoch ended.*'medanomaly train DATA --out"),
    ({"splits.json"}, "before its first epoch ended"),
])
def test_an_unfinished_directory_names_the_command_that_completes_it(tmp_path, files, expected):
    for name in files:
        (tmp_path / name).write_text("{}")
    assert re.search(expected, unfinished(tmp_path))
    with pytest.raises(MedanomalyError, match=expected):
        read_model_file(tmp_path)


def test_an_unfinished_intensity_baseline_is_completed_by_calibrate(tmp_path):
    schema.save(_cfg(task="anomaly", anomaly=AnomalyConfig(method="intensity")), tmp_path / "config.json")
    assert f"'medanomaly calibrate {tmp_path} --data DATA'" in unfinished(tmp_path)
    assert unfinished(tmp_path / "absent") is None and unfinished(tmp_path.parent / "nothing") is None


def test_channel_names_recorded_and_read_back(tmp_path):
    """input.channel_names is written only where known (a one-channel file without names stays as it was)."""
    mf = build_model_file(TrainConfig(), 2, PostprocessParams(), TrainingSummary(), {}, channel_names=("FLAIR", "T1"))
    assert mf.to_dict()["input"]["channel_names"] == ["FLAIR", "T1"]
    write_model_file(mf, tmp_path)
    assert read_model_file(tmp_path).input.channel_names == ("FLAIR", "T1")
    plain = build_model_file(TrainConfig(), 1, PostprocessParams(), TrainingSummary(), {})
    assert "channel_names" not in plain.to_dict()["input"] and plain.input.channel_names == ()
    assert InputSpec.from_dict({"channels": 1, "size": 64, "normalization": "auto"}).channel_names == ()
    with pytest.raises(ValueError, match="not one name per channel"):
        InputSpec(2, 64, "auto", channel_names=("FLAIR",))


def test_check_input_names_both_sides():
    spec = InputSpec(2, 64, "auto", channel_names=("FLAIR", "T1"))
    spec.check_input(2, ("flair", "t1"))  # names compared case-insensitively
    spec.check_input(2, ())  # an input without names: its channel count alone is checked
    with pytest.raises(MedanomalyError, match=r"model expects FLAIR, T1 \(2 channels\); x.nii has FLAIR \(1\)"):
        spec.check_input(1, ("FLAIR",), "x.nii")
    with pytest.raises(MedanomalyError, match=r"model expects FLAIR, T1 \(2 channels\); x has T1, FLAIR \(2\)"):
        spec.check_input(2, ("T1", "FLAIR"), "x")
    with pytest.raises(MedanomalyError, match=r"model expects 1-channel images; x has 3 channels"):
        InputSpec(1, 64, "auto").check_input(3, (), "x")


def test_several_labels_recorded_with_their_post_processing_and_read_back(tmp_path):
    posts = (PostprocessParams(threshold=0.3, min_size=10), PostprocessParams(threshold=0.6))
    mf = build_model_file(_cfg(labels="1=edema,2=enhancing"), 2, PostprocessParams(), TRAINING, {}, label_posts=posts)
    assert mf.model.out_channels == 3 == network_out_channels("supervised", "denoise", 2, 2)  # background + 2
    write_model_file(mf, tmp_path)
    data = json.loads((tmp_path / "model.json").read_text())
    assert data["labels"] == [{"value": 1, "name": "edema", "postprocess": posts[0].to_dict()},
                              {"value": 2, "name": "enhancing", "postprocess": posts[1].to_dict()}]
    back = read_model_file(tmp_path)
    assert back == mf and back.label_posts == posts and [lb.name for lb in back.labels] == ["edema", "enhancing"]
    data["model"]["out_channels"] = 1  # a network of one logit cannot be a model of two labels
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(MedanomalyError, match="model.out_channels is 1; a supervised model has 3"):
        read_model_file(tmp_path)


def test_binary_and_one_label_model_files_have_no_labels_entry(tmp_path):
    for cfg in (_cfg(), _cfg(labels="1=lesion")):
        mf = build_model_file(cfg, 1, PostprocessParams(), TRAINING, {})
        assert mf.labels == () and mf.model.out_channels == 1 and "labels" not in mf.to_dict()

"""Tests for medanomaly.config.schema: defaults, JSON files, dotted overrides, errors, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medanomaly.config.schema import (
    OPTIMIZERS,
    TrainConfig,
    default,
    from_dict,
    load,
    pretrain_budget,
    rule_of,
    save,
    with_changes,
)
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.augment import AugmentConfig
from medanomaly.models.unet import UNetConfig


def test_defaults_valid():
    cfg = TrainConfig()
    assert cfg.optimizer in OPTIMIZERS
    assert isinstance(cfg.model, UNetConfig) and isinstance(cfg.augment, AugmentConfig)
    assert load(None) == cfg
    assert load(None, {}) == cfg
    assert from_dict({}) == cfg
    assert from_dict(cfg.to_dict()) == cfg


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0  # type: ignore[misc]


def test_overrides_plain_and_dotted():
    cfg = load(None, {"model.width": 8, "lr": 0.1, "augment.p_flip": 0.0})
    assert cfg.model.width == 8
    assert cfg.lr == 0.1
    assert cfg.augment.p_flip == 0.0
    assert cfg.model.depth == TrainConfig().model.depth  # the rest of the section keeps its defaults
    assert cfg.batch_size == TrainConfig().batch_size


def test_dotted_override_list_becomes_tuple():
    cfg = load(None, {"augment.scale": [0.9, 1.1]})
    assert cfg.augment.scale == (0.9, 1.1)


def test_none_overrides_ignored():
    assert load(None, {"lr": None, "model.width": None, "optimizer": None}) == TrainConfig()


def test_unknown_key_lists_valid_keys():
    with pytest.raises(MedanomalyError) as info:
        load(None, {"learning_rate": 0.1})
    msg = str(info.value)
    assert "learning_rate" in msg
    for key in ("lr", "batch_size", "model", "augment", "optimizer"):
        assert key in msg


def test_unknown_nested_key_lists_valid_keys():
    with pytest.raises(MedanomalyError) as info:
        load(None, {"model.channels": 8})
    msg = str(info.value)
    assert "channels" in msg and "width" in msg and "depth" in msg


@pytest.mark.parametrize("key", ["bogus.width", "lr.x"])
def test_unknown_dotted_section_is_a_medanomaly_error(key):
    with pytest.raises(MedanomalyError):
        load(None, {key: 1})


@pytest.mark.parametrize("changes", [
    {"optimizer": "rmsprop"}, {"loss": "focal"}, {"task": "segmentation"}, {"precision": "fp8"},
    {"size": 8}, {"batch_size": 0}, {"epochs": 0},
])
def test_invalid_values(changes):
    with pytest.raises(MedanomalyError):
        load(None, changes)
    with pytest.raises(MedanomalyError):
        TrainConfig(**changes)


def test_bad_optimizer_lists_valid():
    with pytest.raises(MedanomalyError) as info:
        load(None, {"optimizer": "rmsprop"})
    for name in OPTIMIZERS:
        assert name in str(info.value)


def test_save_load_round_trip(tmp_path):
    cfg = TrainConfig(
        size=64, lr=0.01, optimizer="sgd", loss="dice", seed=7, channels_last=False,
        model=UNetConfig(in_channels=3, width=8, depth=3, norm="group"),
        augment=AugmentConfig(scale=(0.9, 1.2), gamma=(0.8, 1.3), p_noise=0.0),
    )
    path = tmp_path / "config.json"
    save(cfg, path)
    data = json.loads(path.read_text())
    assert data["augment"]["scale"] == [0.9, 1.2]  # tuples are lists in JSON ...
    loaded = load(path)
    assert loaded == cfg  # ... and tuples again once loaded
    assert isinstance(loaded.augment.scale, tuple)


def test_default_round_trip(tmp_path):
    save(TrainConfig(), tmp_path / "c.json")
    assert load(tmp_path / "c.json") == TrainConfig()


def test_partial_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.05, "model": {"width": 16}, "augment": {"enabled": False}}))
    cfg = load(path, {"model.depth": 2, "lr": 0.2})
    assert cfg.lr == 0.2  # overrides beat the file
    assert cfg.model.width == 16 and cfg.model.depth == 2
    assert cfg.model.norm == TrainConfig().model.norm
    assert cfg.augment.enabled is False and cfg.augment.p_flip == AugmentConfig().p_flip


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(MedanomalyError, match="epochz"):
        load(path)


@pytest.mark.parametrize("text", ["{not json", "", '{"lr": 0.1,}'])
def test_invalid_json_file(tmp_path, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(MedanomalyError, match="cannot read config file"):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(MedanomalyError, match="cannot read config file"):
        load(tmp_path / "absent.json")


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(MedanomalyError):
        load(path)


def test_with_changes():
    cfg = with_changes(TrainConfig(), lr=0.5)
    assert cfg.lr == 0.5 and cfg.optimizer == TrainConfig().optimizer
    with pytest.raises(MedanomalyError):
        with_changes(TrainConfig(), optimizer="nope")


def test_default_reads_dotted_keys():
    cfg = TrainConfig()
    assert default("max_minutes") == cfg.max_minutes and default("model.width") == cfg.model.width
    assert default("anomaly.target_fpr") == cfg.anomaly.target_fpr and default("augment.enabled") is True


def test_pretrain_budget_splits_time_and_epochs():
    cfg = with_changes(TrainConfig(), max_minutes=10.0, epochs=7, pretrain_share=0.3)
    assert pretrain_budget(cfg) == (10.0 * 0.3, 10.0 * (1 - 0.3), 2)
    assert pretrain_budget(with_changes(cfg, epochs=1))[2] == 1  # at least one pretraining epoch


@pytest.mark.parametrize(("content", "says"), [
    ({"lr": "fast"}, r"^config file .*c\.json: lr must be a number in \(0, 10\] \(got 'fast'\)$"),
    ({"batch_size": 2.5}, r"batch_size must be an integer in \[1, 4096\] \(got 2\.5\)"),
    ({"epochs": True}, r"epochs must be an integer in \[1, 1000000\] \(got True\)"),
    ({"model": None}, r"model must be an object of model settings \(got None\)"),
    ({"augment": []}, r"augment must be an object of augment settings \(got \(\)\)"),
    ({"model": {"width": 0}, "lr": -1}, r"model\.width must be .* \(got 0\); lr must be .* \(got -1\)"),
])
def test_file_values_follow_their_rules_and_errors_name_the_file(tmp_path, content, says) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(MedanomalyError, match=says):
        load(path)


def test_override_values_follow_their_rules() -> None:
    with pytest.raises(MedanomalyError, match=r"^anomaly\.noise_std must be a number in \[0, 100\] \(got -1\)$"):
        load(None, {"anomaly.noise_std": -1})
    with pytest.raises(MedanomalyError, match=r"synthetic_lesions must be a number in \[0, 1\] \(got 2\)"):
        with_changes(TrainConfig(), synthetic_lesions=2)


@pytest.mark.parametrize(("raw", "says"), [
    (b'{"lr": "\xe9"}', r"it is not UTF-8 text \(byte 0xe9 at position 8\); save it as UTF-8 JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "it is not valid JSON"),
    (b"x" * ((1 << 20) + 1), r"1048577 bytes is too large for one \(at most 1048576\)"),
    (b'"lr"', "must hold a JSON object of settings .*not a JSON str"),
])
def test_unreadable_config_files_are_one_clear_line(tmp_path, raw, says) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(raw)
    with pytest.raises(MedanomalyError, match=says):
        load(path)


def test_a_byte_order_mark_is_fine(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"lr": 0.01}).encode())  # as Windows editors save UTF-8
    assert load(path).lr == 0.01


def test_rule_of_reaches_into_the_sections() -> None:
    assert rule_of("model.width").ge == 1 and rule_of("lr").gt == 0 and rule_of("model").section is UNetConfig

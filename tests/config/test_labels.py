"""Tests for medanomaly.config.labels: the ``labels`` setting (value=name pairs), dataset.json's
labels (nnU-Net v2 and v1/MSD), the model file's per-label record, and what TrainConfig refuses
with several labels (3D, the anomaly task...)."""

from __future__ import annotations

import pytest

from medanomaly.config.labels import (
    Label,
    file_part,
    from_dataset_json,
    labels_record,
    labels_text,
    network_classes,
    parse_labels,
    read_labels_record,
    several,
)
from medanomaly.config.rules import ConfigError
from medanomaly.config.schema import TrainConfig, from_dict
from medanomaly.config.sections import PostprocessParams, UNetConfig

TWO = (Label(1, "edema"), Label(2, "enhancing"))


def test_the_setting_is_parsed_in_value_order_with_spaces_allowed():
    assert parse_labels(" 2 = enhancing , 1=edema") == TWO
    assert parse_labels(None) == ()
    assert labels_text(TWO) == "1=edema,2=enhancing" and labels_text(()) is None


def test_one_label_or_none_is_binary_two_or_more_a_softmax_of_labels_plus_background():
    assert (several(None), several("1=lesion"), several("1=a,2=b")) == (False, False, True)
    assert (network_classes(None), network_classes("3=lesion"), network_classes("1=a,2=b,4=c")) == (1, 1, 4)


@pytest.mark.parametrize(("text", "says"), [
    ("1=a,1=b", "label value 1 is given twice"),
    ("1=edema,2=EDEMA", "label name 'edema' is given twice"),
    ("1=a,300=b", "label value 300 is not in 1..255"),
])
def test_bad_label_sets_are_a_config_error_naming_the_setting(text, says):
    with pytest.raises(ConfigError, match=f"^labels: {says}"):
        TrainConfig(labels=text)


def test_the_rule_refuses_what_is_no_list_of_pairs():
    for bad in ("1=a;2=b", "edema", "0=background,1=a", "1=", "=a", ["1=a", "2=b"], 3):
        with pytest.raises(ConfigError, match="labels must be value=name pairs"):
            from_dict({"labels": bad})


def test_dataset_json_v2_and_v1_give_the_same_labels_background_left_out():
    assert from_dataset_json({"background": 0, "edema": 1, "enhancing": 2}, "d.json") == TWO
    assert from_dataset_json({"0": "background", "2": "enhancing", "1": "edema"}, "d.json") == TWO


@pytest.mark.parametrize("labels", [{"background": 0, "tumor": [1, 2]}, ["edema"], {"edema": "one"}])
def test_dataset_json_labels_of_another_form_are_refused_naming_the_file(labels):
    with pytest.raises(ConfigError, match="^d.json: "):
        from_dataset_json(labels, "d.json")


def test_several_labels_are_refused_where_not_supported_yet():
    with pytest.raises(ConfigError, match=r"not yet supported with --dim 3"):
        TrainConfig(labels="1=a,2=b", model=UNetConfig(dim=3))
    with pytest.raises(ConfigError, match=r"not yet supported with --task anomaly"):
        TrainConfig(labels="1=a,2=b", task="anomaly")
    assert TrainConfig(labels="1=lesion", model=UNetConfig(dim=3)).labels == "1=lesion"  # one label: binary


def test_file_parts_are_safe_names():
    assert [file_part(Label(1, "edema")), file_part(Label(2, "NCR/NET core")), file_part(Label(3, "//"))] == \
        ["edema", "NCR-NET-core", "3"]


def test_the_model_file_record_round_trips_and_refuses_damage():
    posts = [PostprocessParams(threshold=0.3, min_size=10), PostprocessParams()]
    record = labels_record(TWO, posts)
    assert record[0] == {"value": 1, "name": "edema", "postprocess": posts[0].to_dict()}
    assert read_labels_record(record) == (TWO, tuple(posts))
    for bad in (record[:1], [record[1], record[0]], [{**record[0], "value": "1"}, record[1]], "edema"):
        with pytest.raises(ValueError):
            read_labels_record(bad)

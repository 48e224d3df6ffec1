"""Bad ``--labels`` values and damaged label records, refused cleanly (exit 2, one message, nothing
written): a text that is no list of value=name pairs, a value given twice, several labels where
they are not supported yet (3D, the anomaly task), a model file whose labels were edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medanomaly.config.model_file import TrainingSummary, build_model_file, write_model_file
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import PostprocessParams, UNetConfig
from medanomaly.models.unet import UNet


@pytest.fixture
def world(tmp_path: Path, multilabel_phantoms) -> tuple[Path, Path]:
    return multilabel_phantoms(tmp_path / "data"), tmp_path / "model"


def test_bad_labels_not_value_name_pairs(cli, world, tiny_train_flags) -> None:
    data, out = world
    cli.refuses("train", data, "--out", out, *tiny_train_flags, "--labels", "edema,enhancing",
                says=r"argument --labels: must be value=name pairs of the labels, e\.g\. 1=edema,2=enhancing",
                untouched=(data, out))


def test_bad_labels_value_given_twice(cli, world, tiny_train_flags) -> None:
    data, out = world
    cli.refuses("train", data, "--out", out, *tiny_train_flags, "--labels", "1=edema,1=enhancing",
                says=r"labels: label value 1 is given twice", untouched=(data, out))


def test_bad_labels_several_in_3d(cli, world, tiny_train_flags) -> None:
    data, out = world
    cli.refuses("train", data, "--out", out, *tiny_train_flags, "--dim", "3", "--labels", "1=edema,2=enhancing",
                says=r"several labels \(1=edema,2=enhancing\) are not yet supported with --dim 3", untouched=(data, out))


def test_bad_labels_several_with_the_anomaly_task(cli, world, tiny_train_flags) -> None:
    data, out = world
    cli.refuses("train", data, "--out", out, *tiny_train_flags, "--task", "anomaly", "--labels", "1=a,2=b",
                says=r"not yet supported with --task anomaly", untouched=(data, out))


def test_bad_labels_edited_in_the_model_file(cli, tmp_path: Path, multilabel_phantoms) -> None:
    data = multilabel_phantoms(tmp_path / "data")
    model = tmp_path / "model"
    cfg = TrainConfig(size=32, model=UNetConfig(width=4, depth=2), precision="fp32", labels="1=edema,2=enhancing")
    mf = build_model_file(cfg, 1, PostprocessParams(), TrainingSummary(), {})
    model.mkdir()
    write_model_file(mf, model)
    torch.save(UNet(mf.model).state_dict(), model / "model.pt")
    record = json.loads((model / "model.json").read_text())
    record["labels"] = record["labels"][:1]  # one label left: the network has three outputs
    (model / "model.json").write_text(json.dumps(record))
    out = tmp_path / "pred"
    cli.refuses("predict", model, data / "case3", "--out", out,
                says=r"model\.json is damaged or was edited \(labels is .*expected a list of two or more",
                untouched=(data, model, out))

"""Tests for medanomaly.train.semisup: the mean teacher (EMA updates, ramp-up, consistency) and the
pretraining stage of train --unlabelled. The unlabelled sources themselves: tests/train/test_fewlabels.py."""

from __future__ import annotations

import contextlib
import json
import logging
import math

import pytest
import torch

from medanomaly.apps.cli import main
from medanomaly.models.unet import UNet, UNetConfig
from medanomaly.train.semisup import DEFAULT_UNLABELLED_METHOD, PRETRAIN_DONE, MeanTeacher, pretrain_finished


def _tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(width=4, depth=2))


def test_teacher_is_the_exponential_moving_average_of_the_student():
    student = _tiny()
    mt = MeanTeacher(student, decay=0.99)
    before = [p.clone() for p in mt.teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    mt.update(student, step=9)  # a = min(0.99, 1 - 1/10) = 0.9
    for t, b, s in zip(mt.teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    mt.update(student, step=0)  # a = 0: the teacher starts as the student
    for t, s in zip(mt.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    assert not any(p.requires_grad for p in mt.teacher.parameters())


def test_consistency_weight_ramps_up():
    mt = MeanTeacher(_tiny(), weight=2.0, rampup_steps=100)
    assert mt.ramp(0) == pytest.approx(2.0 * math.exp(-5)) and mt.ramp(100) == 2.0 and mt.ramp(500) == 2.0
    assert mt.ramp(50) < mt.ramp(80)


def test_consistency_is_zero_when_student_equals_teacher_without_noise():
    student = _tiny().eval()
    mt = MeanTeacher(student, noise_std=0.0)
    x = torch.rand(2, 1, 16, 16)
    loss = mt.consistency(student, x, step=1000, gen=torch.Generator().manual_seed(0),
                          autocast=contextlib.nullcontext)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)


def test_unlabelled_default_pretrains_on_labelled_and_unlabelled_then_fine_tunes(labelled_cases, tmp_path, caplog,
                                                                                 two_epoch_train_flags):
    """The default remedy (auto -> pretrain): a denoising model of train + unlabelled cases is trained
    first in MODEL/pretrain for pretrain_share of the budget; the supervised run starts from it."""
    splits = tmp_path / "few.json"
    splits.write_text(json.dumps({"train": ["a"], "val": ["c"], "test": ["d"], "unlabelled": ["b"]}))
    out = tmp_path / "m"
    with caplog.at_level(logging.INFO, logger="medanomaly"):
        assert main(["-q", "train", str(labelled_cases), "--out", str(out), "--splits", str(splits),
                     "--unlabelled", "unlabelled", "--max-minutes", "1", *two_epoch_train_flags]) == 0
    assert "pretrain" in DEFAULT_UNLABELLED_METHOD
    pre = json.loads((out / "pretrain-splits.json").read_text())
    assert pre["train"] == ["a", "b"] and pre["val"] == ["c"]
    assert json.loads((out / "pretrain" / "config.json").read_text())["task"] == "anomaly"
    # the stage is only the --init of the supervised run: trained to its end, never calibrated
    assert (out / "pretrain" / "finished.json").is_file() and not (out / "pretrain" / "model.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["init"] == str(out / "pretrain") and cfg["max_minutes"] == pytest.approx(0.7)
    assert json.loads((out / "pretrain" / "config.json").read_text())["max_minutes"] == pytest.approx(0.3)
    assert "--init" in caplog.text and "loaded" in caplog.text
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "teacher" not in state  # pretrain alone: no mean teacher


def test_a_finished_pretraining_is_not_run_again(labelled_cases, tmp_path, two_epoch_train_flags):
    """A run killed after its pretraining stage, started again: the stage's finished marker (or the
    model.json of runs made before the marker existed) skips it; the supervised part starts from it."""
    splits = tmp_path / "few.json"
    splits.write_text(json.dumps({"train": ["a"], "val": ["c"], "test": ["d"], "unlabelled": ["b"]}))
    out = tmp_path / "m"
    flags = ["--splits", str(splits), "--unlabelled", "unlabelled", *two_epoch_train_flags]
    assert main(["-q", "train", str(labelled_cases), "--out", str(out), *flags]) == 0
    stage = (out / "pretrain" / "checkpoint.pt").read_bytes()
    for name in ("model.json", "model.pt", "checkpoint.pt", "metrics.csv"):
        (out / name).unlink()
    assert main(["-q", "train", str(labelled_cases), "--out", str(out), *flags]) == 0
    assert (out / "pretrain" / "checkpoint.pt").read_bytes() == stage
    assert json.loads((out / "config.json").read_text())["init"] == str(out / "pretrain")
    (out / "pretrain" / PRETRAIN_DONE).unlink()
    assert not pretrain_finished(out / "pretrain")
    (out / "pretrain" / "model.json").write_text("{}")
    assert pretrain_finished(out / "pretrain")

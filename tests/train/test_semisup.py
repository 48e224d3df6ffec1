"""Mean teacher: EMA updates, ramp-up, consistency, and train --unlabelled."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.apps.cli import main
from medanomaly.models.unet import UNet, UNetConfig
from medanomaly.train.semisup import PRETRAIN_DONE, MeanTeacher, pretrain_finished


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


def _phantoms(root: Path, cases: list[str], with_masks: bool = True) -> None:
    rng = np.random.default_rng(abs(hash(root.name)) % 2**32)
    for c in cases:
        d = root / c
        d.mkdir(parents=True)
        for k in range(3):
            img = (rng.random((32, 32)) * 80 + 40).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            img[10:18, 10:18], mask[10:18, 10:18] = 220, 255
            PILImage.fromarray(img).save(d / f"{c}_{k}.png")
            if with_masks:
                PILImage.fromarray(mask).save(d / f"{c}_{k}_mask.png")


TINY = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "2", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture()
def labelled(tmp_path) -> Path:
    _phantoms(tmp_path / "data", ["a", "b", "c", "d"])
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}))
    return tmp_path / "data"


def test_train_with_an_unlabelled_folder(labelled, tmp_path):
    _phantoms(tmp_path / "unl", ["u1", "u2"], with_masks=False)
    out = tmp_path / "m"
    assert main(["-q", "train", str(labelled), "--out", str(out), "--unlabelled", str(tmp_path / "unl"),
                 "--unlabelled-method", "mean-teacher", *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["unlabelled"] == str(tmp_path / "unl")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "teacher" in state and set(state["teacher"]) == set(state["model"])
    assert main(["-q", "train", str(labelled), "--out", str(out), "--resume", "--epochs", "3"]) == 0


@pytest.mark.parametrize("kind", ["empty-folder", "labelled-images", "unknown-split"])
def test_bad_unlabelled_sources_are_clear_errors(kind, labelled, tmp_path, capsys):
    given = {"empty-folder": tmp_path / "empty", "labelled-images": labelled, "unknown-split": "nope"}[kind]
    (tmp_path / "empty").mkdir()
    rc = main(["-q", "train", str(labelled), "--out", str(tmp_path / "m"), "--unlabelled", str(given), *TINY])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "Traceback" not in err
    assert {"empty-folder": "no images found", "labelled-images": "labelled training images",
            "unknown-split": "neither a folder nor a split"}[kind] in err


def test_unlabelled_can_name_a_list_of_the_splits_file(labelled, tmp_path, caplog):
    """--unlabelled NAME takes the cases of the list NAME in --splits: their images, masks ignored."""
    import logging

    splits = tmp_path / "few.json"
    splits.write_text(json.dumps({"train": ["a"], "val": ["c"], "test": ["d"], "unlabelled": ["b"]}))
    with caplog.at_level(logging.INFO, logger="medanomaly"):
        assert main(["-q", "train", str(labelled), "--out", str(tmp_path / "m"), "--splits", str(splits),
                     "--unlabelled", "unlabelled", "--unlabelled-method", "mean-teacher", *TINY]) == 0
    assert "mean teacher on 3 unlabelled slices" in caplog.text  # case b: 3 slices
    assert json.loads((tmp_path / "m" / "splits.json").read_text())["unlabelled"] == ["b"]


def test_unlabelled_default_pretrains_on_labelled_and_unlabelled_then_fine_tunes(labelled, tmp_path, caplog):
    """The default remedy (auto -> pretrain): a denoising model of train + unlabelled cases is trained
    first in MODEL/pretrain for pretrain_share of the budget; the supervised run starts from it."""
    import logging

    from medanomaly.train.semisup import DEFAULT_UNLABELLED_METHOD

    splits = tmp_path / "few.json"
    splits.write_text(json.dumps({"train": ["a"], "val": ["c"], "test": ["d"], "unlabelled": ["b"]}))
    out = tmp_path / "m"
    with caplog.at_level(logging.INFO, logger="medanomaly"):
        assert main(["-q", "train", str(labelled), "--out", str(out), "--splits", str(splits),
                     "--unlabelled", "unlabelled", "--max-minutes", "1", *TINY]) == 0
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


def test_a_finished_pretraining_is_not_run_again(labelled, tmp_path):
    """A run killed after its pretraining stage, started again: the stage's finished marker (or the
    model.json of runs made before the marker existed) skips it; the supervised part starts from it."""
    splits = tmp_path / "few.json"
    splits.write_text(json.dumps({"train": ["a"], "val": ["c"], "test": ["d"], "unlabelled": ["b"]}))
    out = tmp_path / "m"
    flags = ["--splits", str(splits), "--unlabelled", "unlabelled", *TINY]
    assert main(["-q", "train", str(labelled), "--out", str(out), *flags]) == 0
    stage = (out / "pretrain" / "checkpoint.pt").read_bytes()
    for name in ("model.json", "model.pt", "checkpoint.pt", "metrics.csv"):
        (out / name).unlink()
    assert main(["-q", "train", str(labelled), "--out", str(out), *flags]) == 0
    assert (out / "pretrain" / "checkpoint.pt").read_bytes() == stage
    assert json.loads((out / "config.json").read_text())["init"] == str(out / "pretrain")
    (out / "pretrain" / PRETRAIN_DONE).unlink()
    assert not pretrain_finished(out / "pretrain")
    (out / "pretrain" / "model.json").write_text("{}")
    assert pretrain_finished(out / "pretrain")

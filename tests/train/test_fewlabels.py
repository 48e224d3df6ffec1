"""Tests for medanomaly.train.fewlabels: what a supervised run adds to few labelled slices, and the
checks made before any minute is spent: extra image/mask pairs (``--extra``, e.g. from ``medanomaly
synthesize``), unlabelled images (``--unlabelled``: a folder or a list of the split file) with the
mean teacher, and synthetic-lesion statistics. Tiny 32x32 phantoms; the CLI runs train for seconds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.apps.cli import main
from medanomaly.config import schema as config
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import discover
from medanomaly.data.slices import load_slices
from medanomaly.train.fewlabels import build_extras, check_extra, load_extra, unlabelled_samples
from medanomaly.train.run import new_model

CPU = torch.device("cpu")


def _cfg(**changes):
    return config.load(None, {"size": 32, "model.width": 4, "model.depth": 2, "precision": "fp32", **changes})


def _parts(data: Path) -> dict[str, list]:
    splits = json.loads((data / "splits.json").read_text())
    samples = discover(data)
    return {k: [s for s in samples if s.case in v] for k, v in splits.items()}


# --- --extra ----------------------------------------------------------------------------------------

def test_train_accepts_extra_pairs(synthesized, tmp_path, caplog):
    data, out = synthesized
    caplog.set_level(logging.INFO, logger="medanomaly")
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--extra", str(out), "--size", "32",
               "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4", "--max-minutes", "0.05",
               "--device", "cpu"])
    assert rc == 0
    text = caplog.text
    assert "adding 5 extra pairs (5 slices)" in text
    assert "training on 13 slices" in text  # 2 train cases x 4 slices + 5 synthetic
    assert json.loads((tmp_path / "m" / "config.json").read_text())["extra"] == str(out)


def test_extra_of_another_size_is_a_clear_error(synthesized, tmp_path, capsys):
    data, _ = synthesized
    bad = tmp_path / "bad"
    for sub in ("images", "masks"):
        (bad / sub).mkdir(parents=True)
    PILImage.fromarray(np.full((16, 16), 90, np.uint8)).save(bad / "images" / "x1.png")
    PILImage.fromarray(np.full((16, 16), 255, np.uint8)).save(bad / "masks" / "x1.png")
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--extra", str(bad), "--size", "32",
               "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "x1.png" in err and "16x16" in err and "--size 32" in err
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--extra", str(tmp_path / "nope"),
               "--size", "32", "--device", "cpu"])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_extra_made_from_val_images_is_refused(synthesized, tmp_path, capsys):
    data, out = synthesized  # synthesized with case0, case1 as train; here case1 validates
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["case0", "case2"], "val": ["case1"], "test": []}))
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--extra", str(out), "--splits",
               str(tmp_path / "splits.json"), "--size", "32", "--device", "cpu"])
    assert rc == 2 and "val/test" in capsys.readouterr().err


def test_extra_pairs_are_loaded_as_cases_of_their_own(labelled_cases, case_phantoms, tmp_path):
    case_phantoms(tmp_path / "extra", ["e1"])  # 3 pairs
    extra = load_extra(_cfg(extra=str(tmp_path / "extra")), labelled_cases, _parts(labelled_cases), 1, False)
    assert extra.images.shape == (3, 1, 32, 32) and extra.masks is not None
    assert extra.cases == ["extra:e1"] * 3 and bool(extra.lesion.all())


def test_extra_pairs_are_checked_against_the_data(labelled_cases, case_phantoms, tmp_path):
    parts = _parts(labelled_cases)
    with pytest.raises(MedanomalyError, match="holds images of the data folder"):
        load_extra(_cfg(extra=str(labelled_cases / "a")), labelled_cases, parts, 1, False)
    case_phantoms(tmp_path / "extra", ["e1"])
    with pytest.raises(MedanomalyError, match="has 1 channels but the training images have 3"):
        load_extra(_cfg(extra=str(tmp_path / "extra")), labelled_cases, parts, 3, False)
    with pytest.raises(MedanomalyError, match="has 1 channels but the training images have 3"):  # before loading
        check_extra(_cfg(extra=str(tmp_path / "extra")), labelled_cases, parts, channels=3)
    assert len(check_extra(_cfg(extra=str(tmp_path / "extra")), labelled_cases, parts)) == 3
    case_phantoms(tmp_path / "bare", ["b1"], with_masks=False)
    with pytest.raises(MedanomalyError, match="holds no image/mask pair"):
        load_extra(_cfg(extra=str(tmp_path / "bare")), labelled_cases, parts, 1, False)


# --- --unlabelled -------------------------------------------------------------------------------------

def test_train_with_an_unlabelled_folder(labelled_cases, tmp_path, case_phantoms, two_epoch_train_flags):
    case_phantoms(tmp_path / "unl", ["u1", "u2"], with_masks=False)
    out = tmp_path / "m"
    assert main(["-q", "train", str(labelled_cases), "--out", str(out), "--unlabelled", str(tmp_path / "unl"),
                 "--unlabelled-method", "mean-teacher", *two_epoch_train_flags]) == 0
    assert json.loads((out / "config.json").read_text())["unlabelled"] == str(tmp_path / "unl")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "teacher" in state and set(state["teacher"]) == set(state["model"])
    assert main(["-q", "train", str(labelled_cases), "--out", str(out), "--resume", "--epochs", "3"]) == 0


@pytest.mark.parametrize("kind", ["empty-folder", "labelled-images", "unknown-split"])
def test_bad_unlabelled_sources_are_clear_errors(kind, labelled_cases, tmp_path, capsys, two_epoch_train_flags):
    given = {"empty-folder": tmp_path / "empty", "labelled-images": labelled_cases, "unknown-split": "nope"}[kind]
    (tmp_path / "empty").mkdir()
    rc = main(["-q", "train", str(labelled_cases), "--out", str(tmp_path / "m"), "--unlabelled", str(given),
               *two_epoch_train_flags])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "Traceback" not in err
    assert {"empty-folder": "no images found", "labelled-images": "labelled training images",
            "unknown-split": "neither a folder nor a split"}[kind] in err


def test_unlabelled_can_name_a_list_of_the_splits_file(labelled_cases, tmp_path, caplog, two_epoch_train_flags):
    """--unlabelled NAME takes the cases of the list NAME in --splits: their images, masks ignored."""
    splits = tmp_path / "few.json"
    splits.write_text(json.dumps({"train": ["a"], "val": ["c"], "test": ["d"], "unlabelled": ["b"]}))
    with caplog.at_level(logging.INFO, logger="medanomaly"):
        assert main(["-q", "train", str(labelled_cases), "--out", str(tmp_path / "m"), "--splits", str(splits),
                     "--unlabelled", "unlabelled", "--unlabelled-method", "mean-teacher", *two_epoch_train_flags]) == 0
    assert "mean teacher on 3 unlabelled slices" in caplog.text  # case b: 3 slices
    assert json.loads((tmp_path / "m" / "splits.json").read_text())["unlabelled"] == ["b"]


def test_unlabelled_samples_from_a_folder_or_a_split(labelled_cases, case_phantoms, tmp_path):
    train_images = [s.image for s in _parts(labelled_cases)["train"]]
    case_phantoms(tmp_path / "unl", ["u1"], with_masks=False)
    found = unlabelled_samples(_cfg(unlabelled=str(tmp_path / "unl")), labelled_cases, train_images)
    assert [s.image.name for s in found] == ["u1_0.png", "u1_1.png", "u1_2.png"]
    by_split = unlabelled_samples(_cfg(unlabelled="test"), labelled_cases, train_images)  # DATA/splits.json
    assert {s.case for s in by_split} == {"d"} and len(by_split) == 3
    given = {"train": ["a", "b"], "val": ["c"], "test": [], "more": ["c", "d"]}  # --splits wins over DATA's
    more = unlabelled_samples(_cfg(unlabelled="more"), labelled_cases, train_images, given)
    assert {s.case for s in more} == {"c", "d"}
    with pytest.raises(MedanomalyError, match="holds 3 of the labelled training images"):
        unlabelled_samples(_cfg(unlabelled=str(labelled_cases / "a")), labelled_cases, train_images)


def test_extras_are_built_only_where_asked_for(labelled_cases):
    train_set = load_slices(_parts(labelled_cases)["train"], 32)
    model = new_model(_cfg(), 1, CPU)
    none = build_extras(_cfg(), labelled_cases, train_set, model, None, False)
    assert (none.lesion_stats, none.teacher, none.unlabelled) == (None, None, None)
    stats = build_extras(_cfg(synthetic_lesions=0.5), labelled_cases, train_set, model, None, False).lesion_stats
    assert stats is not None and stats.mean > 0  # from the real lesions (bright 8x8 squares)
    teacher = build_extras(_cfg(unlabelled="test", unlabelled_method="mean-teacher", batch_size=2), labelled_cases,
                           train_set, model, None, False)
    assert teacher.teacher is not None and len(teacher.unlabelled) == 3
    assert all(torch.equal(a, b) for a, b in zip(teacher.teacher.teacher.parameters(), model.parameters()))
    pretrain = build_extras(_cfg(unlabelled="test", unlabelled_method="pretrain"), labelled_cases, train_set,
                            model, None, False)
    assert pretrain.teacher is None  # pretraining is a stage of the run, not an extra of each step
    anomaly = build_extras(_cfg(task="anomaly", synthetic_lesions=0.5), labelled_cases, train_set, model, None, False)
    assert (anomaly.lesion_stats, anomaly.teacher) == (None, None)

"""Tests for medanomaly.calibrate.val: the val split of a model directory, scored as predict scores
it (the model read back from the directory): one entry per image for a 2D model, one per volume
(stacked slices) for a 3D model. Tiny 32x32 phantoms, random-weight networks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.calibrate.val import val_predictions, val_samples
from medanomaly.infer.predictor import Predictor
from medanomaly.io import read_image, read_mask


@pytest.fixture
def data(tmp_path, labelled_phantoms) -> Path:
    """RGB phantoms (val: case2, 3 labelled slices) plus one val slice without a mask."""
    root = labelled_phantoms(tmp_path / "data", rgb=True)
    grey = np.random.default_rng(7).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    PILImage.fromarray(grey).save(root / "case2" / "case2_9.png")
    return root


def _with_splits(out: Path, data: Path) -> Path:
    shutil.copy(data / "splits.json", out / "splits.json")
    return out


def test_val_samples_are_the_val_cases_labelled_or_all(tmp_path, data):
    _with_splits(tmp_path, data)
    labelled = val_samples(tmp_path, data)
    assert [s.image.name for s in labelled] == ["case2_0.png", "case2_1.png", "case2_2.png"]
    assert all(s.case == "case2" and s.mask is not None for s in labelled)
    every = val_samples(tmp_path, data, labelled_only=False)
    assert [s.image.name for s in every] == ["case2_0.png", "case2_1.png", "case2_2.png", "case2_9.png"]
    assert every[-1].mask is None


def test_2d_model_gives_one_entry_per_image_scored_as_predict_scores_it(tmp_path, data, make_model_dir):
    out = _with_splits(make_model_dir(tmp_path / "m", in_channels=3), data)
    res = val_predictions(out, data, "cpu", labelled_only=False, progress=False)
    assert set(res) == {"scores", "truths", "cases", "images", "labelled"}
    assert res["cases"] == ["case2"] * 4 and res["labelled"] == [True, True, True, False]
    predictor = Predictor(out)
    for k, s in enumerate(val_samples(out, data, labelled_only=False)):
        img = read_image(s.image)
        np.testing.assert_array_equal(res["scores"][k], predictor.scores(img))
        np.testing.assert_array_equal(res["images"][k], img.array.mean(axis=0))  # grey: channels averaged
        truth = read_mask(s.mask, like=img) if s.mask else np.zeros((32, 32), bool)
        np.testing.assert_array_equal(res["truths"][k], truth)
        assert res["scores"][k].dtype == np.float32 and res["truths"][k].dtype == bool
    assert not res["truths"][3].any()  # no mask: all False
    assert len(val_predictions(out, data, "cpu", labelled_only=True, progress=False)["scores"]) == 3


def test_3d_model_gives_one_entry_per_stacked_volume(tmp_path, labelled_phantoms, make_model_dir_3d):
    data = labelled_phantoms(tmp_path / "data")
    out = _with_splits(make_model_dir_3d(tmp_path / "m3"), data)
    res = val_predictions(out, data, "cpu", labelled_only=True, progress=False)
    assert res["cases"] == ["case2"] and res["labelled"] == [True]
    assert res["scores"][0].shape == res["truths"][0].shape == res["images"][0].shape == (3, 32, 32)
    masks = [read_mask(p) for p in sorted((data / "case2").glob("*_mask.png"))]
    np.testing.assert_array_equal(res["truths"][0], np.stack(masks))  # the slices in order
    assert np.isfinite(res["scores"][0]).all()

"""Tests for medanomaly.evaluate.match: the prediction file of each image of the data, by predict's
names (collision renames included) and nnU-Net's; ambiguous and missing predictions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import discover
from medanomaly.evaluate.match import check_missing, find_predictions


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return path


def test_collision_renamed_predictions_are_found(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("a.png", "a.tif", "m1.png", "m2.png"):
        _png(data / name)
    listing = data / "list.csv"  # a.png and a.tif share a stem: predict names them a.png_pred.png, a.tif_pred.png
    listing.write_text("image,mask\na.png,m1.png\na.tif,m2.png\n")
    samples = discover(listing)
    pred = tmp_path / "pred"
    want = {s.image: _png(pred / f"{s.image.name}_pred.png") for s in samples}
    assert find_predictions(pred, listing, samples) == want


def test_ambiguous_and_shared_predictions_are_errors_naming_the_case(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for case in ("p1", "p2"):
        _png(data / case / "x.png")
        _png(data / case / "x_mask.png")
    samples = discover(data)
    pred = tmp_path / "pred"
    _png(pred / "x.png")  # flat, as nnU-Net names it: the prediction of both p1/x.png and p2/x.png
    with pytest.raises(MedanomalyError, match=r"may be the prediction of .*p1/x\.png \(case p1\) and of .*p2/x\.png"):
        find_predictions(pred, data, samples)
    _png(pred / "p1" / "x_pred.png")
    with pytest.raises(MedanomalyError, match=r"case p1: 2 files in .*pred may be the prediction of"):
        find_predictions(pred, data, samples)


def test_missing_predictions(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    for case in ("p1", "p2"):
        _png(data / case / "y_0000.png")
        _png(data / case / "y_0000_mask.png")
    samples = discover(data)
    with caplog.at_level(logging.WARNING):
        check_missing(tmp_path, samples, samples[1:])
    assert "1 images of 1 case(s) (p2)" in caplog.text and "y_0000_pred.* or y.*" in caplog.text
    with pytest.raises(MedanomalyError, match=r"no prediction in .* for any of the 2 images \(e.g. case p1"):
        check_missing(tmp_path, samples, samples)

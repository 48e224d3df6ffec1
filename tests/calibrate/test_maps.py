"""Tests for medanomaly.calibrate.maps: the anomaly-map settings are chosen by val AUPRC among the
variants of the configured map, and kept as configured when they cannot be chosen (3D, switched off,
no labelled val images, no lesion in them). Tiny 32x32 phantoms, random-weight networks."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.anomaly.methods import map_variants
from medanomaly.calibrate.maps import choose_map
from medanomaly.config.model_file import read_model_file

CPU = "cpu"


@pytest.fixture
def data(tmp_path, labelled_phantoms) -> Path:
    return labelled_phantoms(tmp_path / "data")  # val: case2, 3 slices with an 8x8 lesion


def _model(tmp_path: Path, data: Path, make_model_dir, method: str = "denoise") -> tuple[Path, object]:
    out = make_model_dir(tmp_path / "model", task="anomaly", method=method)
    shutil.copy(data / "splits.json", out / "splits.json")
    return out, read_model_file(out).config


def test_the_best_variant_by_val_auprc_is_chosen(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir)
    chosen, record = choose_map(out, data, cfg, CPU)
    trials = record["trials"]
    assert record["selected"] is True and "AUPRC" in record["objective"]
    assert [(t["residual"], t["erode"], t["median_size"]) for t in trials] == [
        (v.residual, v.erode, v.median_size) for v in map_variants(cfg.anomaly)]  # 3 x 2 x 2, in order
    assert all(0.0 <= t["val_auprc"] <= 1.0 for t in trials)
    best = max(trials, key=lambda t: t["val_auprc"])
    assert chosen == replace(cfg, anomaly=replace(cfg.anomaly, residual=best["residual"], erode=best["erode"],
                                                  median_size=best["median_size"]))


def test_the_intensity_baseline_varies_only_the_filtering(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir, method="intensity")  # no network: the image is the map
    chosen, record = choose_map(out, data, cfg, CPU)
    assert record["selected"] and len(record["trials"]) == 4 and {t["residual"] for t in record["trials"]} == {"abs"}
    assert chosen.anomaly.method == "intensity" and chosen.anomaly.residual == "abs"


def test_3d_and_switched_off_keep_the_configured_settings(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir)
    cfg3d = replace(cfg, model=replace(cfg.model, dim=3))
    assert choose_map(tmp_path / "absent", data, cfg3d, CPU) == (
        cfg3d, {"selected": False, "reason": "3D model: the configured map settings are kept"})
    off = replace(cfg, anomaly=replace(cfg.anomaly, select_map_on_val=False))
    assert choose_map(out, data, off, CPU) == (off, {"selected": False, "reason": "disabled or no labelled val images"})


def test_without_lesions_or_masks_in_val_nothing_is_chosen(tmp_path, data, make_model_dir):
    out, cfg = _model(tmp_path, data, make_model_dir)
    masks = sorted((data / "case2").glob("*_mask.png"))
    for m in masks:
        PILImage.fromarray(np.zeros((32, 32), np.uint8)).save(m)
    assert choose_map(out, data, cfg, CPU) == (cfg, {"selected": False, "reason": "no lesion in the val masks"})
    for m in masks:
        m.unlink()
    assert choose_map(out, data, cfg, CPU)[1]["reason"] == "disabled or no labelled val images"

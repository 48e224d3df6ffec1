"""Data preparation (medanomaly.train.prepare): the split by case shared by 2D and 3D, slices and
volumes loaded per task, splits.json and config.json written, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.config import schema as config
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import Sample
from medanomaly.train import prepare as prep_mod

CPU = torch.device("cpu")


def _cfg(**changes):
    return config.load(None, {"size": 32, "max_minutes": 0, **changes})


def test_2d_slices_split_by_case_and_the_run_files_are_written(phantoms, tmp_path):
    out = tmp_path / "m"
    prep = prep_mod.prepare(phantoms, out, _cfg(), None, CPU, progress=False)
    splits = json.loads((phantoms / "splits.json").read_text())
    assert json.loads((out / "splits.json").read_text()) == prep.splits == splits
    assert config.load(out / "config.json") == prep.cfg == _cfg()
    assert (len(prep.train), len(prep.val), prep.in_channels) == (12, 4, 1)
    assert set(prep.train.cases) == set(splits["train"]) and set(prep.val.cases) == set(splits["val"])
    assert tuple(prep.train.images.shape[1:]) == (1, 32, 32)


def test_the_anomaly_task_keeps_normal_slices_with_foreground_masks(phantoms, tmp_path):
    prep = prep_mod.prepare(phantoms, tmp_path / "m", _cfg(task="anomaly"), None, CPU, progress=False)
    assert len(prep.train) < 12 and not bool(prep.train.lesion.any())
    assert prep.train.masks.dtype == torch.uint8 and bool(prep.train.masks.any())  # the body, not lesions


def test_3d_volumes_resolve_patch_and_spacing_into_the_config(phantoms, tmp_path):
    cfg = _cfg(**{"model.dim": 3, "model.depth": 2})
    prep = prep_mod.prepare(phantoms, tmp_path / "m", cfg, None, CPU, progress=False)
    assert (len(prep.train), len(prep.val), prep.in_channels) == (3, 1, 1)  # a stacked volume per case
    assert prep.cfg.spacing == (1.0, 1.0, 1.0) and prep.cfg.patch is not None
    assert config.load(tmp_path / "m" / "config.json") == prep.cfg


def test_a_split_without_training_or_validation_items_is_refused():
    items = [Sample(Path(f"{c}.png"), None, c, c) for c in ("a", "b")]
    parts = prep_mod.split_parts(items, {"train": ["a"], "val": ["b"], "test": []}, Path("data"), "images")
    assert [s.case for s in parts["train"]] == ["a"] and parts["test"] == []
    with pytest.raises(MedanomalyError, match="the split leaves 2 training and 0 validation volumes in data"):
        prep_mod.split_parts(items, {"train": ["a", "b"], "val": [], "test": []}, Path("data"), "volumes")


def test_empty_masks_and_extra_pairs_for_the_anomaly_task_are_refused(tmp_path):
    for case in ("a", "b", "c"):
        (tmp_path / case).mkdir()
        PILImage.fromarray(np.full((32, 32), 100, np.uint8)).save(tmp_path / case / f"{case}.png")
        PILImage.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / case / f"{case}_mask.png")
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": []}))
    with pytest.raises(MedanomalyError, match="every training mask in .* is empty"):
        prep_mod.prepare(tmp_path, tmp_path / "m", _cfg(), None, CPU, progress=False)
    with pytest.raises(MedanomalyError, match="every training mask in .* is empty"):
        prep_mod.prepare(tmp_path, tmp_path / "m", _cfg(**{"model.dim": 3}), None, CPU, progress=False)
    with pytest.raises(MedanomalyError, match="--extra .* the anomaly task learns from normal images only"):
        prep_mod.prepare(tmp_path, tmp_path / "m", _cfg(task="anomaly", extra=str(tmp_path)), None, CPU, False)
    assert not (tmp_path / "m").exists()  # nothing written before the data is known to be usable

"""Tests for medanomaly.train.gan: GAN lesion synthesis writes valid pairs in the images/ + masks/ layout
(used by 'train --extra': tests/train/test_fewlabels.py) and protects its output folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.apps.cli import main
from medanomaly.data.discover import discover
from medanomaly.train.gan import GanConfig, erased_region, synthesize

LGG = Path(os.environ["MEDANOMALY_SHARED_DATA"]) / "lgg-flair"  # the root is resolved by tests/conftest.py


def test_synthesize_writes_valid_pairs(synthesized, tiny_gan_config):
    data, out = synthesized
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"] and manifest["kind"] == "medanomaly-synthesize" and len(manifest["files"]) == 5
    assert manifest["training"]["steps"] == 4 and manifest["config"]["size"] == 32
    assert (out / manifest["generator"]["path"]).is_file()
    for f in manifest["files"]:
        assert f["synthetic"] and Path(f["image"]).name.startswith("synthetic_")
        img = np.asarray(PILImage.open(out / f["image"]))
        mask = np.asarray(PILImage.open(out / f["mask"]))
        assert img.shape == mask.shape == (32, 32) and img.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        src = Path(f["source_image"])
        assert src.parent.name in ("case0", "case1") and not np.asarray(PILImage.open(src.with_name(
            src.stem + "_mask.png"))).any()  # painted into a lesion-free training slice
        margin = tiny_gan_config.margin
        erased = erased_region(torch.from_numpy(mask > 0).float()[None, None], margin)[0, 0].numpy() > 0.5
        assert np.array_equal(img[~erased], np.asarray(PILImage.open(src))[~erased])
    # the part-1 layout: every pair found, each its own case, names say synthetic
    found = discover(out)
    assert len(found) == 5 and all(s.mask is not None and s.case.startswith("synthetic_") for s in found)


def test_out_folder_is_protected(synthesized, tmp_path, capsys):
    data, out = synthesized
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for target in (tmp_path / "foreign", out, data / "syn"):
        rc = main(["-q", "synthesize", str(data), "--out", str(target), "--n", "1", "--size", "32", "--device", "cpu"])
        assert rc == 2 and "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


@pytest.mark.shared_data("lgg-flair")
def test_real_lgg_smoke(tmp_path):
    splits = json.loads((LGG / "splits.json").read_text())
    small = {"train": splits["train"][:2], "val": splits["val"][:1], "test": []}
    (tmp_path / "splits.json").write_text(json.dumps(small))
    cfg = GanConfig(size=32, minutes=0, max_steps=5, batch_size=4, width=8, depth=3, d_width=8)
    out = synthesize(LGG, tmp_path / "syn", 3, cfg, splits_file=tmp_path / "splits.json", progress=False)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert len(files) == 3 and all(Path(f["source_image"]).parent.name in small["train"] for f in files)
    assert all(np.asarray(PILImage.open(out / f["mask"])).any() for f in files)

"""GAN lesion synthesis: valid pairs in the images/ + masks/ layout, used by 'train --extra', clear errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.apps.cli import main
from medanomaly.data.slices import discover
from medanomaly.train.gan import GanConfig, erased_region, synthesize

LGG = Path(os.environ["MEDANOMALY_SHARED_DATA"]) / "lgg-flair"  # the root is resolved by tests/conftest.py
TINY = GanConfig(size=32, minutes=0, max_steps=4, batch_size=4, width=8, depth=2, d_width=8, d_layers=2, margin=2)


def _tiny_data(root: Path, size: int = 32) -> Path:
    """4 cases x 4 slices: a grey 'head' disk with texture; slice 0 and 1 of each case have a bright lesion."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    head = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2 - 3) ** 2
    for c in range(4):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        for k in range(4):
            img = np.where(head, rng.integers(70, 110, (size, size)), 0).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            if k < 2:
                blob = (yy - 12 - 2 * k) ** 2 + (xx - 14 - c) ** 2 < 16
                img[blob], mask[blob] = 220, 255
            PILImage.fromarray(img).save(d / f"case{c}_{k}.png")
            PILImage.fromarray(mask).save(d / f"case{c}_{k}_mask.png")
    (root / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gan")
    data = _tiny_data(root / "data")
    return data, synthesize(data, root / "syn", 5, TINY, progress=False)


def test_synthesize_writes_valid_pairs(tiny):
    data, out = tiny
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
        erased = erased_region(torch.from_numpy(mask > 0).float()[None, None], TINY.margin)[0, 0].numpy() > 0.5
        assert np.array_equal(img[~erased], np.asarray(PILImage.open(src))[~erased])
    # the part-1 layout: every pair found, each its own case, names say synthetic
    found = discover(out)
    assert len(found) == 5 and all(s.mask is not None and s.case.startswith("synthetic_") for s in found)


def test_train_accepts_extra_pairs(tiny, tmp_path, caplog):
    data, out = tiny
    caplog.set_level(logging.INFO, logger="medanomaly")
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--extra", str(out), "--size", "32",
               "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4", "--max-minutes", "0.05",
               "--device", "cpu"])
    assert rc == 0
    text = caplog.text
    assert "adding 5 extra pairs (5 slices)" in text
    assert "training on 13 slices" in text  # 2 train cases x 4 slices + 5 synthetic
    assert json.loads((tmp_path / "m" / "config.json").read_text())["extra"] == str(out)


def test_extra_of_another_size_is_a_clear_error(tiny, tmp_path, capsys):
    data, _ = tiny
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


def test_extra_made_from_val_images_is_refused(tiny, tmp_path, capsys):
    data, out = tiny  # synthesized with case0, case1 as train; here case1 validates
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["case0", "case2"], "val": ["case1"], "test": []}))
    rc = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), "--extra", str(out), "--splits",
               str(tmp_path / "splits.json"), "--size", "32", "--device", "cpu"])
    assert rc == 2 and "val/test" in capsys.readouterr().err


def test_out_folder_is_protected(tiny, tmp_path, capsys):
    data, out = tiny
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

"""Tests for medanomaly.data.listing: a CSV table of image (and mask) paths read as a data folder is,
through discovery and splits (relative paths, the case and split columns, several channel columns)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.apps.cli import main
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import discover, resolve_splits
from medanomaly.data.listing import data_root, is_listing, listing_root, read_listing


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def _csv(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """tmp_path/imgs/p{0,1,2}_{0,1}.png and their _mask.png."""
    for c in range(3):
        for k in range(2):
            _png(tmp_path / "imgs" / f"p{c}_{k}.png")
            _png(tmp_path / "imgs" / f"p{c}_{k}_mask.png")
    return tmp_path


def test_a_listing_with_cases_and_splits(files: Path) -> None:
    rows = [f"imgs/p{c}_{k}.png,imgs/p{c}_{k}_mask.png,P{c},{('train', 'val', 'test')[c]}"
            for c in (2, 1, 0) for k in (1, 0)]  # order of the file does not matter
    listing = _csv(files / "list.csv", "Image,Mask,Case,Split", *rows)  # column names in any case
    samples = discover(listing)
    assert is_listing(listing) and not is_listing(files / "imgs")
    assert [(s.case, s.image.name, s.mask.name) for s in samples[:2]] == [
        ("P0", "p0_0.png", "p0_0_mask.png"), ("P0", "p0_1.png", "p0_1_mask.png")]
    assert samples[0].image == (files / "imgs" / "p0_0.png").absolute()  # relative to the CSV's folder
    assert resolve_splits(listing, samples, None, seed=0) == {"train": ["P0"], "val": ["P1"], "test": ["P2"]}
    assert listing_root(listing) == data_root(listing) == (files / "imgs").absolute()


def test_without_case_and_split_columns(files: Path) -> None:
    listing = _csv(files / "sub" / "list.csv", "image", "../imgs/p0_0.png", str(files / "imgs" / "p1_0.png"), "")
    samples = discover(listing)
    assert [(s.case, s.key, s.mask) for s in samples] == [("p0_0", "p0_0", None), ("p1_0", "p1_0", None)]
    splits = resolve_splits(listing, samples, None, seed=0)  # no split column: a seeded split by case
    assert sorted(c for ids in splits.values() for c in ids) == ["p0_0", "p1_0"]


def test_several_channel_columns_make_one_multichannel_sample(files: Path) -> None:
    listing = _csv(files / "list.csv", "image_flair,image_t1,mask",
                   "imgs/p0_0.png,imgs/p0_1.png,imgs/p0_0_mask.png")
    [s] = discover(listing)
    assert s.files == ((files / "imgs" / "p0_0.png").absolute(), (files / "imgs" / "p0_1.png").absolute())
    assert s.channel_names == ("FLAIR", "T1")
    numbered = _csv(files / "n.csv", "image_0000,image_0001", "imgs/p1_0.png,imgs/p1_1.png")
    assert discover(numbered)[0].channel_names == ()  # numbered channels have no names


def test_row_numbers_in_errors(files: Path) -> None:
    listing = _csv(files / "list.csv", "image,mask", "imgs/p0_0.png,imgs/p0_0_mask.png", "imgs/p9_0.png,")
    with pytest.raises(MedanomalyError, match=r"row 3 of .*list\.csv: the image .*p9_0\.png does not exist"):
        read_listing(listing)


def test_train_and_evaluate_on_a_listing(tmp_path: Path, labelled_phantoms, tiny_train_flags) -> None:
    """A listing is the data of train and of evaluate --model: its split column is the split, so the
    model's test case is the listing's."""
    data = labelled_phantoms(tmp_path / "data")
    (data / "splits.json").unlink()  # the listing's split column is the only split
    split = {0: "train", 1: "train", 2: "val", 3: "test"}
    rows = [f"data/case{c}/case{c}_{k}.png,data/case{c}/case{c}_{k}_mask.png,case{c},{split[c]}"
            for c in range(4) for k in range(3)]
    listing = _csv(tmp_path / "list.csv", "image,mask,case,split", *rows)
    assert main(["-q", "train", str(listing), "--out", str(tmp_path / "m"), *tiny_train_flags]) == 0
    assert json.loads((tmp_path / "m" / "splits.json").read_text())["test"] == ["case3"]
    assert main(["-q", "evaluate", "--model", str(tmp_path / "m"), "--data", str(listing), "--out",
                 str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (summary["split"], summary["n_cases"], summary["n_images"]) == ("test", 1, 3)

"""Bad CSV listings (medanomaly.data.listing), end to end through the CLI: each refused with exit 2,
one paragraph naming the file (and row) and the fix, and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """tmp_path/data with a.png, b.png and their masks, and an empty predictions folder beside it."""
    for name in ("a", "b"):
        _png(tmp_path / "data" / f"{name}.png")
        _png(tmp_path / "data" / f"{name}_mask.png")
    (tmp_path / "preds").mkdir()
    return tmp_path


def _evaluate_refuses(cli, folder: Path, text: str, says: str, *flags: str) -> None:
    listing = folder / "data" / "list.csv"
    listing.write_text(text)
    cli.refuses("evaluate", "--pred", folder / "preds", "--data", listing, "--out", folder / "eval", *flags,
                says=says, untouched=(folder,))


def test_bad_listing_without_image_column(cli, folder):
    listing = folder / "data" / "list.csv"
    listing.write_text("file,mask\na.png,a_mask.png\n")
    cli.refuses("train", listing, "--out", folder / "model", says=r"list\.csv has no 'image' column .*header: file, "
                "mask", untouched=(folder,))


def test_bad_listing_missing_file(cli, folder, make_model_dir):
    listing = folder / "data" / "list.csv"
    listing.write_text("image,mask\na.png,a_mask.png\nc.png,\n")
    model = make_model_dir(folder / "model")
    cli.refuses("predict", model, listing, "--out", folder / "out", says=r"row 3 of .*list\.csv: the image .*c\.png "
                "does not exist", untouched=(folder,))


def test_bad_listing_missing_mask(cli, folder):
    _evaluate_refuses(cli, folder, "image,mask\na.png,a_mask.png\nb.png,b_mask.tif\n",
                      r"row 3 of .*list\.csv: the mask .*b_mask\.tif does not exist")


def test_bad_listing_duplicate_image(cli, folder):
    _evaluate_refuses(cli, folder, "image,mask\na.png,a_mask.png\nb.png,b_mask.png\n./a.png,a_mask.png\n",
                      r"rows 2 and 4 of .*list\.csv both list the image .*a\.png")


def test_bad_listing_split_name(cli, folder):
    _evaluate_refuses(cli, folder, "image,mask,split\na.png,a_mask.png,train\nb.png,b_mask.png,testing\n",
                      r"row 3 of .*list\.csv: split 'testing' is none of train, val, test")


def test_bad_listing_case_in_two_splits(cli, folder):
    _evaluate_refuses(cli, folder, "image,mask,case,split\na.png,a_mask.png,P1,train\nb.png,b_mask.png,P1,test\n",
                      r"rows 2 and 3 of .*list\.csv put case 'P1' in the splits train and test", "--split", "test")


def test_bad_listing_image_and_channel_columns(cli, folder):
    _evaluate_refuses(cli, folder, "image,image_0001,mask\na.png,b.png,a_mask.png\n",
                      r"list\.csv has an 'image' column and the channel column\(s\) image_0001")


def test_bad_listing_without_rows(cli, folder):
    _evaluate_refuses(cli, folder, "image,mask\n\n", r"list\.csv lists no image")


def test_bad_listing_not_an_image(cli, folder):
    (folder / "data" / "notes.txt").write_text("x")
    _evaluate_refuses(cli, folder, "image\nnotes.txt\n", r"row 2 of .*list\.csv: the image .*notes\.txt is no image")

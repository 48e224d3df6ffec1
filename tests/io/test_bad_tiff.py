"""Multi-page TIFFs: refused unless every page has the same size and type (they were read as their
first page), read whole when they agree. Made from the real LGG FLAIR slices and the real 3-channel
TIFF of ../shared/data; the refusals run through ``medanomaly train`` (exit 2, nothing written)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import read_image

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
KAGGLE_TIF = DATA / "lgg-kaggle3m-sample" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10.tif"
pytestmark = pytest.mark.shared_data("lgg-flair", "lgg-kaggle3m-sample")


def _pages(path: Path, *pages: np.ndarray) -> Path:
    with tifffile.TiffWriter(path) as tw:
        for page in pages:
            tw.write(page)
    return path


def _as_tiff_pages(real_lgg, tmp_path: Path, second) -> tuple[Path, Path]:
    """(data folder, the training image replaced by a 2-page TIFF: its slice, then ``second(slice)``)."""
    data = tmp_path / "data"
    img, _ = real_lgg.train_set(data)[real_lgg.patients[0]][0]
    a = np.asarray(PILImage.open(img))
    tif = _pages(img.with_suffix(".tif"), a, second(a))
    img.unlink()
    return data, tif


def _refuses(cli, tmp_path: Path, data: Path, tif: Path, says: str, flags: list[str]) -> None:
    out = tmp_path / "model"
    err = cli.refuses("train", data, "--out", out, *flags, says=says, untouched=(data, out))
    assert cli.names(err, tif), err


def test_bad_tiff_pages_of_different_sizes(tmp_path: Path, cli, real_lgg, tiny_train_flags) -> None:
    """A slice followed by a half-size thumbnail page."""
    data, tif = _as_tiff_pages(real_lgg, tmp_path, lambda a: np.ascontiguousarray(a[::2, ::2]))
    _refuses(cli, tmp_path, data, tif, r"its 2 pages differ in size or type \(1 page 256x256 uint8; 1 page "
             r"128x128 uint8\), so they are not one image; save each page as its own file", tiny_train_flags)


def test_bad_tiff_pages_of_different_types(tmp_path: Path, cli, real_lgg, tiny_train_flags) -> None:
    data, tif = _as_tiff_pages(real_lgg, tmp_path, lambda a: a.astype(np.uint16) * 257)
    _refuses(cli, tmp_path, data, tif, r"its 2 pages differ in size or type \(1 page 256x256 uint8; 1 page "
             r"256x256 uint16\)", tiny_train_flags)


def test_rgb_page_and_grey_page_are_refused(tmp_path: Path) -> None:
    rgb = tifffile.imread(KAGGLE_TIF)
    path = _pages(tmp_path / "mixed.tif", rgb, rgb[..., 1])
    with pytest.raises(MedanomalyError, match=r"1 page 256x256x3 uint8; 1 page 256x256 uint8"):
        read_image(path)


def test_agreeing_pages_are_read_whole_even_in_several_series(tmp_path: Path, real_lgg) -> None:
    """Pages written one by one land in one tifffile series each: all of them are read, as channels
    (a multi-page TIFF of one series reads the same way), never the first one alone."""
    flair = np.asarray(PILImage.open(real_lgg.flair))
    pages = (flair, flair[::-1].copy(), 255 - flair)
    path = _pages(tmp_path / "three.tif", *pages)
    assert len(tifffile.TiffFile(path).series) == 3
    np.testing.assert_array_equal(read_image(path).array, np.stack(pages).astype(np.float32))
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(pages), photometric="minisblack")  # one series of 3 pages
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif").array, read_image(path).array)


def test_real_three_channel_tiff_reads_as_before() -> None:
    np.testing.assert_array_equal(read_image(KAGGLE_TIF).array,
                                  np.moveaxis(tifffile.imread(KAGGLE_TIF), -1, 0).astype(np.float32))

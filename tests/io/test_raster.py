"""Tests for medanomaly.io.raster: PNG, JPEG and BMP through Pillow, TIFF through tifffile (modes,
bit depths, alpha, channel layouts, the raster geometry), on hand-made files and on the real LGG,
Kaggle and PH2 images of ../shared/data where present."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import mask_suffix, read_image, read_mask, score_suffix, write_mask, write_score
from medanomaly.io.raster import _read_pillow, _read_tiff

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()
LGG = DATA / "lgg-flair" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10"
KAGGLE = DATA / "lgg-kaggle3m-sample" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10"


def test_16bit_png_keeps_values(tmp_path: Path) -> None:
    arr = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    PILImage.fromarray(arr).save(tmp_path / "deep.png")
    img = read_image(tmp_path / "deep.png")
    assert img.array.shape == (1, 12, 10) and img.array.dtype == np.float32
    assert img.array.max() > 255
    np.testing.assert_array_equal(img.array[0], arr)


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (8, 9, 4), dtype=np.uint8)
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert img.channels == 3 and img.spatial_shape == (8, 9)
    np.testing.assert_array_equal(img.array, rgba[..., :3].transpose(2, 0, 1))


def test_palette_png_is_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[2:4, 3:5] = (255, 0, 0)
    PILImage.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    img = read_image(tmp_path / "pal.png")
    np.testing.assert_array_equal(img.array, rgb.transpose(2, 0, 1))


@settings(max_examples=25, deadline=None)
@given(arr=st.one_of(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12))),
                     arrays(np.uint16, st.tuples(st.integers(1, 12), st.integers(1, 12)))),
       use_tiff=st.booleans())
def test_property_raster_round_trip(arr: np.ndarray, use_tiff: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("a.tif" if use_tiff else "a.png")
        if use_tiff:
            tifffile.imwrite(path, arr)
        else:
            PILImage.fromarray(arr).save(path)
        img = read_image(path)
    assert img.array.shape == (1, *arr.shape)
    np.testing.assert_array_equal(img.array[0], arr.astype(np.float32))


def test_pillow_geometry_is_unknown_pixels_with_the_mode_in_meta(tmp_path: Path) -> None:
    PILImage.fromarray(np.full((3, 4), 7, np.uint8)).save(tmp_path / "g.png", dpi=(300, 300))
    arr, geo = _read_pillow(tmp_path / "g.png")
    assert arr.shape == (1, 3, 4) and arr.dtype == np.uint8
    assert (geo.kind, geo.spacing, geo.origin) == ("raster", (1.0, 1.0), (0.0, 0.0))
    assert geo.direction == (1.0, 0.0, 0.0, 1.0)
    assert not geo.spacing_known and geo.voxel_volume_mm() is None
    assert geo.meta["mode"] == "L" and geo.meta["bits"] == 8 and geo.meta["dtype"] == "uint8"
    assert tuple(round(v) for v in geo.meta["dpi"]) == (300, 300)


def test_grey_with_alpha_is_grey_and_one_bit_is_zero_or_one(tmp_path: Path) -> None:
    la = np.zeros((4, 5, 2), np.uint8)
    la[..., 0], la[..., 1] = 90, 255
    PILImage.fromarray(la, "LA").save(tmp_path / "la.png")
    arr, _ = _read_pillow(tmp_path / "la.png")
    assert arr.shape == (1, 4, 5) and (arr == 90).all()
    bits = np.zeros((4, 8), bool)
    bits[1, 2:5] = True
    PILImage.fromarray(bits).save(tmp_path / "bits.png")
    arr, geo = _read_pillow(tmp_path / "bits.png")
    assert geo.meta["mode"] == "1" and geo.meta["bits"] == 1
    np.testing.assert_array_equal(arr[0] != 0, bits)


def test_pillow_size_limit_is_put_back_after_a_read(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "t.png")
    before = PILImage.MAX_IMAGE_PIXELS
    _read_pillow(tmp_path / "t.png")
    assert PILImage.MAX_IMAGE_PIXELS == before


def test_tiff_layouts(tmp_path: Path) -> None:
    rgba = np.random.default_rng(1).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    arr, geo = _read_tiff(tmp_path / "rgba.tif")
    np.testing.assert_array_equal(arr, rgba[..., :3].transpose(2, 0, 1))  # alpha dropped
    assert geo.kind == "raster" and geo.meta["bits"] == 8
    pages = np.random.default_rng(2).random((2, 5, 6)).astype(np.float32)  # a stack of channel pages
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    arr, geo = _read_tiff(tmp_path / "pages.tif")
    np.testing.assert_array_equal(arr, pages)
    assert geo.meta["bits"] == 32 and geo.meta["dtype"] == "float32"
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 5, 6), np.uint8), photometric="minisblack")
    with pytest.raises(MedanomalyError, match=r"4d\.tif: TIFF layout .* is not supported"):
        _read_tiff(tmp_path / "4d.tif")


# --- real rasters ---------------------------------------------------------------------------------

@needs_data
def test_ph2_jpeg_and_png_mask(tmp_path: Path) -> None:
    img = read_image(DATA / "ph2" / "images" / "IMD002.jpg")
    h, w = img.spatial_shape
    assert img.channels == 3 and img.array.shape == (3, 572, 765)
    assert not img.geometry.spacing_known and img.geometry.voxel_volume_mm() is None
    mask = read_mask(DATA / "ph2" / "masks" / "IMD002.png", like=img)
    assert mask.shape == (h, w) and mask.any() and not mask.all()
    out = write_mask(mask, img, tmp_path / "IMD002_pred")
    with PILImage.open(out) as written:
        assert written.size == (w, h) and written.mode == "L"
        values = np.asarray(written)
    assert set(np.unique(values)) == {0, 255} and out.suffix == mask_suffix(img) == ".png"
    np.testing.assert_array_equal(values > 0, mask)


@needs_data
def test_lgg_png() -> None:
    img = read_image(f"{LGG}_flair.png")
    assert img.array.shape == (1, 256, 256) and img.array.max() > 1
    mask = read_mask(f"{LGG}_mask.png", like=img)
    assert mask.shape == (256, 256) and mask.dtype == bool


@needs_data
def test_kaggle_tiff_and_score(tmp_path: Path) -> None:
    img = read_image(f"{KAGGLE}.tif")
    assert img.array.shape == (3, 256, 256)
    np.testing.assert_array_equal(img.array, tifffile.imread(f"{KAGGLE}.tif").transpose(2, 0, 1))
    mask = read_mask(f"{KAGGLE}_mask.tif", like=img)
    assert mask.dtype == bool and mask.shape == (256, 256)
    score = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)
    out = write_score(score, img, tmp_path / "s")
    assert out.name == "s.tif" and score_suffix(img) == ".tif"
    back = tifffile.imread(out)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, score)

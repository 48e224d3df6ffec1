"""Tests for medanomaly.data.foreground: hole filling and the Otsu body foreground (largest components,
holes filled, erosion), on hand-made disks, balls and blobs, and on real FLAIR slices of
../shared/data where present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from medanomaly.data.foreground import fill_holes, foreground_mask

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
LGG = DATA / "lgg-flair"
FLAIR = LGG / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_10_flair.png"


def test_fill_holes_ring_2d() -> None:
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    filled = fill_holes(ring)
    expected = np.zeros((7, 7), bool)
    expected[1:6, 1:6] = True
    np.testing.assert_array_equal(filled, expected)


def test_fill_holes_3d_tube_and_hollow_cube() -> None:
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    tube = np.repeat(ring[None], 4, axis=0)  # the hole is open at both ends in 3D
    assert fill_holes(tube)[:, 3, 3].all()  # filled slice by slice
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    cube[3, 3, 3] = False  # a closed 3D cavity
    assert fill_holes(cube)[3, 3, 3]


def test_fill_holes_refuses_other_dimensions() -> None:
    with pytest.raises(ValueError, match=r"2D \(H, W\) or 3D"):
        fill_holes(np.zeros(5, bool))


def test_foreground_mask_disk(disk_image) -> None:
    rng = np.random.default_rng(0)
    img, disk = disk_image(rng)
    img[2:4, 2:4] = 1.0  # bright speck in the background: not part of the body
    img[30:34, 30:34] = 0.05  # dark spot inside: a hole, filled
    np.testing.assert_array_equal(foreground_mask(img), disk)
    eroded = foreground_mask(img, erode=2)
    assert not (eroded & ~disk).any() and eroded.sum() < disk.sum() - 100 and eroded[32, 32]
    rgb = np.stack([img, img, img])
    np.testing.assert_array_equal(foreground_mask(rgb, channel_axis=0), disk)
    assert foreground_mask(img, mode="all").all()
    assert not foreground_mask(np.full((8, 8), 3.0)).any()
    with pytest.raises(ValueError, match="mode"):
        foreground_mask(img, mode="otsu2")


def test_foreground_mask_3d() -> None:
    zz, yy, xx = np.indices((20, 20, 20))
    ball = (zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 36
    img = ball * 1.0 + np.random.default_rng(1).uniform(0, 0.3, ball.shape)
    np.testing.assert_array_equal(foreground_mask(img), ball)


def test_components_of_at_least_keep_fraction_of_the_largest_stay() -> None:
    img = np.zeros((20, 30))
    img[2:12, 2:12] = 1.0  # 100 px: the largest
    img[2:7, 20:24] = 1.0  # 20 px: 0.2 of the largest
    img[16:18, 16:18] = 1.0  # 4 px: 0.04 of the largest
    fg = foreground_mask(img)  # keep_fraction 0.1: both hemispheres of a low slice, not a speck
    assert fg.sum() == 120 and fg[5, 22] and not fg[17, 17]
    assert foreground_mask(img, keep_fraction=0.5).sum() == 100
    assert foreground_mask(img, keep_fraction=0.0).sum() == 124


def test_non_finite_pixels_are_background_and_the_border_is_not_an_edge() -> None:
    img = np.zeros((10, 10))
    img[:, :5] = 1.0  # the body touches the array border on three sides
    img[0, 0] = np.nan
    fg = foreground_mask(img, erode=1)
    assert not fg[0, 0] and not fg[:, 4].any()  # NaN: background; the body's inner edge is eroded
    assert fg[2:, :4].all()  # the array border (left, bottom) is not an edge: nothing eroded there
    assert not foreground_mask(np.full((4, 4), np.nan)).any()


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="2D or 3D after channel averaging"):
        foreground_mask(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="erode must be a non-negative integer"):
        foreground_mask(np.zeros((4, 4)), erode=-1)
    with pytest.raises(ValueError, match="erode must be a non-negative integer"):
        foreground_mask(np.zeros((4, 4)), erode=1.5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), erode=st.integers(1, 3))
def test_property_erosion_shrinks_and_filling_is_idempotent(seed: int, erode: int) -> None:
    img = np.random.default_rng(seed).random((12, 14))
    fg = foreground_mask(img)
    assert fg.shape == img.shape and fg.dtype == bool
    assert not (foreground_mask(img, erode=erode) & ~fg).any()
    np.testing.assert_array_equal(fill_holes(fg), fg)  # holes are already filled


@pytest.mark.shared_data("lgg-flair/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_10_flair.png")
def test_foreground_mask_real_flair() -> None:
    img = np.asarray(PILImage.open(FLAIR))
    assert img.shape == (256, 256)
    fg = foreground_mask(img)
    assert 0.15 <= fg.mean() <= 0.70
    assert fg[128, 128]


@pytest.mark.shared_data("lgg-flair")
def test_foreground_on_real_flair_slices_covers_the_head():
    for name in ("TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12_flair.png",
                 "TCGA_CS_4943_20000902/TCGA_CS_4943_20000902_10_flair.png"):
        img = np.asarray(PILImage.open(LGG / name), np.float32) / 255
        fg = foreground_mask(img, erode=3)
        assert 0.15 < fg.mean() < 0.75 and fg[128, 128]
        assert not fg[0, 0] and not fg[-1, -1]

"""Tests of medanomaly.postprocess.ops on small hand-made masks (the foreground and hole filling it
uses are tested in tests/data/test_foreground.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from medanomaly.postprocess import ops as P
from medanomaly.postprocess.ops import PostprocessParams


def _blobs() -> np.ndarray:
    # 6x6: a 2x2 square (4 px), a diagonal pair (2 px, 8-connected only), one speck (1 px)
    m = np.zeros((6, 6), bool)
    m[0:2, 0:2] = True
    m[4, 4] = m[5, 5] = True
    m[0, 5] = True
    return m


def test_remove_small_components() -> None:
    m = _blobs()
    out2 = P.remove_small_components(m, 2)
    expected = m.copy()
    expected[0, 5] = False
    np.testing.assert_array_equal(out2, expected)
    out3 = P.remove_small_components(m, 3)
    expected[4, 4] = expected[5, 5] = False
    np.testing.assert_array_equal(out3, expected)
    # faces-only connectivity splits the diagonal pair into two 1-px components
    assert not P.remove_small_components(m, 2, connectivity=1)[4, 4]
    same = P.remove_small_components(m, 0)
    np.testing.assert_array_equal(same, m)
    assert same is not m


def test_remove_small_components_3d() -> None:
    v = np.zeros((3, 4, 4), bool)
    v[0, 0, 0] = v[1, 1, 1] = True  # 26-connected pair
    v[2, 3, 3] = True
    out = P.remove_small_components(v, 2)
    assert out.sum() == 2 and not out[2, 3, 3]
    with pytest.raises(ValueError, match="min_size"):
        P.remove_small_components(v, -1)


def test_smooth_mask_removes_spur() -> None:
    m = np.zeros((11, 14), bool)
    m[2:9, 2:9] = True
    m[5, 9:13] = True  # 1-pixel-wide spur, 4 px long
    out = P.smooth_mask(m, 1)
    # The opening keeps only what a 3x3 cross fits in: the cross centred on the square's edge
    # pixel (5, 8) still covers the spur's first pixel, so a 1-px stub remains; the rest goes.
    assert not out[5, 10:].any()
    assert out[3:8, 3:8].all()
    assert not (out & ~m).any()
    np.testing.assert_array_equal(P.smooth_mask(m, 0), m)


def test_smooth_mask_keeps_objects_at_border() -> None:
    band = np.zeros((8, 8), bool)
    band[:5] = True
    np.testing.assert_array_equal(P.smooth_mask(band, 1), band)
    np.testing.assert_array_equal(P.smooth_mask(np.stack([band] * 3), 1), np.stack([band] * 3))


def test_smooth_and_median_scores() -> None:
    impulse = np.zeros((9, 9), np.float32)
    impulse[4, 4] = 1.0
    g = P.smooth_scores(impulse, 1.0)
    assert g.dtype == np.float32 and g.sum() == pytest.approx(1.0, rel=1e-5) and g.max() < 0.5
    same = P.smooth_scores(impulse, 0)
    np.testing.assert_array_equal(same, impulse)
    assert same is not impulse
    assert P.median_filter_scores(impulse, 3).max() == 0.0  # salt pixel removed
    assert P.median_filter_scores(np.ones((3, 3), np.uint8), 3).dtype == np.float64


def test_apply_order() -> None:
    scores = np.zeros((8, 8))
    scores[1:4, 1:4] = 0.9
    scores[2, 2] = 0.2  # hole in a ring of 8 px: 9 px once filled
    scores[6, 6] = 0.9  # speck
    scores[6, 1] = 0.5  # exactly at the threshold: not above it
    # fill holes comes before remove-small: the filled ring (9 px) survives min_size=9
    out = P.apply(scores, PostprocessParams(threshold=0.5, min_size=9, fill_holes=True))
    expected = np.zeros((8, 8), bool)
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(out, expected)
    # without filling, the ring (8 px) is removed
    assert not P.apply(scores, PostprocessParams(threshold=0.5, min_size=9)).any()


def test_apply_foreground_only(disk_image) -> None:
    img, disk = disk_image(np.random.default_rng(2))
    scores = np.ones(disk.shape)
    params = PostprocessParams(foreground_only=True, smooth_radius=1)
    np.testing.assert_array_equal(P.apply(scores, params, image=img), disk)
    out_rgb = P.apply(scores, params, image=np.stack([img] * 3, axis=-1), channel_axis=-1)
    np.testing.assert_array_equal(out_rgb, disk)
    with pytest.raises(ValueError, match="image"):
        P.apply(scores, params)
    with pytest.raises(ValueError, match="shape"):
        P.apply(scores, params, image=img[:10])


def test_region_table_2d_with_spacing() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:4] = True  # 9 px, centroid (2, 2)
    mask[5, 4:6] = True  # 2 px, centroid (5, 4.5)
    scores = np.zeros((6, 6))
    scores[1:4, 1:4] = 0.5
    scores[2, 2] = 0.95  # mean over the square = (8 * 0.5 + 0.95) / 9 = 0.55
    scores[5, 4:6] = [0.6, 0.8]
    rows = P.region_table(mask, scores, spacing=(0.5, 0.5))
    assert [r["area_px"] for r in rows] == [9, 2]
    big, small = rows
    assert big["area_mm"] == pytest.approx(9 * 0.25) and small["area_mm"] == pytest.approx(0.5)
    assert big["centroid"] == pytest.approx([2.0, 2.0])
    assert small["centroid"] == pytest.approx([5.0, 4.5])
    assert big["bbox"] == [1, 1, 4, 4] and small["bbox"] == [5, 4, 6, 6]
    assert big["max_score"] == pytest.approx(0.95) and big["mean_score"] == pytest.approx(0.55)
    assert small["max_score"] == pytest.approx(0.8) and small["mean_score"] == pytest.approx(0.7)
    assert {big["label"], small["label"]} == {1, 2}
    assert P.region_table(mask, scores)[0]["area_mm"] is None
    assert P.region_table(np.zeros((4, 4), bool), np.zeros((4, 4))) == []
    with pytest.raises(ValueError, match="spacing"):
        P.region_table(mask, scores, spacing=(1.0,))


def test_region_table_3d() -> None:
    mask = np.zeros((3, 4, 4), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    rows = P.region_table(mask, mask * 1.0, spacing=(2.0, 1.0, 1.0))
    assert len(rows) == 1 and rows[0]["area_mm"] == pytest.approx(16.0)
    assert rows[0]["bbox"] == [0, 0, 0, 2, 2, 2]
    assert rows[0]["centroid"] == pytest.approx([0.5, 0.5, 0.5])


def test_inputs_not_modified(disk_image) -> None:
    img, disk = disk_image(np.random.default_rng(3))
    scores = np.random.default_rng(4).random(disk.shape)
    for a in (img, disk, scores):
        a.setflags(write=False)  # any in-place write raises
    copies = [img.copy(), disk.copy(), scores.copy()]
    P.remove_small_components(disk, 5)
    P.fill_holes(disk)
    P.smooth_mask(disk, 2)
    P.smooth_scores(scores, 1.0)
    P.median_filter_scores(scores, 3)
    P.foreground_mask(img, erode=1)
    P.region_table(disk, scores, spacing=(1.0, 1.0))
    params = PostprocessParams(0.5, 3, True, 1, True)
    P.apply(scores, params, image=img)
    for a, c in zip((img, disk, scores), copies):
        np.testing.assert_array_equal(a, c)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=7)))
def test_remove_small_components_subset_and_idempotent(mask: np.ndarray) -> None:
    out = P.remove_small_components(mask, 3)
    assert not (out & ~mask).any()
    np.testing.assert_array_equal(P.remove_small_components(out, 3), out)

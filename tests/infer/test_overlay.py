"""Tests for medanomaly.infer.overlay: display scaling, overlays, PNG writing, slice choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medanomaly.infer.overlay import PRED_RGB, TRUTH_RGB, best_slice, overlay_rgb, save_png, to_display


def _square(h: int = 32, w: int = 40, lo: int = 8, hi: int = 20) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_to_display_grey_from_2d_and_1_channel() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 30.0, (16, 20))
    out2d = to_display(img)
    out1c = to_display(img[None])
    assert out2d.shape == (16, 20, 3) and out2d.dtype == np.float32
    assert out2d.min() >= 0.0 and out2d.max() <= 1.0
    np.testing.assert_array_equal(out2d, out1c)
    np.testing.assert_array_equal(out2d[..., 0], out2d[..., 2])


def test_to_display_rgb_and_two_channels() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 1000, (3, 8, 9))
    rgb[1] = 0.0  # green channel dark everywhere
    out = to_display(rgb)
    assert out.shape == (8, 9, 3)
    assert out[..., 1].max() < 0.05 and out[..., 0].max() > 0.9
    two = rng.uniform(-5, 5, (2, 8, 9))
    out2 = to_display(two)
    np.testing.assert_array_equal(out2, to_display(two[0]))


def test_to_display_constant_and_nan_and_no_mutation() -> None:
    img = np.full((4, 5), 7.0)
    img[0, 0] = np.nan
    before = img.copy()
    out = to_display(img)
    assert np.isfinite(out).all() and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(img, before)
    with pytest.raises(ValueError):
        to_display(np.zeros((2, 3, 4, 5)))


def test_overlay_contours_and_untouched_interior() -> None:
    img = np.linspace(0, 1, 32 * 40).reshape(32, 40)
    truth, pred = _square(), _square(lo=12, hi=26)
    out = overlay_rgb(img, truth=truth, pred=pred)
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8
    assert tuple(out[8, 14]) == TRUTH_RGB  # top edge of truth, not on pred edge
    assert tuple(out[25, 20]) == PRED_RGB  # bottom edge of pred, outside truth
    base = np.round(to_display(img) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[14, 14], base[14, 14])  # interior of truth
    np.testing.assert_array_equal(out[0, 0], base[0, 0])  # background


def test_overlay_heat_only_where_score() -> None:
    img = np.zeros((20, 20))
    score = np.zeros((20, 20))
    score[5:10, 5:10] = 1.0
    out = overlay_rgb(img, score=score, alpha=0.5)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 0).all()  # score 0 keeps the image (black) unchanged
    assert out[7, 7].sum() > 100  # heat visible
    assert overlay_rgb(np.zeros((3, 20, 20)), score=score).shape == (20, 20, 3)
    with pytest.raises(ValueError):
        overlay_rgb(img, score=np.zeros((5, 5)))


def test_overlay_thick_contour_on_big_image() -> None:
    m = _square(500, 500, 100, 300)
    thin = overlay_rgb(np.zeros((400, 350)), truth=m[:400, :350])
    thick = overlay_rgb(np.zeros((500, 500)), truth=m)
    n_thin = (thin == TRUTH_RGB).all(-1).sum()
    n_thick = (thick == TRUTH_RGB).all(-1).sum()
    assert n_thin == 4 * 199  # 1-px outline of a 200 x 200 square
    assert n_thick > 2 * n_thin


def test_save_png_roundtrip(tmp_path: Path) -> None:
    from PIL import Image

    rgb = overlay_rgb(np.eye(12), truth=np.eye(12, dtype=bool))
    path = save_png(rgb, tmp_path / "sub" / "x.png")
    assert path.exists() and path.parent.name == "sub"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left
    with pytest.raises(ValueError):
        save_png(rgb.astype(float), tmp_path / "bad.png")


def test_best_slice_priorities() -> None:
    score = np.zeros((5, 6, 6))
    score[4, 0, 0] = 0.9
    pred = np.zeros((5, 6, 6), bool)
    pred[1, :3, :3] = True
    pred[3, :1, :2] = True
    truth = np.zeros((5, 6, 6), bool)
    truth[2, :2, :2] = True
    truth[3, :1, :1] = True
    assert best_slice(score, pred, truth) == 2
    assert best_slice(score, pred, np.zeros_like(truth)) == 1
    assert best_slice(score, pred) == 1
    assert best_slice(score) == 4
    assert best_slice(score, np.zeros_like(pred), np.zeros_like(truth)) == 4
    with pytest.raises(ValueError):
        best_slice(np.zeros((4, 4)))

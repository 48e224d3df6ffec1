"""Tests for medanomaly.infer.sliding: window positions, the Gaussian importance map, and the blended
sliding-window output (identity and linear forwards by hand, any number of spatial axes, and
MONAI's ``sliding_window_inference`` where MONAI, a bench extra, is installed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.infer.sliding import gaussian_importance, sliding_window, window_starts


def test_sliding_window_with_identity_forward_returns_the_input():
    z, y, x = torch.meshgrid(torch.arange(13.0), torch.arange(29.0), torch.arange(31.0), indexing="ij")
    field = torch.stack([0.5 * z - 0.2 * y + 0.1 * x + 3.0, torch.full_like(z, 2.5)])  # linear and constant
    out = sliding_window(field, (8, 16, 16), lambda b: b.clone(), overlap=0.5, batch=3)
    assert out.shape == field.shape
    torch.testing.assert_close(out, field, rtol=0, atol=1e-5)
    small = sliding_window(field[:, :5, :7, :9], (8, 16, 16), lambda b: b * 2, batch=2)  # smaller than the patch
    torch.testing.assert_close(small, 2 * field[:, :5, :7, :9], rtol=0, atol=1e-5)


def test_sliding_window_output_channels_and_windows():
    vol = torch.rand(2, 11, 17, 23)
    out = sliding_window(vol, (4, 8, 8), lambda b: b.sum(1, keepdim=True).repeat(1, 3, 1, 1, 1), overlap=0.25)
    assert out.shape == (3, 11, 17, 23)
    assert window_starts(17, 8, 0.5) == [0, 4, 8, 9] and window_starts(8, 8, 0.5) == [0]
    w = gaussian_importance((5, 8, 8))
    assert w.shape == (5, 8, 8) and float(w.min()) > 0 and float(w.max()) <= 1


def test_sliding_window_equals_monai():
    inferers = pytest.importorskip("monai.inferers", reason="MONAI (bench extra) not installed")
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    for shape, patch, overlap in (((2, 13, 40, 37), (8, 16, 16), 0.5), ((2, 5, 20, 70), (8, 32, 32), 0.25)):
        vol = torch.rand(shape)
        with torch.no_grad():
            ours = sliding_window(vol, patch, conv, overlap, batch=4)
            theirs = inferers.sliding_window_inference(vol[None], patch, 4, conv, overlap=overlap, mode="gaussian")[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_window_starts_by_hand():
    assert window_starts(10, 4, 0.0) == [0, 4, 6]  # steps of 4, the last window moved back to end at 10
    assert window_starts(6, 4, 0.9) == [0, 1, 2]  # int(4 * 0.1) = 0: at least one voxel per step
    assert window_starts(3, 4, 0.5) == [0]  # smaller than the patch: one (padded) window


@settings(max_examples=40, deadline=None)
@given(patch=st.integers(1, 12), extra=st.integers(0, 40), overlap=st.floats(0.0, 0.95))
def test_property_windows_cover_the_axis_inside_it(patch: int, extra: int, overlap: float):
    size = patch + extra
    starts = window_starts(size, patch, overlap)
    step = max(1, int(patch * (1 - overlap)))
    assert starts[0] == 0 and starts[-1] == size - patch and starts == sorted(set(starts))
    assert all(0 < b - a <= step for a, b in zip(starts, starts[1:]))  # no gap between windows


def test_gaussian_importance_is_separable_with_1_at_the_centre():
    w = gaussian_importance((5, 7))
    assert w.dtype == torch.float32 and w[2, 3] == 1.0
    outer = torch.outer(gaussian_importance((5,)), gaussian_importance((7,)))  # separable, ...
    torch.testing.assert_close(w, outer.clamp_min(1e-3))  # ... clamped in the corners: every voxel counts
    assert float(outer.min()) < 1e-3 and float(w.min()) == pytest.approx(1e-3)
    torch.testing.assert_close(w, w.flip(0).flip(1))
    sigma = 0.125 * 7  # one voxel from the centre along an axis of 7: exp(-1 / (2 sigma^2))
    assert float(gaussian_importance((7,))[4]) == pytest.approx(float(torch.exp(torch.tensor(-1 / (2 * sigma**2)))))


def test_any_number_of_axes_and_batch_size_do_not_change_the_result():
    image = torch.rand(1, 23, 30)
    ones = sliding_window(image, (8, 8), lambda b: torch.full_like(b, 4.0), overlap=0.5)
    torch.testing.assert_close(ones, torch.full_like(image, 4.0))  # the weights are normalised
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        one = sliding_window(image, (8, 8), net, batch=1)
        many = sliding_window(image, (8, 8), net, batch=7)
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-6)
    before = image.clone()
    sliding_window(image, (8, 8), lambda b: b.mul_(0))  # even a forward that writes into its batch
    assert torch.equal(image, before)


def test_bad_shapes_and_overlaps_are_value_errors():
    with pytest.raises(ValueError, match=r"volume must be \(C, \*S\) with 3 spatial axes"):
        sliding_window(torch.rand(4, 5, 6), (2, 2, 2), lambda b: b)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        sliding_window(torch.rand(1, 4, 4), (2, 2), lambda b: b, overlap=1.0)

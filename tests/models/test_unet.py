"""Tests for medanomaly.models.unet: output shapes over a grid of variants, validation, gradients."""

from __future__ import annotations

import pytest
import torch

from medanomaly.models.build import count_parameters
from medanomaly.models.unet import NORMS, UNet, UNetConfig

WIDTH = 4


def _grid_2d():
    for size in [(16, 16), (17, 23), (32, 48)]:
        for depth in (1, 2, 3, 4):
            for norm in NORMS:
                marks = []
                yield pytest.param(size, depth, norm, marks=marks, id=f"2d-{size[0]}x{size[1]}-d{depth}-{norm}")


def _grid_3d():
    for size in [(8, 16, 16), (9, 13, 11)]:
        for depth in (1, 2):
            for norm in NORMS:
                yield pytest.param(size, depth, norm, id=f"3d-{'x'.join(map(str, size))}-d{depth}-{norm}")


@pytest.mark.parametrize("channels", [(1, 1), (3, 2)], ids=["1to1", "3to2"])
@pytest.mark.parametrize("size,depth,norm", list(_grid_2d()) + list(_grid_3d()))
def test_output_shape_matches_input(size, depth, norm, channels):
    cin, cout = channels
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=cin, out_channels=cout, dim=len(size), depth=depth, width=WIDTH, norm=norm))
    x = torch.rand(2, cin, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, cout, *size)
    assert torch.isfinite(y).all()


def test_invalid_norm_lists_valid_keys():
    with pytest.raises(ValueError) as info:
        UNet(UNetConfig(norm="layer", width=WIDTH))
    msg = str(info.value)
    assert "layer" in msg
    for key in NORMS:
        assert key in msg


@pytest.mark.parametrize("dim", [1, 4])
def test_invalid_dim_raises(dim):
    with pytest.raises(ValueError, match="dim"):
        UNet(UNetConfig(dim=dim, width=WIDTH))


@pytest.mark.parametrize("depth", [0, -1])
def test_invalid_depth_raises(depth):
    with pytest.raises(ValueError, match="depth"):
        UNet(UNetConfig(depth=depth, width=WIDTH))


def test_group_norm_with_width_not_multiple_of_8():
    model = UNet(UNetConfig(width=12, depth=1, norm="group"))
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 1, 8, 8)


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=WIDTH, depth=2, norm="batch", dropout=0.5)).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)


def test_eval_output_of_one_sample_does_not_depend_on_batch():
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=WIDTH, depth=2, norm="batch")).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm", NORMS)
def test_gradients_reach_first_conv(norm):
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=WIDTH, depth=2, norm=norm))
    model(torch.rand(2, 1, 32, 32)).square().mean().backward()
    first = model.encoders[0][0]
    assert isinstance(first, torch.nn.Conv2d)
    assert first.weight.grad is not None
    assert first.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_gives_same_output():
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=3, width=WIDTH, depth=3, norm="batch")).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out_cl_input = model(x.contiguous(memory_format=torch.channels_last))
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl_both = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl_input, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_cl_both, ref, atol=1e-5, rtol=1e-4)


def test_max_width_caps_channels():
    capped = UNet(UNetConfig(width=4, depth=3, max_width=8))
    free = UNet(UNetConfig(width=4, depth=3))
    assert count_parameters(capped) < count_parameters(free)
    assert capped.encoders[-1][0].out_channels == 8
    with torch.no_grad():
        assert capped(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_size_one_axis_is_padded_and_cropped():
    model = UNet(UNetConfig(width=WIDTH, depth=2, norm="batch")).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 1, 20)).shape == (1, 1, 1, 20)

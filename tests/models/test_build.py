"""Tests for medanomaly.models.build: the one entry point from a UNetConfig to a network (plain U-Net
or ResNet U-Net, 2D or 3D) and the parameter count."""

from __future__ import annotations

import pytest
import torch

from medanomaly.models.build import build_model, count_parameters
from medanomaly.models.resnet_unet import ResNetUNet
from medanomaly.models.unet import ENCODERS, UNet, UNetConfig

WIDTH = 4


def test_build_model_is_unet():
    cfg = UNetConfig(width=WIDTH, depth=2)
    model = build_model(cfg)
    assert isinstance(model, UNet) and model.config == cfg


def test_plain_stays_the_default_and_old_model_json_loads():
    old = {k: v for k, v in UNetConfig(width=4, depth=2).to_dict().items() if k != "encoder"}
    cfg = UNetConfig(**old)  # a model.json written before --encoder existed
    assert cfg.encoder == "plain" and isinstance(build_model(cfg), UNet)
    assert ENCODERS == ("plain", "resnet18", "resnet34")


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
def test_a_resnet_encoder_builds_a_resnet_unet(encoder):
    cfg = UNetConfig(width=WIDTH, encoder=encoder)
    model = build_model(cfg)
    assert isinstance(model, ResNetUNet) and model.config == cfg


def test_3d_configs_build_a_3d_unet():
    model = build_model(UNetConfig(dim=3, width=WIDTH, depth=1, norm="instance"))
    assert isinstance(model, UNet) and isinstance(model.encoders[0][0], torch.nn.Conv3d)


def test_two_builds_of_one_config_have_the_same_architecture():
    cfg = UNetConfig(width=WIDTH, depth=2)
    a, b = build_model(cfg), build_model(cfg)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_count_parameters_by_hand():
    linear = torch.nn.Linear(3, 2)  # 2 x 3 weights + 2 biases
    assert count_parameters(linear) == 8
    linear.weight.requires_grad_(False)  # frozen parameters are parameters too
    assert count_parameters(torch.nn.Sequential(linear, torch.nn.Conv2d(1, 4, 3, bias=False))) == 8 + 36


def test_count_parameters_grows_with_width():
    counts = [count_parameters(UNet(UNetConfig(width=w, depth=2))) for w in (4, 8, 16)]
    assert counts[0] < counts[1] < counts[2]
    model = UNet(UNetConfig(width=4, depth=2))
    assert counts[0] == sum(p.numel() for p in model.parameters())

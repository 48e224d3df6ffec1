"""The model registry's one entry point: a network from its :class:`~medanomaly.config.sections.UNetConfig`."""

from __future__ import annotations

from torch import nn

from medanomaly.config.sections import UNetConfig
from medanomaly.models.resnet_unet import ResNetUNet
from medanomaly.models.unet import UNet


def build_model(config: UNetConfig) -> nn.Module:
    """The model registry's one entry point (architecture variants are config values):
    :class:`UNet` for encoder "plain", :class:`medanomaly.models.resnet_unet.ResNetUNet` otherwise."""
    if config.encoder == "plain":
        return UNet(config)
    return ResNetUNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

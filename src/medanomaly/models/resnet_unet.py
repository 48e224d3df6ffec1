"""U-Net with a ResNet-18/34 encoder whose weights load from a torchvision state dict.

The encoder is torchvision's ``ResNet`` (BasicBlock, layers [2, 2, 2, 2] for resnet18 and
[3, 4, 6, 3] for resnet34, BatchNorm) written out here with the same module names, so the keys of
a torchvision state dict (``conv1.weight``, ``bn1.running_mean``, ``layer2.0.downsample.0.weight``,
...) are this network's keys: ``train --init resnet18.pth`` loads them by name and shape
(:func:`medanomaly.models.init.load_matching`), lists ``fc.*`` as unused and the decoder as missing.
Nothing is downloaded.

Channel mapping: torchvision weights expect RGB standardised with the ImageNet mean/std. A grey
(1-channel) input is repeated onto the three RGB channels, a 3-channel input is used as is; the
medanomaly-normalised intensities (about [0, 1]) are then standardised per channel with
:data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`. These are non-persistent buffers: constants, not in
the state dict (never "missing" on --init, absent from model.pt). Other channel counts are refused.

The diagram (d_i = min(width * 2**i, max_width); spatial scale and channels at each level)::

    x ─ pad to /32 ─ full: ConvBlock (/1, w) ────────────────────────────── cat ─ dec0 (d0) ─ head
      └ rgb+ImageNet ─ conv1/bn1/relu (/2, 64) ──────────────────── cat ─ dec1 (d1) ┘ up
                         └ maxpool ─ layer1 (/4, 64) ─────────── cat ─ dec2 (d2) ┘ up
                                       └ layer2 (/8, 128) ─── cat ─ dec3 (d3) ┘ up
                                           └ layer3 (/16, 256) ─ cat ─ dec4 (d4) ┘ up
                                               └ layer4 (/32, 512) ┘ up

``up`` is a nearest 2x upsampling, each ``dec`` a :class:`medanomaly.models.unet.ConvBlock` with
``config.norm`` (the encoder keeps BatchNorm, as in torchvision). ``config.depth`` is ignored: the
ResNet fixes five down-sampling steps. ``config.dropout`` applies to the layer4 features. With the
encoder frozen (:func:`medanomaly.models.init.set_encoder_trainable`), its BatchNorm layers stay in eval
mode during training, so the loaded running statistics are kept, not re-estimated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medanomaly.config.sections import ConfigError, UNetConfig
from medanomaly.models.unet import ConvBlock, _pad_to_multiple

RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # BasicBlocks per stage
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_WIDTHS = (64, 64, 128, 256, 512)  # conv1 (/2), layer1 (/4), layer2 (/8), layer3 (/16), layer4 (/32)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: (N, cin, H, W) -> (N, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout) for _ in range(blocks - 1)])


class ResNetUNet(nn.Module):
    """U-Net with a torchvision-compatible ResNet encoder, returning logits or a reconstruction.

    forward: x (N, in_channels, H, W), in_channels 1 or 3, any H, W -> (N, out_channels, H, W).
    """

    ENCODER = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")  # module names, as in torchvision

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.encoder not in RESNET_LAYERS:
            raise ConfigError(f"unknown ResNet encoder {config.encoder!r}; valid: {', '.join(RESNET_LAYERS)}")
        if config.in_channels not in (1, 3):
            raise ConfigError(f"the {config.encoder} encoder takes grey (1-channel) or RGB (3-channel) images, "
                              f"got {config.in_channels} channels; convert the images to grey or RGB, "
                              "or use --encoder plain")
        self.config = c = config
        layers = RESNET_LAYERS[c.encoder]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # encoder: torchvision.models.resnet.ResNet without avgpool and fc
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, layers[0], 1)
        self.layer2 = _stage(64, 128, layers[1], 2)
        self.layer3 = _stage(128, 256, layers[2], 2)
        self.layer4 = _stage(256, 512, layers[3], 2)
        self.dropout = nn.Dropout2d(c.dropout) if c.dropout > 0 else nn.Identity()
        # decoder: level i works at 1/2**i of the input; level 0 takes the full-resolution skip
        dec = [min(c.width * 2**i, c.max_width) for i in range(5)]
        self.full = ConvBlock(c.in_channels, dec[0], 2, c.norm)  # thin structures survive at full resolution
        skips = (dec[0],) + ENCODER_WIDTHS[:4]
        below = list(dec[1:]) + [ENCODER_WIDTHS[4]]
        self.decoders = nn.ModuleList([ConvBlock(below[i] + skips[i], dec[i], 2, c.norm) for i in range(5)])
        self.head = nn.Conv2d(dec[0], c.out_channels, 1)
        for name in self.ENCODER:  # torchvision's initialisation (kept where --init loads nothing)
            for m in getattr(self, name).modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = _pad_to_multiple(x, 32)
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        f1 = self.relu(self.bn1(self.conv1((rgb - self.mean) / self.std)))  # /2, 64
        f2 = self.layer1(self.maxpool(f1))  # /4, 64
        f3 = self.layer2(f2)  # /8, 128
        f4 = self.layer3(f3)  # /16, 256
        y = self.dropout(self.layer4(f4))  # /32, 512
        for level, skip in reversed(list(enumerate([self.full(x), f1, f2, f3, f4]))):
            up = F.interpolate(y, scale_factor=2.0, mode="nearest")
            y = self.decoders[level](torch.cat([skip, up], dim=1))
        out = self.head(y)
        return out[:, :, : size[0], : size[1]]

    def train(self, mode: bool = True) -> ResNetUNet:
        """Train mode, except for the BatchNorm layers of a frozen encoder (they keep their statistics)."""
        super().train(mode)
        if mode:
            for name in self.ENCODER:
                for m in getattr(self, name).modules():
                    if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                        m.eval()
        return self

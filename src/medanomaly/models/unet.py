"""U-Net: an encoder-decoder with skip connections, in 2D or 3D, returning logits.

Variants are parameters, not subclasses: ``dim`` (2 or 3), ``depth`` (number of
down-sampling steps), ``width`` (channels of the first level, doubled at each level up to
``max_width``), ``norm`` (a key of :data:`NORMS`) and ``encoder`` (a key of :data:`ENCODERS`:
"plain" is the U-Net below; "resnet18"/"resnet34" is :class:`medanomaly.models.resnet_unet.ResNetUNet`,
2D only, whose encoder loads torchvision weights; :func:`build_model` picks).

The diagram (depth 4, width w)::

    x ─ enc0 (w) ───────────────────────────── cat ─ dec0 (w)  ─ head ─ logits
          └ down ─ enc1 (2w) ─────────────── cat ─ dec1 (2w) ┘ up
                     └ down ─ enc2 (4w) ── cat ─ dec2 (4w) ┘ up
                                 └ down ─ enc3 ─ cat ─ dec3 ┘ up
                                           └ down ─ bottom ┘ up

Inputs of any size work: they are padded (replicate) up to a multiple of ``2**depth`` and the
output is cropped back, so logits always have the input's spatial shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medanomaly.config.options import ENCODERS, NORMS  # noqa: F401 - re-exported
from medanomaly.config.sections import ConfigError, UNetConfig  # noqa: F401 - re-exported


def _conv(dim: int) -> type[nn.Module]:
    return nn.Conv2d if dim == 2 else nn.Conv3d


def _norm(kind: str, dim: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """Two (conv 3, norm, LeakyReLU) layers: (N, cin, *S) -> (N, cout, *S)."""

    def __init__(self, cin: int, cout: int, dim: int, norm: str, dropout: float = 0.0):
        conv = _conv(dim)
        bias = norm == "none"
        layers: list[nn.Module] = [
            conv(cin, cout, 3, padding=1, bias=bias), _norm(norm, dim, cout), nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append((nn.Dropout2d if dim == 2 else nn.Dropout3d)(dropout))
        layers += [conv(cout, cout, 3, padding=1, bias=bias), _norm(norm, dim, cout), nn.LeakyReLU(0.01, inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net returning logits (supervised task) or a reconstruction (anomaly task).

    forward: x (N, in_channels, *S) -> (N, out_channels, *S), S = (H, W) or (D, H, W), any size.
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        if config.dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {config.dim}")
        if config.depth < 1:
            raise ValueError(f"depth must be >= 1, got {config.depth}")
        _norm(config.norm, config.dim, 8)  # validates the key early, with the list of valid ones
        self.config = config
        c, dim = config, config.dim
        widths = [min(c.width * 2**i, c.max_width) for i in range(c.depth + 1)]
        conv, convT = _conv(dim), (nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d)
        self.encoders = nn.ModuleList(
            [ConvBlock(c.in_channels, widths[0], dim, c.norm)]
            + [ConvBlock(widths[i - 1], widths[i], dim, c.norm, c.dropout if i == c.depth else 0.0)
               for i in range(1, c.depth + 1)]
        )
        self.downs = nn.ModuleList([conv(widths[i], widths[i], 2, stride=2) for i in range(c.depth)])
        self.ups = nn.ModuleList([convT(widths[i + 1], widths[i], 2, stride=2) for i in range(c.depth)])
        self.decoders = nn.ModuleList([ConvBlock(2 * widths[i], widths[i], dim, c.norm) for i in range(c.depth)])
        self.head = conv(widths[0], c.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = _pad_to_multiple(x, 2**self.config.depth)
        skips = []
        for level, enc in enumerate(self.encoders):
            x = enc(x)
            if level < self.config.depth:
                skips.append(x)
                x = self.downs[level](x)
        for level in reversed(range(self.config.depth)):
            x = self.decoders[level](torch.cat([skips[level], self.ups[level](x)], dim=1))
        out = self.head(x)
        return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the trailing spatial axes of x (replicate) so each is a multiple of `multiple`."""
    sizes = [s + (-s) % multiple for s in x.shape[2:]]
    if all(s == multiple for s in sizes):  # a 1x1 bottleneck breaks instance norm: make it 2 wide
        sizes[-1] = 2 * multiple
    pads: list[int] = []
    for s, target in zip(reversed(x.shape[2:]), reversed(sizes)):
        pads += [0, target - s]
    if not any(pads):
        return x
    # replicate padding needs the padded size to be < 2x input in some modes; fall back to constant
    mode = "replicate" if all(s > 1 for s in x.shape[2:]) else "constant"
    return F.pad(x, pads, mode=mode)
